"""Device choice in one place: ``auto`` resolution, availability checks and synchronisation.

``difflm train`` resolves ``scaling.device`` on the driver (a cluster's GPUs count even when the
driver has none); ``difflm sample|eval|denoise`` and the benchmarks resolve ``--device`` on this
machine and fail with a user error when it lacks the device asked for.
"""

from __future__ import annotations

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
