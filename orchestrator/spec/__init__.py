"""Spec files: the run spec (``run.py``), YAML reading and ``--set`` overrides (``yamlio.py``),
and the run-or-sweep dispatch of ``difflm validate`` / ``difflm schema`` (``files.py``)."""
