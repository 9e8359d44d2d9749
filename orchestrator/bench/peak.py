"""The FLOP/s a device can do, and the FLOPs one training step needs: the two halves of utilisation (MFU).

Peak: on a GPU the vendor's rated dense peak for the precision (a table of known parts; a measured
large matmul where the part is unknown); on a CPU a large matmul measured on the spot with the
threads the benchmark uses, since a CPU's rating depends on its clock, vector units and core count.

FLOPs per step: counted, not estimated, with ``torch.utils.flop_counter.FlopCounterMode`` over one
forward + backward at the benchmark's batch, with attention on the math backend so its matmuls are
counted too (the fused CPU kernel is not). Matmul FLOPs only, as MFU is usually defined.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from orchestrator.devices import synchronize

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets, by a substring of
# torch.cuda.get_device_name(). fp32 is the plain (non-TF32) rate: difflm leaves
# torch.backends.cuda.matmul.allow_tf32 at its default (off).
RATED_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),  # SXM5
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s
    source: str  # how it was obtained, for the report


def rated_peak(device_name: str, precision: str) -> float | None:
    """The datasheet peak (FLOP/s) of a known GPU for ``precision``, or None."""
    for part, rates in RATED_TFLOPS:
        if part.lower() in device_name.lower():
            tflops = rates.get(precision)
            return None if tflops is None else tflops * 1e12
    return None


def measure_matmul(device: torch.device, precision: str, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) matmul in ``precision`` over ``repeats`` timed runs (one warm-up)."""
    dtype = DTYPES[precision]
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_peak(device: torch.device, precision: str, n: int | None = None) -> Peak:
    """Rated peak on a known GPU, else a measured matmul (2048^3 on a CPU, 8192^3 on a GPU by default)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        rated = rated_peak(name, precision)
        if rated is not None:
            return Peak(rated, f"rated dense {precision} peak of {name}")
    size = n or (2048 if device.type == "cpu" else 8192)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return Peak(measure_matmul(device, precision, size), f"measured {size}^3 {precision} matmul{threads}")


def step_flops(step: Callable[[], None]) -> float:
    """Matmul FLOPs of one call of ``step`` (a forward + backward), attention included (math backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        step()
    return float(counter.get_total_flops())
