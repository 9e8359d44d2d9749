"""AR family: exact next-token NLL, causality, sampling, memorisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from difflm.families import build_model
from difflm.families.ar.model import AR
from difflm.families.config import DiffusionConfig
from difflm.models import Backbone, ModelConfig
from difflm.sampling import SampleOptions, get_sampler
from tests.helpers import randomize_zero_init

V, L = 20, 16


def make(bos_id: int | None = None) -> AR:
    torch.manual_seed(0)
    m = AR(Backbone(V, V, d_model=32, n_layers=2, n_heads=4, cond_dim=16, causal=True), V, bos_id=bos_id)
    randomize_zero_init(m)
    return m


def data(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, V, (batch, L), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.ones_like(tokens, dtype=torch.bool)


def test_loss_is_manual_cross_entropy() -> None:
    m = make()
    tokens, valid = data()
    valid[2, 12:] = False  # padded tail: targets 12.. of row 2 are not counted
    out = m(tokens, valid)
    logits = m.backbone(tokens)  # (B, L, V)
    per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none").view(3, L - 1)
    counted = valid[:, 1:]
    expected_sum = per_tok[counted].double().sum()
    assert out.num_tokens.item() == 3 * (L - 1) - 4 and out.num_tokens.dtype == torch.int64
    torch.testing.assert_close(out.nll_sum, expected_sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss.double(), expected_sum / counted.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.metrics["ce"], out.loss.detach())
    # At init (zero output layer) the model is uniform: loss = log V exactly.
    torch.manual_seed(0)
    fresh = AR(Backbone(V, V, 32, 2, 4, 16, causal=True), V)
    assert fresh(tokens, valid).loss.item() == pytest.approx(math.log(V), rel=1e-6)
    # Nothing valid: zero loss, no nan.
    empty = m(tokens, torch.zeros_like(valid))
    assert empty.loss.item() == 0.0 and empty.num_tokens.item() == 0


def test_loss_ignores_generator_and_future() -> None:
    m = make()
    tokens, valid = data()
    a = m(tokens, valid, torch.Generator().manual_seed(0)).loss
    b = m(tokens, valid, torch.Generator().manual_seed(1)).loss
    assert a.item() == b.item()  # exact NLL: no noise
    logits = m.backbone(tokens)
    changed = tokens.clone()
    changed[:, 9] = (tokens[:, 9] + 1) % V
    logits2 = m.backbone(changed)
    torch.testing.assert_close(logits[:, :9], logits2[:, :9], rtol=0, atol=1e-6)  # no peeking at the future
    assert (logits[:, 9:] - logits2[:, 9:]).abs().max() > 1e-4


def test_sampling() -> None:
    m = make(bos_id=5)
    g = torch.Generator().manual_seed(0)
    s = m.sample(4, 10, steps=999, generator=g)
    assert s.shape == (4, 10) and s.dtype == torch.int64
    assert torch.all(s[:, 0] == 5) and torch.all((s >= 0) & (s < V))
    assert torch.equal(s, m.sample(4, 10, steps=1, generator=torch.Generator().manual_seed(0)))
    template = torch.tensor([1, 2, 3, 0, 0, 0, 0, 0])
    fixed = torch.arange(8) < 3
    p = get_sampler(m, "ancestral")(SampleOptions(num=2, length=8, steps=1, template=template, fixed=fixed)).tokens
    assert p.shape == (2, 8) and torch.equal(p[:, :3], template[:3].expand(2, 3))
    nobos = make().sample(64, 2, steps=1, generator=torch.Generator().manual_seed(0))
    assert nobos[:, 0].unique().numel() > 5  # no BOS: first token drawn uniformly


def test_builder_and_validation() -> None:
    model = build_model(ModelConfig(family="ar", size="tiny"), DiffusionConfig(), 259, bos_id=256, eos_id=257)
    assert isinstance(model, AR) and model.bos_id == 256 and model.backbone.causal
    assert model.backbone.vocab_in == model.backbone.vocab_out == 259
    with pytest.raises(ValueError):
        AR(Backbone(V, V, 32, 1, 4, 16, causal=False), V)
    with pytest.raises(ValueError):
        AR(Backbone(V, V, 32, 1, 4, 16, causal=True), V, bos_id=V)


def test_memorises_one_batch() -> None:
    torch.manual_seed(0)
    sentence = b"the quick brown fox jumps over t"
    tokens = torch.tensor(list(sentence)).repeat(4, 1)  # (4, 32)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    m = AR(Backbone(256, 256, d_model=64, n_layers=2, n_heads=4, cond_dim=32, causal=True), 256)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    initial = m(tokens, valid).loss.item()
    for _ in range(150):
        loss = m(tokens, valid).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = m(tokens, valid).loss.item()
    assert initial == pytest.approx(math.log(256), rel=1e-5)
    assert final < 0.01, final
    fixed = torch.arange(32) < 1
    opts = SampleOptions(num=2, length=32, steps=32, template=tokens[0], fixed=fixed)
    out = get_sampler(m, "ancestral")(opts, torch.Generator().manual_seed(0)).tokens
    assert bytes(out[0].tolist()) == sentence and bytes(out[1].tolist()) == sentence
