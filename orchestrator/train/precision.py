"""``train.precision: auto``: bf16 where it pays, fp32 elsewhere, decided by device capability.

Rules (measurements behind them in docs/benchmarks.md):

* CUDA: bf16 when the GPU computes it natively (``orchestrator.devices.cuda_bf16_native``: Ampere and
  newer); tensor cores make it several times faster than fp32. fp32 on older GPUs.
* CPU: bf16 when the CPU has native bf16 dot products (x86 ``avx512_bf16`` / ``amx_bf16``, ARM
  ``bf16``) *and* the matmuls are big enough (:func:`cpu_bf16_pays`: d_model >= 256, or >= 128 with
  a vocab of >= 4096, where the output projection dominates). Without those instructions oneDNN
  emulates bf16 and it runs slower than fp32; on smaller models autocast's casts and the float32
  softmax cost more than bf16's faster multiply saves (measured 0.69x at d_model 64, 1.06x at 128
  with the byte vocab; 1.5-1.8x above the threshold).
* MPS and anything else: fp32.

A local run resolves ``auto`` on the driver, so ``spec.yaml`` and every checkpoint name the
precision actually used (which ``difflm eval`` must match to reproduce val/nll); a worker resolves
whatever is still ``auto`` (a cluster whose GPUs the driver cannot see) the same way.
"""

from __future__ import annotations

import functools
from pathlib import Path

from orchestrator.devices import cuda_bf16_native
from orchestrator.spec.run import RunSpec

# bf16 autocast against fp32 on a Zen 4 core (avx512_bf16), CPU seconds per step (docs/benchmarks.md):
# d_model 64 / byte vocab 0.69x, 128 / byte 1.06x, 128 / 8192 BPE 1.56x, 256 / byte 1.53x, 256 / 8192 1.81x.
CPU_BF16_MIN_WIDTH = 256
CPU_BF16_MIN_WIDTH_LARGE_VOCAB = 128
LARGE_VOCAB = 4096


def cpu_bf16_pays(d_model: int, vocab_size: int | None) -> bool:
    """Whether the model's matmuls are big enough for bf16 to beat fp32 on a CPU with native bf16."""
    if d_model >= CPU_BF16_MIN_WIDTH:
        return True
    return d_model >= CPU_BF16_MIN_WIDTH_LARGE_VOCAB and (vocab_size or 0) >= LARGE_VOCAB


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


def auto_precision(device_type: str, d_model: int, vocab_size: int | None = None) -> tuple[str, str]:
    """(precision, reason) for ``train.precision: auto`` on ``device_type`` for a model of this width and vocab."""
    if device_type == "cuda":
        if cuda_bf16_native():  # not is_bf16_supported(): that says True for emulated bf16 too
            return "bf16", "GPU with native bf16"
        return "fp32", "GPU without native bf16"
    if device_type == "cpu":
        if not cpu_has_native_bf16():
            return "fp32", "CPU without native bf16 instructions"
        size = f"d_model {d_model}, vocab {vocab_size if vocab_size else '?'}"
        if not cpu_bf16_pays(d_model, vocab_size):
            return "fp32", f"{size}: too small for bf16 to pay on a CPU"
        return "bf16", f"CPU with native bf16, {size}"
    return "fp32", f"{device_type}: fp32"


def resolve_precision(spec: RunSpec, device_type: str, vocab_size: int | None = None) -> tuple[RunSpec, str | None]:
    """The spec with ``auto`` replaced by a concrete precision, and the reason (None if it was explicit).

    Engines built from a spec still saying ``auto`` (in-process callers that skip this) run fp32."""
    if spec.train.precision != "auto":
        return spec, None
    precision, reason = auto_precision(device_type, spec.model.dims()["d_model"], vocab_size)
    train = spec.train.model_copy(update={"precision": precision})
    return spec.model_copy(update={"train": train}), f"precision {precision} (auto: {reason})"
