"""Device choice in one place: ``auto`` resolution, availability checks and synchronisation.

``difflm train`` resolves ``scaling.device`` on the driver (a cluster's GPUs count even when the
driver has none); ``difflm sample|eval|denoise`` and the benchmarks resolve ``--device`` on this
machine and fail with a user error when it lacks the device asked for.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from orchestrator.errors import SpecError


def resolve_device(requested: str, cluster_gpus: float | None = None) -> str:
    """auto -> cuda if GPUs exist (locally, or in the cluster when ``cluster_gpus`` is given), else mps, else cpu.

    Any other value is returned as is; whether it is available is checked by the caller
    (:func:`local_device` here, ``launch.check_resources`` for training)."""
    if requested != "auto":
        return requested
    if (cluster_gpus or 0) > 0 or torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def local_device(name: str) -> torch.device:
    """The device ``name`` (auto, cuda, mps, cpu) on this machine; SpecError for one this machine lacks."""
    resolved = resolve_device(name)
    if resolved == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda: no CUDA device is visible here; use --device cpu (or auto)")
    if resolved == "mps" and not torch.backends.mps.is_available():
        raise SpecError("--device mps: MPS is not available here; use --device cpu (or auto)")
    return torch.device(resolved)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (CUDA/MPS), so wall-clock timings measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _rss_bytes(field: str = "VmRSS") -> int | None:
    """A memory line of /proc/self/status in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def start_memory_window(device: torch.device) -> int | None:
    """Begin measuring peak memory on ``device``; returns the baseline in bytes (None where unmeasurable).

    CUDA: bytes allocated now, with the allocator's peak reset. CPU (Linux): resident set size now,
    after glibc hands freed pages back (so it counts live memory) and with the kernel's high-water
    mark (VmHWM) reset to it. :func:`peak_memory_above` then gives what was added at the peak."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
    except (OSError, AttributeError):
        return None
    return _rss_bytes()


def peak_memory_above(device: torch.device, baseline: int | None) -> int | None:
    """Peak bytes above ``baseline`` since :func:`start_memory_window` (CUDA allocator or process RSS)."""
    if baseline is None:
        return None
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline
    peak = _rss_bytes("VmHWM")
    return None if peak is None else max(0, peak - baseline)


# ------------------------------------------------------------------ per-device set-up (docs/scaling.md)
def cuda_bf16_native() -> bool:
    """Whether the visible CUDA GPU computes bf16 natively (Ampere, compute capability 8.0, and newer).

    ``torch.cuda.is_bf16_supported()`` alone says True on older GPUs too (its ``including_emulation``
    defaults to True since torch 2.3): a T4 or V100 would then train "bf16" through slow emulation."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch without the argument: the capability is the test
        return torch.cuda.get_device_capability()[0] >= 8


def mps_bf16_supported() -> bool:
    """bf16 on Apple's GPU needs macOS 14 (MPS has no bf16 kernels before)."""
    return bool(torch.backends.mps.is_available() and torch.backends.mps.is_macos_or_newer(14, 0))


def precision_problem(device_type: str, precision: str) -> str | None:
    """Why ``precision`` cannot train on ``device_type`` here (a user error to print), or None.

    fp16 needs CUDA (the spec already refuses it for cpu/mps; this covers ``device: auto``). bf16 on a
    GPU without native bf16 is refused rather than emulated (several times slower than fp32); bf16 on
    MPS needs macOS 14. bf16 on a CPU without native instructions runs (oneDNN emulates it) and is
    slower; ``precision: auto`` never picks it there (orchestrator.train.precision)."""
    if precision == "fp16" and device_type != "cuda":
        return f"train.precision fp16 needs CUDA; use bf16 or fp32 on {device_type}"
    if precision == "bf16" and device_type == "cuda" and torch.cuda.is_available() and not cuda_bf16_native():
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        return (f"train.precision bf16: {name} (compute capability {major}.{minor}) has no native bf16 (Ampere, "
                "8.0, or newer); use fp16 or fp32 (or auto)")
    if precision == "bf16" and device_type == "mps" and not mps_bf16_supported():
        return "train.precision bf16 on MPS needs macOS 14 or newer; use fp32 (or auto)"
    return None


def configure_device(device: torch.device) -> str | None:
    """Process-wide settings for training on ``device``; returns a note for the log (None: nothing set).

    CUDA: fp32 matmuls on TF32 tensor cores (``torch.set_float32_matmul_precision("high")``): on
    Ampere and newer 8x the fp32 matmul rate for a 10-bit mantissa in the products (accumulation stays
    fp32), what PyTorch Lightning and most trainers enable; it only matters for ``precision: fp32``
    (``auto`` picks bf16 on those GPUs) and is deterministic on one GPU, so exact resume holds. The
    CPU's and MPS's fp32 matmuls are left exact."""
    if device.type != "cuda":
        return None
    torch.set_float32_matmul_precision("high")
    return "fp32 matmuls on TF32 tensor cores (torch.set_float32_matmul_precision('high'))"


def worker_env(device_type: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment a training worker's process needs before it imports torch.

    MPS: ``PYTORCH_ENABLE_MPS_FALLBACK=1``, so an op MPS lacks runs on the CPU (slower, with a warning
    from torch) instead of failing the run hours in; a value the user set wins (``0`` to see the error)."""
    environ = dict(os.environ) if environ is None else environ
    if device_type == "mps" and "PYTORCH_ENABLE_MPS_FALLBACK" not in environ:
        return {"PYTORCH_ENABLE_MPS_FALLBACK": "1"}
    return {}


def host_to_device(batch: Any, device: torch.device) -> torch.Tensor:
    """A host (numpy) batch on ``device``. CUDA: through pinned memory with a non-blocking copy (from
    pageable memory CUDA would sync the stream before the copy: the host would wait for the previous
    step's kernels every step); the caching host allocator keeps the pinned block until the copy ran.
    MPS and CPU: a plain copy (non_blocking from pageable memory to MPS has given wrong data in past
    torch releases; token ids are a few KiB, nothing to overlap)."""
    tokens = torch.from_numpy(batch)
    if device.type == "cuda":
        return tokens.pin_memory().to(device, non_blocking=True)
    return tokens.to(device)
