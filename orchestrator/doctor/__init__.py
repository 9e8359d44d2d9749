"""`difflm doctor SPEC`: pre-flight checks of a run spec, in-process on this machine (no Ray).

report.py (Check, PASS/WARN/FAIL lines), environment.py (device, engine, precision),
data.py (tokens, unknown tokens, blocks, round trip), model.py (size against data and the
rule of thumb), dynamics.py (loss at init, gradient flow, one-batch memorisation, throughput
and ETA), run.py (runs them in order, to a time budget).
"""
