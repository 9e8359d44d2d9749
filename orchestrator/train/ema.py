"""Exponential moving average of the weights, for validation, samples and the saved inference weights.

Why not ``torch.optim.swa_utils.AveragedModel``: it deep-copies the module in the module's
dtype, and a bf16 copy cannot follow a 0.9999 average (an update of 1e-4 of a weight is
below bf16's resolution, so the average would never move); it also needs whole parameters,
which ZeRO-3 does not have on any rank. Here the average is an fp32 shadow of whatever the
engine says defines this rank's weights (:meth:`Engine.ema_targets`):

* torch engine, ZeRO-0/1/2: the full parameters (identical on every rank);
* ZeRO-3: each parameter's local partition (``ds_tensor``): memory 1/world of the model per
  rank, the update never gathers, and using the EMA means writing those partitions, which
  the next forward gathers like any other weights. Its checkpoint is one file per rank
  (``ema/rank<r>.safetensors``, resumable at the same world size, like DeepSpeed's own
  ZeRO-3 files) plus the gathered ``ema.safetensors`` for inference.

Decay is warmed up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (as MDLM's
training does), so the average is useful long before 1 / (1 - decay) steps.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

EMA_FILE = "ema.safetensors"


class EMA:
    """fp32 shadow of named tensors, updated in place with one fused lerp per optimizer step."""

    def __init__(self, targets: list[tuple[str, Tensor]], decay: float, *, partitioned: bool,
                 after_swap: Callable[[], None] = lambda: None) -> None:
        self.names = [n for n, _ in targets]
        self.live = [t for _, t in targets]
        self.shadow = [t.detach().float().clone() for t in self.live]
        self.decay = decay
        self.partitioned = partitioned
        device = self.live[0].device if self.live else torch.device("cpu")
        self._n = torch.zeros((), device=device)  # applied updates, on the device (no sync to count)
        self._after_swap = after_swap

    @property
    def updates(self) -> int:
        return int(self._n.item())

    @updates.setter
    def updates(self, n: int) -> None:
        self._n.fill_(float(n))

    @torch.no_grad()
    def update(self, skipped: Tensor | None = None) -> None:
        """shadow <- shadow + w (live - shadow), w = (1 - d) * (1 - skipped): a skipped (non-finite) step
        changes neither the average nor the warm-up count. All on the device: no host sync."""
        decay = torch.clamp((1 + self._n) / (10 + self._n), max=self.decay)
        keep = 1.0 - skipped if skipped is not None else torch.ones_like(self._n)
        weight = (1.0 - decay) * keep
        live = [t.detach() if t.dtype == torch.float32 else t.detach().float() for t in self.live]
        torch._foreach_lerp_(self.shadow, live, [weight] * len(live))  # 0-d weights broadcast; no .item()
        self._n += keep

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Inside: the live tensors hold the average (copied in place, so optimizer and DeepSpeed
        references stay valid); after: the trained weights again, bit for bit."""
        backup = [t.detach().clone() for t in self.live]
        for t, s in zip(self.live, self.shadow):
            t.copy_(s)
        self._after_swap()
        try:
            yield
        finally:
            for t, b in zip(self.live, backup):
                t.copy_(b)
            self._after_swap()

    # ---------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, Tensor]:
        return {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor], source: Path) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"{source}: no EMA for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        for n, s in zip(self.names, self.shadow):
            t = tensors[n]
            if t.shape != s.shape:
                raise ValueError(f"{source}: EMA of {n} has shape {tuple(t.shape)}, the model {tuple(s.shape)}")
            s.copy_(t.to(s.device, s.dtype))


def rank_file(rank: int) -> str:
    return f"ema/rank{rank}.safetensors"
