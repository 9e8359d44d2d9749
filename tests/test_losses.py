"""difflm.losses.token_cross_entropy: the chunked, copy-free cross-entropy equals the float32 reference,
values and gradients, for float32 and bfloat16 logits; MDLM's loss through it equals the SUBS formula."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import difflm.losses as losses
from difflm.families.config import DiffusionConfig
from difflm.families.mdlm.model import build_mdlm
from difflm.losses import token_cross_entropy
from difflm.models.config import ModelConfig
from tests.helpers import randomize_zero_init


def _reference(logits: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """The copying version: float32 logits, the extra columns dropped."""
    return F.cross_entropy(logits.float()[:, :classes], target, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float32_reference_values_and_grads(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    monkeypatch.setattr(losses, "_CPU_CHUNK", 7 * 40)  # 7 rows of 40 classes a chunk: 53 rows = 7 full + 1 partial
    g = torch.Generator().manual_seed(0)
    n, classes, extra = 53, 40, 1
    base = (torch.randn(n, classes + extra, generator=g) * 4).to(dtype)
    base[:, classes:] = 30.0  # a huge logit outside the softmax must not matter (MDLM's mask column)
    target = torch.randint(0, classes, (n,), generator=g)
    weights = torch.rand(n, generator=g)  # a non-uniform upstream gradient

    a = base.clone().requires_grad_()
    got = token_cross_entropy(a, target, classes)
    (got * weights).sum().backward()

    b = base.float().clone().requires_grad_()  # bf16 -> fp32 is exact: the same logits in float32
    want = _reference(b, target, classes)
    (want * weights).sum().backward()

    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert a.grad is not None and a.grad.dtype == dtype
    assert torch.all(a.grad[:, classes:] == 0)
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}  # bf16: 8 bits
    torch.testing.assert_close(a.grad.float(), b.grad, **tol)


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        token_cross_entropy(torch.zeros(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="classes must be"):
        token_cross_entropy(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), classes=6)


def _subs_loss(model, tokens, valid, gen):  # type: ignore[no-untyped-def]
    """MDLM's NELBO written as before this change: float32 SUBS logits (mask logit -inf), F.cross_entropy."""
    B, L = tokens.shape
    t = model.sample_times(B, tokens.device, gen)
    sigma, move = model.schedule.sigma(t), model.schedule.move_chance(t)
    masked = (torch.rand(B, L, generator=gen, dtype=t.dtype) < move[:, None]) & valid
    xt = torch.where(masked, model.mask_id, tokens)
    ce = F.cross_entropy(model.subs_logits(xt, sigma).flatten(0, 1), tokens.flatten(), reduction="none").view(B, L)
    weight = torch.where(masked, model.schedule.nelbo_weight(t)[:, None], 0.0)
    return (weight * ce.masked_fill(~masked, 0.0)).sum() / valid.sum()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mdlm_loss_equals_subs_formula(precision: str) -> None:
    """Same logits, same NELBO: the chunked CE changes where the float32 math happens, not the result.
    Under bf16 autocast the reference upcasts the same bf16 logits, so both agree to float32 rounding;
    and the bf16 loss stays within bf16 matmul error of the fp32 one."""
    torch.manual_seed(0)
    model = build_mdlm(ModelConfig(size=None, d_model=32, n_layers=2, n_heads=2, cond_dim=16), DiffusionConfig(schedule="loglinear", likelihood_weight=1.0), 50)
    randomize_zero_init(model)
    tokens = torch.randint(0, 50, (4, 24))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with ctx:
        got = model(tokens, valid, torch.Generator().manual_seed(3)).loss
        want = _subs_loss(model, tokens, valid, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    fp32 = model(tokens, valid, torch.Generator().manual_seed(3)).loss
    assert got.dtype == torch.float32
    assert abs(got.item() - fp32.item()) < 0.02 * fp32.item()
