"""Run the doctor's checks in order; later checks are skipped when what they need failed.

device -> engine -> precision -> data -> unknown tokens -> round trip -> model size ->
loss at init -> gradients + memorisation -> throughput/ETA. A check that raises becomes a
FAIL with the exception's message, so a broken model is reported, not crashed on.
"""

from __future__ import annotations

from typing import Callable

import torch

from orchestrator.devices import resolve_device
from orchestrator.doctor import dynamics, environment
from orchestrator.doctor.data import prepare, round_trip_check, unknown_check
from orchestrator.doctor.model import size_check
from orchestrator.doctor.report import Check
from orchestrator.spec.run import RunSpec
from orchestrator.train.precision import resolve_precision
from orchestrator.train.launch import local_resources
from orchestrator.train.startup import resolve_cpus, worker_threads


def _guard(name: str, fn: Callable[[], Check | tuple[Check, ...]]) -> tuple[Check, ...]:
    try:
        out = fn()
    except Exception as exc:  # a broken model must be reported, not crash the doctor
        return (Check("FAIL", name, f"raised {type(exc).__name__}: {exc}"),)
    return out if isinstance(out, tuple) else (out,)


def stages_check(spec: RunSpec) -> Check | None:
    """A line describing a staged spec (none for a plain one)."""
    plan = spec.stage_plan()
    if len(plan) == 1:
        return None
    parts = ", ".join(f"{st.name} ({st.steps} steps)" for st in plan)
    return Check("PASS", "stages", f"{len(plan)} stages in one run: {parts}; the checks below use the last "
                                   "stage's switches (the most components on)")


def run_doctor(spec: RunSpec, emit: Callable[[Check], None], log: Callable[[str], None] = lambda _: None) -> list[Check]:
    """Run every check, calling ``emit`` as each finishes; return them all.

    On a CPU the checks run with the intra-op threads a Ray Train worker of this spec gets
    (``scaling.cpus_per_worker``, see orchestrator.train.startup): the ETA then matches a run."""
    threads = torch.get_num_threads()
    spec = resolve_cpus(spec, [local_resources()[0]], lambda _: None)  # what `difflm train` resolves here
    try:
        if resolve_device(spec.scaling.device) == "cpu":
            torch.set_num_threads(worker_threads(spec.scaling.cpus_per_worker))
        return _run(spec, emit, log)
    finally:
        torch.set_num_threads(threads)


def _run(spec: RunSpec, emit: Callable[[Check], None], log: Callable[[str], None]) -> list[Check]:
    checks: list[Check] = []

    def add(*results: Check | None) -> None:
        for c in results:
            if c is not None:
                checks.append(c)
                emit(c)

    add(stages_check(spec))
    dev, device = environment.device_check(spec)
    add(dev)
    if device is None:
        return checks
    add(*_guard("engine", lambda: environment.engine_check(spec, device)))
    data_check, data = prepare(spec, log)
    add(data_check)
    if data is None:
        return checks
    # `auto` as a run resolves it (with the real vocab); the checks below train with that precision
    resolved, picked = resolve_precision(spec, device.type, data.tokenizer.vocab_size)
    add(*_guard("precision", lambda: environment.precision_check(spec, device, picked)))
    spec = resolved
    add(*_guard("unknown tokens", lambda: unknown_check(data)))
    add(*_guard("round trip", lambda: round_trip_check(data)))
    try:
        model = dynamics.build(spec, data, device)
    except Exception as exc:
        add(Check("FAIL", "model", f"cannot build the model: {type(exc).__name__}: {exc}"))
        return checks
    add(*_guard("model size", lambda: size_check(spec, model, data)))
    add(*_guard("loss at init", lambda: dynamics.init_loss_check(spec, model, data, device)))
    add(*_guard("memorisation", lambda: dynamics.memorise(spec, model, data, device)))
    add(*_guard("throughput", lambda: dynamics.throughput_check(spec, data, device)))
    return checks
