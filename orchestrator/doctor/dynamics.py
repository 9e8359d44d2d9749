"""Training dynamics on a few batches: loss scale at init, gradient flow, one-batch memorisation, throughput.

Everything runs in-process with the plain-torch engine (the same AdamW, clipping and autocast as a
run's; DeepSpeed changes how it is distributed, not the maths) on the device the run will use, with
the switches of the spec's *last* stage (the most components on).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import Tensor

from difflm.data import PreparedData
from difflm.families import Family, build_model
from orchestrator.devices import synchronize
from orchestrator.doctor.report import Check, fmt_count, fmt_duration
from orchestrator.spec.run import RunSpec
from orchestrator.build import build_family
from orchestrator.train.engine import TorchEngine

#: one-batch memorisation: batch shape, step budget, the share of the initial loss to reach, the lowest LR
MEMORISE_BATCH = (4, 64)
MEMORISE_STEPS = 150
MEMORISE_TARGET = 0.3
MEMORISE_MIN_LR = 1e-3
#: memorisation step at which gradient flow is judged (zero-initialised layers have moved by then)
GRAD_CHECK_STEP = 20
#: a layer group below this share of the largest group's gradient norm is "vanishing"
VANISHING = 1e-6
#: total gradient norm (before clipping) that WARNs / FAILs as exploding
EXPLODING_WARN, EXPLODING_FAIL = 1e2, 1e4
#: loss at init / log(vocab): PASS inside, WARN between, FAIL outside (orders of magnitude off)
LOSS_PASS, LOSS_WARN = (0.1, 3.0), (0.01, 10.0)
#: throughput: timed steps and the time budget for them
TIMED_STEPS, TIMING_BUDGET_S = 3, 10.0


def build(spec: RunSpec, data: PreparedData, device: torch.device) -> Family:
    """The run's model (seeded like a run), switched to the last stage's options, on ``device``."""
    model = build_family(spec, data.tokenizer)
    model.configure(spec.stage_plan()[-1].spec.diffusion)
    return model.to(device)


def _batch(data: PreparedData, rows: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``rows`` train blocks (repeated when there are fewer), cropped to ``length``: (B, L) ids and valid."""
    idx = np.arange(rows) % len(data.train)
    tokens = torch.from_numpy(np.asarray(data.train[idx, :length], dtype=np.int64)).to(device)  # (B, L)
    return tokens, torch.ones_like(tokens, dtype=torch.bool)


def init_loss_check(spec: RunSpec, model: Family, data: PreparedData, device: torch.device) -> Check:
    """The training loss at init against log(vocab): a per-token cross-entropy of an untrained model is about
    log(V); a summed loss is hundreds of times larger (the journal's 437,403)."""
    model.train()
    tokens, valid = _batch(data, min(spec.train.micro_batch_size, 8), spec.data.seq_len, device)
    gen = torch.Generator(device=device).manual_seed(spec.train.eval_seed)
    with torch.no_grad():
        loss = float(np.mean([float(model(tokens, valid, gen).loss) for _ in range(4)]))
    log_v = math.log(data.tokenizer.vocab_size)
    ratio = loss / log_v
    msg = f"{loss:.4g} nats at init (mean of 4 draws) = {ratio:.3g} x log(vocab) = {log_v:.2f}"
    if not math.isfinite(loss):
        return Check("FAIL", "loss at init", f"{msg}: the loss is not finite before any update; the model or loss "
                                             "is broken")
    if not LOSS_WARN[0] <= ratio <= LOSS_WARN[1]:
        why = (" A loss summed over the sequence instead of averaged per real token looks like this (the "
               "journal's 437,403); divide by the number of counted tokens") if ratio > 1 else \
              " The loss is far below chance at init: it is probably not a cross-entropy of the targets"
        return Check("FAIL", "loss at init", f"{msg}: orders of magnitude off the ~1 x log(vocab) an untrained "
                                             f"model gives.{why}")
    if not LOSS_PASS[0] <= ratio <= LOSS_PASS[1]:
        return Check("WARN", "loss at init", f"{msg}: expected about 1 x log(vocab) for an untrained model; check the "
                                             "loss normalisation")
    return Check("PASS", "loss at init", f"{msg}: as expected for an untrained model")


def layer_grad_norms(model: Family) -> dict[str, float | None]:
    """Gradient norm per layer group (``backbone.blocks.3``, ``backbone.embed``, ...); None: no gradient."""
    groups: dict[str, list[Tensor | None]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        idx = next((i for i, part in enumerate(parts[:3]) if part.isdigit()), None)
        key = ".".join(parts[: idx + 1] if idx is not None else parts[:2] if len(parts) > 2 else parts[:1])
        groups.setdefault(key, []).append(None if p.grad is None else p.grad.detach())
    out: dict[str, float | None] = {}
    for key, grads in groups.items():
        real = [g.float().norm() for g in grads if g is not None]
        out[key] = float(torch.stack(real).norm()) if real else None
    return out


def gradient_verdict(norms: dict[str, float | None], step: int) -> Check:
    """NaN/Inf FAIL; exploding total WARN/FAIL; vanishing groups or groups without gradient WARN."""
    bad = [k for k, v in norms.items() if v is not None and not math.isfinite(v)]
    if bad:
        return Check("FAIL", "gradients", f"NaN/Inf gradients at step {step} in {', '.join(bad[:4])}"
                                          f"{' ...' if len(bad) > 4 else ''}: training would stop; lower train.lr, "
                                          "use fp32, or fix the loss")
    real = {k: v for k, v in norms.items() if v is not None}
    total = math.sqrt(sum(v * v for v in real.values()))
    top = max(real, key=lambda k: real[k]) if real else "-"
    low = min(real, key=lambda k: real[k]) if real else "-"
    msg = (f"{len(norms)} layer groups at step {step}: norms from {real.get(low, 0):.2g} ({low}) to "
           f"{real.get(top, 0):.2g} ({top}), total {total:.3g} before clipping")
    if total > EXPLODING_FAIL:
        return Check("FAIL", "gradients", f"{msg}: exploding; lower train.lr (clipping only hides it)")
    problems = []
    if total > EXPLODING_WARN:
        problems.append("large total norm (every step is clipped to train.grad_clip)")
    vanishing = [k for k, v in real.items() if v < VANISHING * max(real.values())]
    if vanishing:
        problems.append(f"vanishing in {', '.join(vanishing[:4])} (below {VANISHING:g} x the largest)")
    missing = [k for k, v in norms.items() if v is None]
    if missing:
        problems.append(f"no gradient reaches {', '.join(missing[:4])} (fine only if deliberately unused)")
    if problems:
        return Check("WARN", "gradients", f"{msg}; " + "; ".join(problems))
    return Check("PASS", "gradients", f"{msg}; none NaN/Inf, none vanishing or exploding")


def memorise(spec: RunSpec, model: Family, data: PreparedData, device: torch.device) -> tuple[Check, Check]:
    """Overfit one small batch with fixed noise: a working model and loss fall below MEMORISE_TARGET of the
    initial loss within MEMORISE_STEPS. Also judges gradient flow at GRAD_CHECK_STEP. Returns (gradients, memorisation)."""
    lr = max(spec.train.lr, MEMORISE_MIN_LR)
    train = spec.train.model_copy(update={"lr": lr, "warmup_steps": 0, "lr_schedule": "constant", "grad_accum": 1})
    engine = TorchEngine(model, train, device)
    engine.train(True)
    rows, length = MEMORISE_BATCH
    tokens, valid = _batch(data, rows, min(length, spec.data.seq_len), device)
    gen = torch.Generator(device=device)
    lr_note = f"lr {lr:g}" + ("" if lr == spec.train.lr else f" (the spec's {spec.train.lr:g} raised to {lr:g})")
    grads: Check | None = None
    first = last = float("nan")
    for step in range(MEMORISE_STEPS):
        gen.manual_seed(spec.train.seed)  # the same times and masks every step: a fixed target to overfit
        out = engine.forward(tokens, valid, gen)
        last = float(out.loss.detach())
        first = last if step == 0 else first
        diverged = not math.isfinite(last) or last > 100 * abs(first)
        engine.backward(out.loss)
        norms = layer_grad_norms(model)
        if grads is None and (step == GRAD_CHECK_STEP
                              or any(v is not None and not math.isfinite(v) for v in norms.values())):
            grads = gradient_verdict(norms, step)
        if diverged:
            if grads is None:  # zero-initialised layers have not moved yet: norms this early mean little
                total = math.sqrt(sum(v * v for v in norms.values() if v is not None))
                grads = Check("WARN", "gradients", f"not judged: training diverged at step {step}, before step "
                                                   f"{GRAD_CHECK_STEP} where gradient flow is judged (total norm "
                                                   f"then {total:.3g})")
            return grads, Check(
                "FAIL", "memorisation",
                f"diverged at step {step}: loss {last:.4g} (from {first:.4g}) on one batch at {lr_note}; the "
                "learning rate is far too high (or the loss is unstable): lower train.lr",
            )
        engine.step()
        if last <= MEMORISE_TARGET * first:
            return grads or gradient_verdict(norms, step), Check(
                "PASS", "memorisation",
                f"one batch ({rows}x{tokens.shape[1]} tokens, fixed noise) overfit from {first:.3g} to {last:.3g} "
                f"(<= {MEMORISE_TARGET:.0%}) in {step + 1} steps at {lr_note}",
            )
    return grads or gradient_verdict(layer_grad_norms(model), MEMORISE_STEPS), Check(
        "FAIL", "memorisation",
        f"could not overfit one batch ({rows}x{tokens.shape[1]} tokens, fixed noise): loss {first:.3g} -> {last:.3g} "
        f"({last / first:.0%} of the start; a working model gets below {MEMORISE_TARGET:.0%}) in {MEMORISE_STEPS} "
        f"steps at {lr_note}. If a model cannot memorise one batch the architecture, the loss or the LR is broken",
    )


def throughput_check(spec: RunSpec, data: PreparedData, device: torch.device) -> Check:
    """Time optimizer steps at the spec's real batch shape and precision; ETA for max_steps (evals excluded)."""
    model = build(spec, data, device)
    t = spec.train
    engine = TorchEngine(model, t, device)
    engine.train(True)
    tokens, valid = _batch(data, t.micro_batch_size, spec.data.seq_len, device)
    gen = torch.Generator(device=device).manual_seed(t.seed)

    def one_step() -> None:
        for _ in range(t.grad_accum):
            out = engine.forward(tokens, valid, gen)
            engine.backward(out.loss)
            engine.step()

    one_step()  # warm-up: allocations, kernel selection
    synchronize(device)
    times: list[float] = []
    while len(times) < TIMED_STEPS and sum(times) < TIMING_BUDGET_S:
        start = time.perf_counter()
        one_step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    per_step = t.micro_batch_size * t.grad_accum * spec.data.seq_len
    eta = t.max_steps * step_s
    workers = spec.scaling.num_workers
    shared = (f"; {workers} workers share this machine's CPUs, so expect slower steps"
              if workers > 1 and device.type == "cpu" else "")
    return Check(
        "PASS", "throughput",
        f"{fmt_count(per_step / step_s)} tokens/s per worker ({step_s * 1000:.0f} ms per step of "
        f"{t.micro_batch_size}x{t.grad_accum} sequences, median of {len(times)}, plain PyTorch on {device.type}); "
        f"{t.max_steps:,} steps -> ETA {fmt_duration(eta)} plus evals{shared}",
    )
