"""`difflm bench`: difflm's training loop side by side with a bare PyTorch loop, same model and batch.

Paths, all on the same model (same seed, so the same initial weights), batch, precision and AdamW:

* ``bare``: the yardstick. forward, loss, backward, clip, AdamW step, nothing else.
* ``torch``: :class:`Runner` + :class:`TorchEngine` in this process (difflm's loop without Ray).
* ``deepspeed``: :class:`Runner` + :class:`DeepSpeedEngine` (ZeRO) in this process, a 1-rank group.
* ``train``: the full `difflm train` command in a subprocess (one worker process, orchestrator.local.supervisor) with the benchmark's
  threads as ``cpus_per_worker``; its per-step times come from the run's TensorBoard
  (``train/tokens_per_sec`` at ``log_every: 1``) and its start-up from ``summary.json``.

Rounds interleave the paths (order rotated each round) so drifting machine load hits all alike;
a round's tokens/s is tokens per step over its median step time, a path's tokens/s the median over
its rounds; step-time percentiles pool the timed steps of all rounds.
"vs bare" is the mean over rounds of each round's paired ratio (the path's tokens/s over the bare
loop's in the same round), with a bootstrap 95% interval over rounds (:func:`paired_ratio`): a ratio
resolves a 3% gap when that interval is at most 3% wide. Round-to-round noise on a shared 2-core box
is 2-5%, so that takes ~10-20 rounds; the interval says whether a given run got there.
The numbers belong in docs/benchmarks.md, never in a timed test (the suite checks the shape only).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from orchestrator.devices import local_device, peak_memory_above, start_memory_window, synchronize
from orchestrator.errors import SpecError

PATHS = ("bare", "torch", "deepspeed", "train")


@dataclass
class ThroughputConfig:
    family: str = "mdlm"
    size: str = "small"
    seq_len: int = 256
    batch: int = 8
    precision: str = "fp32"
    device: str = "auto"
    steps: int = 20  # timed steps per path and round
    warmup: int = 3  # untimed steps before a path's first round (the first step included)
    rounds: int = 3
    paths: tuple[str, ...] = PATHS
    data: str = "builtin"  # builtin, or a text file / folder
    vocab: int = 8192  # BPE vocab size; 0 = the byte tokenizer
    threads: int | None = None  # torch threads here and cpus_per_worker for `difflm train`; None = all CPUs
    zero_stage: int = 2
    output: str = "runs/bench"
    quick: bool = False
    matmul_size: int | None = None
    command: str = field(default="difflm bench", repr=False)

    @classmethod
    def quick_preset(cls, **overrides: Any) -> "ThroughputConfig":
        """A seconds-long smoke of every path (the CI shape check): tiny model, bytes, 2 x 2 steps."""
        base = dict(size="tiny", seq_len=32, batch=2, steps=2, warmup=1, rounds=1, vocab=0, matmul_size=256, quick=True)
        return cls(**{**base, **overrides})


def run_spec_raw(cfg: ThroughputConfig, device: str, precision: str) -> dict[str, Any]:
    """The run spec every path shares (the `train` path trains exactly this)."""
    max_steps = cfg.warmup + cfg.steps
    data: dict[str, Any] = {"source": "builtin"} if cfg.data == "builtin" else {"source": "text", "path": cfg.data}
    data["seq_len"] = cfg.seq_len
    if cfg.quick:
        data["max_documents"] = 200
    return {
        "model": {"family": cfg.family, "size": cfg.size},
        "data": data,
        "tokenizer": {"kind": "bpe", "vocab_size": cfg.vocab} if cfg.vocab else {"kind": "byte"},
        "train": {
            "max_steps": max_steps, "micro_batch_size": cfg.batch, "grad_accum": 1, "lr": 1e-4,
            "warmup_steps": 0, "lr_schedule": "constant", "precision": precision, "log_every": 1,
            "eval_every": max_steps, "checkpoint_every": max_steps, "eval_batches": 1, "num_samples": 0,
            "eval_at_start": False,  # the `train` path's rounds time steps; a step-0 eval is start-up, not loop
        },
        "scaling": {
            "num_workers": 1, "device": device, "cpus_per_worker": cfg.threads or 1,
            "zero_stage": cfg.zero_stage, "deepspeed": True,
        },
        "output": {"dir": str(Path(cfg.output).resolve())},
    }


# ------------------------------------------------------------ in-process paths
def _autocast(device: torch.device, precision: str) -> Callable[[], Any]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)) if dtype else contextlib.nullcontext


class _Batches:
    """The train blocks in order, cycling, as (B, L) int64 tensors on the device."""

    def __init__(self, blocks: Any, batch: int, device: torch.device) -> None:
        self.blocks, self.batch, self.device, self.i = blocks, batch, device, 0

    def __next__(self) -> torch.Tensor:
        n = len(self.blocks) // self.batch
        start = (self.i % n) * self.batch
        self.i += 1
        return torch.from_numpy(self.blocks[start : start + self.batch].astype("int64")).to(self.device)


class BarePath:
    """forward, loss, backward, clip, AdamW: what a user writes by hand around difflm's model."""

    name = "bare"

    def __init__(self, spec: Any, data: Any, device: torch.device) -> None:
        from orchestrator.build import build_family
        from orchestrator.train.optim import adamw

        t = spec.train
        self.model = build_family(spec, data.tokenizer)  # the run's model; the loop around it is the bare one
        self.model.to(device).train()
        self.opt = adamw(self.model.parameters(), lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
        self.clip, self.autocast = t.grad_clip, _autocast(device, t.precision)
        self.batches = _Batches(data.train, t.micro_batch_size, device)
        self.valid = torch.ones(t.micro_batch_size, spec.data.seq_len, dtype=torch.bool, device=device)
        self.gen = torch.Generator(device=device).manual_seed(t.seed)
        self.label = "bare PyTorch loop (forward, backward, clip, AdamW)"

    def forward_backward(self) -> None:
        with self.autocast():
            out = self.model(next(self.batches), self.valid, self.gen)
        out.loss.backward()

    def step(self) -> None:
        self.forward_backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class RunnerPath:
    """difflm's :class:`Runner` around one of its engines, in this process (world size 1)."""

    def __init__(self, backend: str, spec: Any, data: Any, device: torch.device) -> None:
        from orchestrator.build import build_run
        from orchestrator.train.engine import effective_zero_stage, init_single_rank_group
        from orchestrator.train.runner import WorkerContext

        self.name = backend
        if backend == "deepspeed":
            init_single_rank_group(device)
            self.label = f"`Runner` + `DeepSpeedEngine` (ZeRO-{effective_zero_stage(spec)}), in-process"
        else:
            self.label = "`Runner` + `TorchEngine`, in-process"
        runner = build_run(spec, data, device, ctx=WorkerContext(0, 1, device), backend=backend).runner
        assert runner is not None
        self.runner = runner

    def step(self) -> None:
        self.runner.train_step()


def _timed_steps(step: Callable[[], None], n: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------- the train path
def run_train_path(cfg: ThroughputConfig, spec_raw: dict[str, Any], round_no: int, folder: Path) -> dict[str, Any]:
    """One `difflm train` run in a subprocess; per-step seconds (after warm-up), start-up and memory."""
    import yaml

    from orchestrator.train.metrics import read_scalars

    name = f"train-r{round_no}"
    spec_file = folder / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(spec_raw, sort_keys=False))
    log = folder / f"{name}.log"
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", "train", str(spec_file), "--output", str(folder), "--name", name],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False,
        )
    wall = time.time() - started
    run_dir = folder / name
    if proc.returncode != 0 or not (run_dir / "summary.json").exists():
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"`difflm train` exited {proc.returncode}: {tail[0]} (log: {log})")
    summary = json.loads((run_dir / "summary.json").read_text())
    tokens_per_step = cfg.batch * cfg.seq_len
    rates = dict(read_scalars(run_dir / "tensorboard")["train/tokens_per_sec"])
    times = [tokens_per_step / rates[s] for s in sorted(rates) if s > cfg.warmup]
    return {
        "times": times,
        "first_step_s": summary.get("startup", {}).get("step1"),
        "peak_memory": summary.get("peak_memory_bytes"),
        "threads": summary.get("threads"),
        "wall_s": wall,
    }


# ------------------------------------------------------------------ the bench
def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def run_throughput(cfg: ThroughputConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    """Run every path of ``cfg``, interleaved; return the report as plain data (see format_markdown)."""
    from difflm.data import prepare_data
    from orchestrator.bench.peak import device_peak, step_flops
    from orchestrator.spec.run import RunSpec
    from orchestrator.spec.yamlio import validate_as
    from orchestrator.train.engine import effective_zero_stage
    from orchestrator.train.precision import resolve_precision

    dev = local_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.threads = torch.get_num_threads() if dev.type == "cpu" else (cfg.threads or 1)
    spec = validate_as(RunSpec, run_spec_raw(cfg, dev.type, cfg.precision), "difflm bench")
    if "deepspeed" in cfg.paths and dev.type == "mps":
        raise SpecError("--paths deepspeed: DeepSpeed has no MPS accelerator; leave it out on Apple silicon")
    load_before = _loadavg()
    data = prepare_data(spec.data, spec.tokenizer, log=log)
    spec, _ = resolve_precision(spec, dev.type, data.tokenizer.vocab_size)
    precision = spec.train.precision
    spec_raw = run_spec_raw(cfg, dev.type, precision)  # the `train` path gets the resolved precision too
    if len(data.train) < cfg.batch:
        raise SpecError(f"the corpus has {len(data.train)} training blocks, fewer than --batch {cfg.batch}")
    # Imported before any path is timed or measured, so no path pays (or counts) another's imports.
    importlib.import_module("torch._dynamo")  # torch.optim imports it at the first optimizer

    if "deepspeed" in cfg.paths:
        importlib.import_module("deepspeed")

    folder = Path(cfg.output).resolve() / f"throughput-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    folder.mkdir(parents=True, exist_ok=True)
    tokens_per_step = cfg.batch * cfg.seq_len
    rows: dict[str, dict[str, Any]] = {}
    live: dict[str, Any] = {}
    for name in (p for p in cfg.paths if p != "train"):
        log(f"bench: setting up {name}")
        if name == "deepspeed" and dev.type == "cpu":
            from orchestrator.train.engine import deepspeed_cpu_op_notice

            notice = deepspeed_cpu_op_notice()
            if notice is not None:
                log(f"bench: {notice}; the deepspeed row's first step includes it")
        baseline = start_memory_window(dev)
        start = time.perf_counter()
        path = BarePath(spec, data, dev) if name == "bare" else RunnerPath(name, spec, data, dev)
        _timed_steps(path.step, 1, dev)
        first = time.perf_counter() - start
        rows[name] = {"path": name, "label": path.label, "first_step_s": first,
                      "peak_memory": peak_memory_above(dev, baseline), "times": [], "rounds": [], "round_tps": []}
        _timed_steps(path.step, cfg.warmup - 1, dev)
        live[name] = path
    if "train" in cfg.paths:
        where = f"{cfg.threads} CPU(s)" if dev.type != "cuda" else "1 GPU"
        rows["train"] = {"path": "train", "first_step_s": [], "peak_memory": [], "times": [], "rounds": [], "round_tps": [],
                         "label": f"`difflm train`, 1 worker process x {where}, DeepSpeed ZeRO-{effective_zero_stage(spec)}"}

    counter = live.get("bare") or BarePath(spec, data, dev)  # the model every path trains
    flops = step_flops(counter.forward_backward)
    counter.opt.zero_grad(set_to_none=True)  # the counted backward's gradients must not reach a timed step
    parameters = counter.model.num_parameters()
    order = list(cfg.paths)
    for r in range(cfg.rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            log(f"bench: round {r + 1}/{cfg.rounds}: {name}")
            row = rows[name]
            if name == "train":
                try:
                    res = run_train_path(cfg, spec_raw, r + 1, folder)
                except RuntimeError as exc:
                    row["error"] = str(exc)
                    row["round_tps"].append(None)
                    continue
                times = res["times"]
                row["first_step_s"].append(res["first_step_s"])
                row["peak_memory"].append(res["peak_memory"])
            else:
                times = _timed_steps(live[name].step, cfg.steps, dev)
            row["times"] += times
            # a round's rate from its median step: one slow step (a co-tenant, a GC pause) does not swing it
            round_tps = tokens_per_step / statistics.median(times) if times else None
            row["round_tps"].append(round_tps)  # by round index: the paired ratio needs the same round
            if round_tps:
                row["rounds"].append(round_tps)
    peak = device_peak(dev, precision, cfg.matmul_size)
    report = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": cfg.command,
        "machine": {
            "cpu": _cpu_name(), "cpus": os.cpu_count(), "threads": cfg.threads,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "torch": torch.__version__, "deepspeed": _version("deepspeed"), "ray": _version("ray"),
        },
        "load_avg_1min": {"before": load_before, "after": _loadavg()},
        "config": {k: v for k, v in asdict(cfg).items() if k != "command"},
        "model": {
            "family": cfg.family, "size": cfg.size, "parameters": parameters,
            "vocab": data.tokenizer.vocab_size, "seq_len": cfg.seq_len, "batch": cfg.batch,
            "tokens_per_step": tokens_per_step, "precision": precision, "device": str(dev),
        },
        "peak": {"flops": peak.flops, "source": peak.source},
        "flops_per_step": flops,
        "folder": str(folder),
        "paths": [_summarise(rows[n], rows.get("bare"), flops, peak.flops, tokens_per_step) for n in cfg.paths],
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


#: Resamples of the bootstrap interval of a paired ratio (fixed seed: the same rounds give the same interval).
BOOTSTRAP = 4000


def paired_ratio(path_rounds: list[float], bare_rounds: list[float], level: float = 0.95) -> dict[str, Any] | None:
    """Mean of the per-round ratios ``path_rounds[i] / bare_rounds[i]`` (each path and the bare loop ran in
    the same interleaved round, so machine drift cancels in the ratio), its standard error and a
    percentile-bootstrap ``level`` interval over rounds (None below 3 rounds: no interval to speak of).

    Rounds are the unit, not steps: steps within a round share its load and are not independent, so a
    step-level interval would claim a precision the bench does not have."""
    import numpy as np

    pairs = [(p, b) for p, b in zip(path_rounds, bare_rounds) if p and b]
    if not pairs:
        return None
    ratios = np.array([p / b for p, b in pairs])
    out: dict[str, Any] = {"mean": float(ratios.mean()), "rounds": [float(r) for r in ratios], "se": None, "ci": None}
    if len(ratios) >= 3:
        out["se"] = float(ratios.std(ddof=1) / np.sqrt(len(ratios)))
        rng = np.random.default_rng(0)
        means = ratios[rng.integers(0, len(ratios), size=(BOOTSTRAP, len(ratios)))].mean(axis=1)
        tail = (1 - level) / 2
        out["ci"] = [float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))]
    return out


def _summarise(row: dict[str, Any], bare: dict[str, Any] | None, flops: float | None, peak: float,
               tokens_per_step: int) -> dict[str, Any]:
    times = sorted(row["times"])
    tps = _median(row["rounds"])
    bare_tps = _median(bare["rounds"]) if bare else None
    paired = paired_ratio(row["round_tps"], bare["round_tps"]) if bare else None
    achieved = flops * tps / tokens_per_step if (flops and tps) else None
    first = row["first_step_s"]
    memory = row["peak_memory"]
    out = {
        "path": row["path"],
        "label": row["label"],
        "tokens_per_s": tps,
        # paired over rounds when every round has both; else the ratio of the medians
        "relative": paired["mean"] if paired else (tps / bare_tps if (tps and bare_tps) else None),
        "relative_se": paired["se"] if paired else None,
        "relative_ci95": paired["ci"] if paired else None,
        "relative_rounds": paired["rounds"] if paired else [],
        "step_ms_p50": 1000 * _quantile(times, 0.5) if times else None,
        "step_ms_p90": 1000 * _quantile(times, 0.9) if times else None,
        "achieved_flops": achieved,
        "utilisation": achieved / peak if achieved else None,
        "peak_memory_mb": (_median(memory) if isinstance(memory, list) else memory),
        "first_step_s": _median(first) if isinstance(first, list) else first,
        "rounds_tokens_per_s": row["rounds"],
        "timed_steps": len(times),
    }
    if out["peak_memory_mb"] is not None:
        out["peak_memory_mb"] /= 2**20
    if "error" in row:
        out["error"] = row["error"]
    return out


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
