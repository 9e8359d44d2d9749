"""Device, engine and precision: what `difflm train` will use for this spec on this machine.

DeepSpeed is imported here (orchestrator/ only, never difflm/) to prove it is installed and
importable before a run depends on it.
"""

from __future__ import annotations

import os

import torch

from orchestrator.devices import resolve_device
from orchestrator.doctor.report import Check
from orchestrator.errors import SpecError
from orchestrator.spec.run import RunSpec
from orchestrator.train.launch import check_resources, local_resources


def device_check(spec: RunSpec) -> tuple[Check, torch.device | None]:
    """Which device training (and the rest of the doctor) will use; FAIL when this machine lacks it."""
    cpus, gpus = local_resources()
    device = resolve_device(spec.scaling.device)
    try:
        check_resources(spec, device, cpus, gpus, "this machine")
    except SpecError as exc:
        return Check("FAIL", "device", f"{exc} (checked on this machine; with --address a cluster may have it)"), None
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        what = f"cuda: {int(gpus)} x {name}, {spec.scaling.num_workers} worker(s)"
    elif device == "mps":
        what = "mps: Apple GPU, one worker"
    else:
        why = " (no CUDA or MPS device here)" if spec.scaling.device == "auto" else ""
        what = f"cpu{why}: {os.cpu_count()} cores, {spec.scaling.num_workers} worker(s)"
    return Check("PASS", "device", what), torch.device(device)


def engine_check(spec: RunSpec, device: torch.device) -> Check:
    """DeepSpeed will wrap the model, or the plain-torch fallback runs (MPS, or scaling.deepspeed: false)."""
    if device.type == "mps":
        return Check("PASS", "engine", "plain PyTorch: DeepSpeed has no MPS accelerator, so training runs without it")
    if not spec.scaling.deepspeed:
        return Check("PASS", "engine", "plain PyTorch (scaling.deepspeed: false): AdamW, clipping, accumulation")
    # On a CPU, name the accelerator so DeepSpeed's import does not print its "unable to detect" warning.
    quiet = device.type == "cpu" and "DS_ACCELERATOR" not in os.environ
    if quiet:
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        import deepspeed  # noqa: F401  (orchestrator only)
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return Check(
            "FAIL", "engine",
            f"scaling.deepspeed is on but DeepSpeed cannot be imported ({type(exc).__name__}: {exc}); "
            "install it (pip install deepspeed) or set scaling.deepspeed: false",
        )
    finally:
        if quiet:
            os.environ.pop("DS_ACCELERATOR", None)
    version = getattr(deepspeed, "__version__", "?")
    return Check("PASS", "engine", f"DeepSpeed {version} will wrap the model (ZeRO-{spec.scaling.zero_stage}, "
                                   f"{spec.train.precision})")


def bf16_supported(device: torch.device) -> bool:
    """Can this device run a bf16 matmul (CUDA: hardware support; CPU/MPS: try one)?"""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        a = torch.ones(8, 8, device=device, dtype=torch.bfloat16)
        return bool(torch.isfinite((a @ a).float()).all())
    except (RuntimeError, TypeError):
        return False


def precision_check(spec: RunSpec, device: torch.device, auto: str | None = None) -> Check:
    """bf16/fp16 support for the spec's precision, and a hint when bf16 is there but unused. ``auto``:
    what ``train.precision: auto`` resolved to (:func:`orchestrator.train.precision.resolve_precision`)."""
    p = spec.train.precision
    bf16 = bf16_supported(device)
    if p == "bf16" and not bf16:
        return Check("FAIL", "precision", f"train.precision bf16, but {device.type} here cannot run bf16; use fp32")
    if p == "fp16" and device.type != "cuda":
        return Check("FAIL", "precision", f"train.precision fp16 needs CUDA; this run would be on {device.type}")
    if p == "bf16" and device.type == "cpu":
        return Check("PASS", "precision", "bf16 works on this CPU (autocast); it saves memory but is often no "
                                          "faster than fp32 on CPUs without bf16 units")
    if p == "auto" and auto:
        return Check("PASS", "precision", f"{auto} on {device.type}")
    hint = "; bf16 is supported here and would halve activation memory" if p == "fp32" and bf16 and device.type == "cuda" else ""
    return Check("PASS", "precision", f"{p} on {device.type} (bf16 support: {'yes' if bf16 else 'no'}){hint}")
