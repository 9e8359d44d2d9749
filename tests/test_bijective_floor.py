"""The bijective flow term has a floor set by the tanh clamp of the coupling scales, and docs/families.md
states it (it used to say the term could fall "without limit")."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from difflm.families.bijective import BijectiveBackbone
from difflm.families.bijective.flow import S_MAX

DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"


def floor(d: int, k: int) -> float:
    """Lowest value of the per-token likelihood term: z = 0 and every log-scale at +S_MAX."""
    return d * (0.5 * math.log(2 * math.pi) - S_MAX * k)


def _flow(d: int, k: int) -> BijectiveBackbone:
    torch.manual_seed(0)
    return BijectiveBackbone(20, 20, d, k, 2, cond_dim=8).double()


def test_logdet_never_exceeds_the_clamp_and_reaches_it_when_saturated() -> None:
    d, k = 16, 2
    bb = _flow(d, k)
    h = torch.randn(2, 5, d, dtype=torch.float64)
    c = bb.condition(None, 2, h.device)
    for block in bb.flow:  # random sub-networks with large outputs: log-scales anywhere in (-S_MAX, S_MAX)
        for proj in (block.proj1, block.proj2):
            torch.nn.init.normal_(proj.weight, std=5.0)
    _, logdet = bb.flow_forward(h, c)
    assert logdet.abs().max() < S_MAX * d * k
    with torch.no_grad():
        for block in bb.flow:  # saturate: raw scale +1000 for every channel, whatever the input
            for proj in (block.proj1, block.proj2):
                proj.weight.zero_()
                proj.bias.zero_()
                proj.bias[: d // 2] = 1000.0
    _, logdet = bb.flow_forward(h, c)
    assert torch.allclose(logdet, torch.full_like(logdet, S_MAX * d * k))
    # the per-token term -log N(z) - log|det| is at least the floor (here z is large, so well above it)
    z, logdet = bb.flow_forward(h, c)
    term = 0.5 * z.pow(2).sum(-1) + 0.5 * d * math.log(2 * math.pi) - logdet
    assert (term >= floor(d, k)).all()


def test_docs_state_the_floor() -> None:
    text = " ".join(DOC.read_text().split())
    assert "without limit" not in text
    for k in (1, 2, 4):
        assert f"{floor(64, k):.1f}" in text, (k, floor(64, k))
