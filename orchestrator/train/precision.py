"""``train.precision: auto``: bf16 where it pays, fp32 elsewhere, decided by device capability.

Rules (measurements behind them in docs/benchmarks.md):

* CUDA: bf16 when the GPU computes it natively (``torch.cuda.is_bf16_supported``: Ampere and
  newer); tensor cores make it several times faster than fp32. fp32 on older GPUs.
* CPU: bf16 when the CPU has native bf16 dot products (x86 ``avx512_bf16`` / ``amx_bf16``, ARM
  ``bf16``) *and* the model is at least :data:`CPU_BF16_MIN_WIDTH` wide. Without those instructions
  oneDNN emulates bf16 and it runs slower than fp32; below that width the matmuls are too small
  for bf16's faster multiply to cover autocast's casts and the float32 softmax.
* MPS and anything else: fp32.

A local run resolves ``auto`` on the driver, so ``spec.yaml`` and every checkpoint name the
precision actually used (which ``difflm eval`` must match to reproduce val/nll); a worker resolves
whatever is still ``auto`` (a cluster whose GPUs the driver cannot see) the same way.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from orchestrator.spec.run import RunSpec

# Narrowest d_model at which bf16 autocast beat fp32 on a CPU with avx512_bf16 (docs/benchmarks.md).
CPU_BF16_MIN_WIDTH = 256


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists a bf16 dot-product instruction set (Linux; False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def auto_precision(device_type: str, d_model: int) -> tuple[str, str]:
    """(precision, reason) for ``train.precision: auto`` on ``device_type`` at width ``d_model``."""
    if device_type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", "GPU with native bf16"
        return "fp32", "GPU without native bf16"
    if device_type == "cpu":
        if not cpu_has_native_bf16():
            return "fp32", "CPU without native bf16 instructions"
        if d_model < CPU_BF16_MIN_WIDTH:
            return "fp32", f"d_model {d_model} < {CPU_BF16_MIN_WIDTH}, where bf16 stops paying on a CPU"
        return "bf16", f"CPU with native bf16, d_model {d_model} >= {CPU_BF16_MIN_WIDTH}"
    return "fp32", f"{device_type}: fp32"


def resolve_precision(spec: RunSpec, device_type: str) -> tuple[RunSpec, str | None]:
    """The spec with ``auto`` replaced by a concrete precision, and the reason (None if it was explicit)."""
    if spec.train.precision != "auto":
        return spec, None
    precision, reason = auto_precision(device_type, spec.model.dims()["d_model"])
    train = spec.train.model_copy(update={"precision": precision})
    return spec.model_copy(update={"train": train}), f"precision {precision} (auto: {reason})"
