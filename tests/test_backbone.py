"""DiT backbone: shapes, zero-init, time conditioning, causality, embedding entry point, size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflm.families import build_model
from difflm.families.config import DiffusionConfig
from difflm.models import SIZE_PRESETS, Backbone, ModelConfig
from tests.helpers import randomize_zero_init

V_IN, V_OUT, L = 20, 23, 16


def tiny(causal: bool = False, dropout: float = 0.0) -> Backbone:
    torch.manual_seed(0)
    return Backbone(V_IN, V_OUT, d_model=32, n_layers=2, n_heads=4, cond_dim=16, dropout=dropout, causal=causal)


def ids(batch: int = 2, length: int = L, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V_IN, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_zero_init_output() -> None:
    m = tiny()
    x = ids()
    out = m(x, torch.rand(2))
    assert out.shape == (2, L, V_OUT) and out.dtype == torch.float32
    # Zero-initialised final layer: a constant (all-zero) predictor at init.
    assert torch.count_nonzero(out) == 0
    assert m(ids(3, 7)).shape == (3, 7, V_OUT)  # any length: rotary, no position table
    assert m(ids(1, 40)).shape == (1, 40, V_OUT)


def test_time_conditioning_on_and_off() -> None:
    m = tiny()
    randomize_zero_init(m, seed=0)
    x = ids()
    a = m(x, torch.full((2,), 0.1))
    b = m(x, torch.full((2,), 3.0))
    assert (a - b).abs().max() > 1e-3  # sigma changes the output
    # sigma=None (conditioning off) means sigma = 0, as in MDLM
    torch.testing.assert_close(m(x, None), m(x, torch.zeros(2)))
    # per-example conditioning: example 0 is unaffected by example 1's sigma
    c = m(x, torch.tensor([0.1, 3.0]))
    torch.testing.assert_close(c[0], a[0])
    torch.testing.assert_close(c[1], b[1])


def test_forward_embeddings_matches_forward() -> None:
    m = tiny()
    randomize_zero_init(m, seed=0)
    x, sigma = ids(), torch.tensor([0.3, 1.2])
    c = m.condition(sigma, 2, x.device)
    assert c.shape == (2, 16)
    torch.testing.assert_close(m.forward_embeddings(m.embed(x), c), m(x, sigma))
    assert m.hidden(m.embed(x), c).shape == (2, L, 32)


@pytest.mark.parametrize("causal", [False, True])
def test_causality(causal: bool) -> None:
    m = tiny(causal=causal)
    randomize_zero_init(m, seed=0)
    x = ids(1)
    y = x.clone()
    y[0, 10] = (x[0, 10] + 1) % V_IN
    a, b = m(x), m(y)
    prefix_change = (a[:, :10] - b[:, :10]).abs().max().item()
    if causal:
        assert prefix_change < 1e-6
    else:
        assert prefix_change > 1e-4  # bidirectional: the future leaks back
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4


def test_dropout_only_in_training() -> None:
    m = tiny(dropout=0.5)
    randomize_zero_init(m, seed=0)
    x = ids()
    m.train()
    assert (m(x) - m(x)).abs().max() > 1e-4
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)


def test_bad_dims_rejected() -> None:
    with pytest.raises(ValueError):
        Backbone(10, 10, d_model=30, n_layers=1, n_heads=4, cond_dim=8)  # 4 does not divide 30
    with pytest.raises(ValueError):
        Backbone(10, 10, d_model=12, n_layers=1, n_heads=4, cond_dim=8)  # odd head dim: no rotary


def test_gradients_reach_every_parameter_after_a_step() -> None:
    """Zero-init modulation blocks the gradient at step 0; after two updates every parameter trains."""
    m = tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = ids(4)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x, torch.rand(4)).flatten(0, 1), (x % V_OUT).flatten()).backward()
        opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(m(x, torch.rand(4)).flatten(0, 1), (x % V_OUT).flatten()).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert no_grad == []


def test_tiny_preset_parameter_count() -> None:
    assert SIZE_PRESETS["tiny"]["d_model"] == 128
    for family in ("mdlm", "ar"):
        model = build_model(ModelConfig(family=family, size="tiny"), DiffusionConfig(), 259)
        n = model.num_parameters()
        assert 1_000_000 < n < 3_000_000, n
