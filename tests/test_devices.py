"""Device selection and precision on devices this CPU box does not have: CUDA and MPS faked by monkeypatching
torch's availability probes (docs/scaling.md, "CUDA and MPS code paths"). In-process, no GPU needed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from orchestrator import devices
from orchestrator.train.precision import auto_precision


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], name: str = "Fake GPU") -> None:
    """A visible CUDA GPU of ``capability``; ``is_bf16_supported`` behaves like torch's (emulation counts
    unless ``including_emulation=False``)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability[0] >= 8)


def _fake_mps(monkeypatch: pytest.MonkeyPatch, available: bool, macos14: bool = True) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14 or major < 14)


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fake_mps(monkeypatch, False)
    assert devices.resolve_device("auto") == "cpu"
    assert devices.resolve_device("auto", cluster_gpus=2.0) == "cuda"  # a cluster's GPUs the driver cannot see
    _fake_mps(monkeypatch, True)
    assert devices.resolve_device("auto") == "mps"
    assert devices.local_device("auto") == torch.device("mps")
    with pytest.raises(Exception, match=r"--device cuda: no CUDA device is visible here"):
        devices.local_device("cuda")
    _fake_cuda(monkeypatch, (9, 0))
    assert devices.resolve_device("auto") == "cuda"
    assert devices.resolve_device("cpu") == "cpu"  # an explicit choice is kept


def test_bf16_is_native_only_from_ampere_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's is_bf16_supported() says True on a V100/T4 (emulated): auto must pick fp32 there, and an
    explicit bf16 is a user error naming the GPU."""
    _fake_cuda(monkeypatch, (7, 0), "Tesla V100")
    assert torch.cuda.is_bf16_supported()  # the trap: emulation counts by default
    assert not devices.cuda_bf16_native()
    assert auto_precision("cuda", 768, 50257) == ("fp32", "GPU without native bf16")
    assert devices.precision_problem("cuda", "bf16") == (
        "train.precision bf16: Tesla V100 (compute capability 7.0) has no native bf16 (Ampere, 8.0, or newer); "
        "use fp16 or fp32 (or auto)")
    assert devices.precision_problem("cuda", "fp16") is None
    _fake_cuda(monkeypatch, (8, 9), "RTX 4090")
    assert devices.cuda_bf16_native() and auto_precision("cuda", 768, 50257) == ("bf16", "GPU with native bf16")
    assert devices.precision_problem("cuda", "bf16") is None


def test_precision_per_device_for_mps_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mps(monkeypatch, True, macos14=False)
    assert devices.precision_problem("mps", "bf16") == "train.precision bf16 on MPS needs macOS 14 or newer; use fp32 (or auto)"
    _fake_mps(monkeypatch, True, macos14=True)
    assert devices.precision_problem("mps", "bf16") is None
    assert auto_precision("mps", 768, 50257)[0] == "fp32"
    assert devices.precision_problem("mps", "fp16") == "train.precision fp16 needs CUDA; use bf16 or fp32 on mps"
    assert devices.precision_problem("cpu", "fp16") == "train.precision fp16 needs CUDA; use bf16 or fp32 on cpu"
    assert devices.precision_problem("cpu", "bf16") is None  # runs (emulated where not native); auto avoids it


def test_tf32_only_on_cuda() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert devices.configure_device(torch.device("cpu")) is None
        assert torch.get_float32_matmul_precision() == "highest"  # CPU fp32 stays exact
        note = devices.configure_device(torch.device("cuda"))
        assert note is not None and "TF32" in note and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_mps_workers_fall_back_to_cpu_for_missing_ops_unless_told_not_to() -> None:
    assert devices.worker_env("mps", {}) == {"PYTORCH_ENABLE_MPS_FALLBACK": "1"}
    assert devices.worker_env("mps", {"PYTORCH_ENABLE_MPS_FALLBACK": "0"}) == {}  # the user's value wins
    assert devices.worker_env("cuda", {}) == {} and devices.worker_env("cpu", {}) == {}


def test_batches_go_through_pinned_memory_non_blocking_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []

    def pin(self: torch.Tensor) -> torch.Tensor:
        calls.append(("pin", None))
        return self

    def to(self: torch.Tensor, device: Any, non_blocking: bool = False) -> torch.Tensor:
        calls.append(("to", (torch.device(device).type, non_blocking)))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", to)
    batch = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert devices.host_to_device(batch, torch.device("cuda", 0)).tolist() == batch.tolist()
    assert calls == [("pin", None), ("to", ("cuda", True))]
    calls.clear()
    devices.host_to_device(batch, torch.device("mps"))
    assert calls == [("to", ("mps", False))]  # no pinning, a blocking copy
