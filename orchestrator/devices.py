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
