"""`difflm bench gpu` (`make gpu-check`): every GPU-only claim checked in one command, under 8 minutes on one H100.

A GPU is lent to this project now and then, for minutes: the check is one prepared command with no
arguments that installs nothing and leaves one report. On a machine without CUDA it prints one line
and exits 0 (so CI and laptops can run it). On CUDA it runs, each step a subprocess of the real CLI
with its own time limit (a step that hangs or fails is recorded, the next one still runs):

1. ``difflm doctor`` on a base-size spec (L = 1024, bf16);
2. a 200-step ``difflm train`` of that spec: 1 worker, DeepSpeed ZeRO-2 over NCCL;
3. the same with 2 workers sharing the GPU (``scaling.gpus_per_worker: 0.5``); NCCL may refuse two
   ranks on one device, and the report then carries its error line: that is the answer;
4. ``difflm bench`` at base L = 1024 bf16: bare loop vs in-process vs full path, MFU against the
   card's bf16 dense peak, peak memory;
5. ``difflm bench sampling`` ddpm vs ddpm_cache on step 2's checkpoint;
6. a 2-trial sweep whose trials share the GPU (0.5 each, in their Tune actors).

The report (``gpu-check.json`` + ``gpu-check.md``) goes to ``$DIFFLM_GPU_REPORT_DIR``, else ``gpu-report/``.
Targets it states: MFU >= 40 % at base L = 1024 bf16 on an H100, full path >= 0.97x the bare loop.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPORT_DIR_ENV = "DIFFLM_GPU_REPORT_DIR"
SKIP_LINE = "gpu-check: skipped, no CUDA device here (torch.cuda.is_available() is False)"
#: The whole check must fit a lent GPU's few minutes: steps that would start after this are skipped.
BUDGET_S = 450.0
MFU_TARGET = 0.40
RELATIVE_TARGET = 0.97

BASE_SPEC = """\
model: {family: mdlm, size: base}
data: {source: builtin, seq_len: 1024}
tokenizer: {kind: byte}
train: {max_steps: 200, micro_batch_size: 8, lr: 3.0e-4, warmup_steps: 20, eval_every: 100, checkpoint_every: 200,
        log_every: 10, num_samples: 1, eval_samples: 2, eval_at_start: false, precision: bf16}
scaling: {num_workers: 1, device: cuda, zero_stage: 2}
"""

SWEEP_SPEC = """\
model: {family: mdlm, size: small}
data: {source: builtin, seq_len: 256}
tokenizer: {kind: byte}
train: {max_steps: 100, micro_batch_size: 16, lr: 1.0e-3, warmup_steps: 10, eval_every: 50, checkpoint_every: 100,
        log_every: 10, num_samples: 0, eval_samples: 2, precision: bf16}
scaling: {num_workers: 1, device: cuda, gpus_per_worker: 0.5, zero_stage: 2}
sweep:
  search:
    train.lr: {grid: [1.0e-3, 3.0e-3]}
  scheduler: {kind: none}
"""


@dataclass
class StepResult:
    """One step of the check: what ran, how it ended, and what it measured (``data``)."""

    name: str
    command: list[str]
    status: str  # ok | failed | timeout | skipped
    wall_s: float = 0.0
    returncode: int | None = None
    tail: str = ""  # last lines of its output: the reason when it failed
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: float
    parse: Callable[[str], dict[str, Any]] = lambda _out: {}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def plan(folder: Path) -> list[Step]:
    """The steps, in order, with their time limits: 7 minutes in all at most, a minute left for the check's own start."""
    base = folder / "base.yaml"
    sweep = folder / "sweep.yaml"
    base.write_text(BASE_SPEC)
    sweep.write_text(SWEEP_SPEC + f"output: {{dir: {folder}, name: sweep}}\n")
    runs = folder / "runs"
    return [
        Step("doctor", _cli("doctor", str(base)), 50),
        Step("train_1_worker", _cli("train", str(base), "--output", str(runs), "--name", "train1"), 80,
             lambda _o: _run_summary(runs / "train1")),
        Step("train_2_workers_one_gpu",
             _cli("train", str(base), "--output", str(runs), "--name", "train2", "--set", "scaling.num_workers=2",
                  "--set", "scaling.gpus_per_worker=0.5", "--set", "train.max_steps=40",
                  "--set", "train.eval_every=40", "--set", "train.checkpoint_every=40"), 50,
             lambda _o: _run_summary(runs / "train2")),
        Step("bench", _cli("bench", "--size", "base", "--seq-len", "1024", "--batch", "8", "--precision", "bf16",
                           "--device", "cuda", "--steps", "20", "--rounds", "3", "--vocab", "0",
                           "--output", str(folder / "bench"), "--json"), 140, _bench_data),
        Step("sampling", _cli("bench", "sampling", str(runs / "train1"), "--steps", "256", "--length", "1024",
                              "--num", "1", "--num", "8", "--device", "cuda"), 40, lambda o: {"table": _table(o)}),
        Step("sweep_2_trials_one_gpu", _cli("sweep", str(sweep)), 60, lambda _o: _sweep_data(folder / "sweep")),
    ]


def _run_summary(run_dir: Path) -> dict[str, Any]:
    f = run_dir / "summary.json"
    if not f.is_file():
        return {}
    s = json.loads(f.read_text())
    return {k: s.get(k) for k in ("steps", "best_val_nll", "peak_memory_bytes", "startup", "wall_time_s",
                                  "tokens_per_step", "skipped_steps")}


def _bench_data(out: str) -> dict[str, Any]:
    start = out.find("{")
    return json.loads(out[start:]) if start >= 0 else {}


def _table(out: str) -> str:
    return "\n".join(line for line in out.splitlines() if line.startswith("|"))


def _sweep_data(sweep_dir: Path) -> dict[str, Any]:
    f = sweep_dir / "results.json"
    return {"results": json.loads(f.read_text())} if f.is_file() else {}


def run_step(step: Step, log: Callable[[str], None]) -> StepResult:
    log(f"gpu-check: {step.name} (limit {step.timeout_s:.0f} s)")
    start = time.monotonic()
    try:
        proc = subprocess.run(step.command, capture_output=True, text=True, timeout=step.timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return StepResult(step.name, step.command, "timeout", time.monotonic() - start, None, out[-2000:])
    wall = time.monotonic() - start
    text = proc.stdout + proc.stderr
    try:
        data = step.parse(proc.stdout)
    except Exception as exc:  # a report that cannot be read is a finding, not a crash of the check
        data = {"parse_error": f"{type(exc).__name__}: {exc}"}
    status = "ok" if proc.returncode == 0 else "failed"
    return StepResult(step.name, step.command, status, wall, proc.returncode, text[-2000:], data)


# ----------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def assemble(results: list[StepResult], machine: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The JSON report and its markdown from the steps' results: verdicts against the targets included."""
    by = {r.name: r for r in results}
    verdicts: dict[str, Any] = {}
    bench = by.get("bench")
    if bench is not None and bench.status == "ok" and bench.data.get("paths"):
        paths = {p["path"]: p for p in bench.data["paths"]}
        mfu = max((p.get("utilisation") or 0.0) for p in paths.values()) or None
        full = paths.get("train", {}).get("relative")
        verdicts["mfu"] = {"value": mfu, "target": MFU_TARGET, "met": mfu is not None and mfu >= MFU_TARGET,
                           "peak_source": bench.data.get("peak", {}).get("source")}
        verdicts["full_path_vs_bare"] = {"value": full, "target": RELATIVE_TARGET,
                                         "met": full is not None and full >= RELATIVE_TARGET}
        verdicts["peak_memory_mb"] = {p: paths[p].get("peak_memory_mb") for p in paths}
    two = by.get("train_2_workers_one_gpu")
    if two is not None:
        verdicts["two_workers_one_gpu"] = (
            "ran" if two.status == "ok" else f"{two.status}: " + (two.tail.strip().splitlines() or ["no output"])[-1]
        )
    report = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "total_s": round(sum(r.wall_s for r in results), 1),
        "ok": all(r.status in ("ok", "skipped") for r in results if r.name != "train_2_workers_one_gpu"),
        "verdicts": verdicts,
        "steps": [asdict(r) for r in results],
    }
    lines = [f"# gpu-check {report['date']}", "",
             f"{machine.get('gpu', '?')}, torch {machine.get('torch', '?')}, CUDA {machine.get('cuda', '?')}; "
             f"{report['total_s']} s in all", "",
             "| step | status | wall s | note |", "|---|---|---:|---|"]
    for r in results:
        note = "" if r.status == "ok" else (r.tail.strip().splitlines() or [""])[-1][:160].replace("|", "/")
        lines.append(f"| {r.name} | {r.status} | {r.wall_s:.1f} | {note} |")
    if "mfu" in verdicts:
        v, f = verdicts["mfu"], verdicts["full_path_vs_bare"]
        rel = "n/a" if f["value"] is None else f"{f['value']:.3f}x"
        lines += ["", f"- MFU (best path, bf16 dense peak): {_pct(v['value'])} (target {_pct(MFU_TARGET)}: "
                      f"{'met' if v['met'] else 'NOT met'})",
                  f"- full `difflm train` vs bare loop: {rel} (target {RELATIVE_TARGET}x: "
                  f"{'met' if f['met'] else 'NOT met'})"]
    if "two_workers_one_gpu" in verdicts:
        lines.append(f"- 2 workers on one GPU: {verdicts['two_workers_one_gpu']}")
    sampling = by.get("sampling")
    if sampling is not None and sampling.data.get("table"):
        lines += ["", "ddpm vs ddpm_cache:", "", sampling.data["table"]]
    return report, "\n".join(lines) + "\n"


def report_dir() -> Path:
    return Path(os.environ.get(REPORT_DIR_ENV) or "gpu-report")


def _machine() -> dict[str, Any]:
    import torch

    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}


def run_gpu_check(log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> int:
    """0 when every step (the 2-workers-on-one-GPU probe aside) passed or CUDA is absent; 1 otherwise."""
    import torch

    if not torch.cuda.is_available():
        print(SKIP_LINE)
        return 0
    folder = report_dir().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: list[StepResult] = []
    for step in plan(folder):
        if time.monotonic() - started + step.timeout_s > BUDGET_S:
            results.append(StepResult(step.name, step.command, "skipped", tail="the check's time budget ran out"))
            continue
        results.append(run_step(step, log))
    report, markdown = assemble(results, _machine())
    (folder / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "gpu-check.md").write_text(markdown)
    print(markdown)
    print(f"gpu-check: report in {folder}")
    return 0 if report["ok"] else 1
