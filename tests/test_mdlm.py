"""MDLM family: SUBS, loss normalisation and weighting, time sampling, the denoise step.

What every family must do (memorise a batch, ignore padding, val invariance, samplers, checkpoint round
trip) is tests/test_family_contract.py's."""

from __future__ import annotations

import math

import pytest
import torch

from difflm.families import build_model, family_names, get_family
from difflm.families.config import DiffusionConfig
from difflm.families.mdlm.model import MDLM
from difflm.models import Backbone, ModelConfig
from difflm.schedules import MDLM_SCHEDULES, get_schedule
from tests.helpers import randomize_zero_init

V, L = 20, 16


def make(
    schedule: str = "loglinear",
    likelihood_weight: float = 1.0,
    time_conditioning: bool = False,
    randomize: bool = True,
    antithetic: bool = True,
) -> MDLM:
    torch.manual_seed(0)
    backbone = Backbone(V + 1, V + 1, d_model=32, n_layers=2, n_heads=4, cond_dim=16)
    m = MDLM(
        backbone,
        V,
        get_schedule(schedule, 1e-3),
        likelihood_weight=likelihood_weight,
        time_conditioning=time_conditioning,
        antithetic=antithetic,
    )
    if randomize:  # zero-init layers -> random, so predictions depend on the input
        randomize_zero_init(m)
    return m


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def data(batch: int = 4, length: int = L, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, V, (batch, length), generator=gen(seed))
    return tokens, torch.ones_like(tokens, dtype=torch.bool)


def manual_masks(m: MDLM, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay forward's draws: t (B,) then the mask noise (B, L)."""
    g = gen(seed)
    t = m.sample_times(tokens.shape[0], tokens.device, g)
    noise = torch.rand(tokens.shape, generator=g, dtype=t.dtype)
    return t, noise < m.schedule.move_chance(t)[:, None]


def test_registered() -> None:
    assert {"mdlm", "ar"} <= set(family_names())
    spec = get_family("mdlm")
    assert spec.schedules == MDLM_SCHEDULES


def test_subs_log_probs() -> None:
    m = make()
    tokens, _ = data()
    t, masked = manual_masks(m, tokens, 0)
    xt = torch.where(masked, m.mask_id, tokens)
    assert masked.any() and (~masked).any()
    logp = m.log_probs(xt, m.schedule.sigma(t))  # (B, L, V+1)
    assert logp.shape == (4, L, V + 1)
    assert torch.all(logp[..., m.mask_id] == float("-inf"))  # the mask is never predicted
    # unmasked positions: a copy of the input (prob 1 on it, 0 elsewhere)
    kept = logp[~masked]  # (n, V+1)
    assert torch.all(kept.gather(-1, xt[~masked][:, None]) == 0)
    assert torch.all(kept.exp().sum(-1) == 1)
    # masked positions: a proper distribution over the V real tokens
    torch.testing.assert_close(logp[masked].logsumexp(-1), torch.zeros(int(masked.sum())))
    assert torch.all(logp[masked][:, :V] > float("-inf"))
    assert torch.all(logp.argmax(-1) < V)


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_nelbo_equals_manual_computation(schedule: str) -> None:
    """nll_sum == sum over *all* positions of weight(t) * -log p_SUBS(x0|xt): unmasked ones add exactly 0."""
    m = make(schedule)
    tokens, valid = data()
    valid[1, 10:] = False
    out = m(tokens, valid, gen(3))
    t, masked = manual_masks(m, tokens, 3)
    masked &= valid
    xt = torch.where(masked, m.mask_id, tokens)
    logp = m.log_probs(xt, m.schedule.sigma(t))
    nll = -logp.gather(-1, tokens[..., None]).squeeze(-1)  # (B, L), all positions
    assert torch.all(nll[~masked] == 0)  # carry-over: exactly zero loss where unmasked
    weight = m.schedule.nelbo_weight(t)[:, None]
    expected = (weight * nll).sum().double()
    torch.testing.assert_close(out.nll_sum, expected, rtol=1e-5, atol=0)
    assert out.nll_sum.dtype == torch.float64
    assert out.num_tokens.dtype == torch.int64 and out.num_tokens.item() == valid.sum().item()
    torch.testing.assert_close(out.loss.double(), expected / valid.sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.metrics["masked_ce"].double(), nll.sum().double() / valid.sum(), rtol=1e-5, atol=0)
    assert out.metrics["mask_rate"].item() == pytest.approx(masked.sum().item() / valid.sum().item())
    assert all(not v.requires_grad for v in out.metrics.values())


def test_loss_normalised_by_real_tokens_exact() -> None:
    """At init (all logits 0) each masked token costs log V: loss = log V * weight(t) * mask_rate."""
    m = make(randomize=False)
    for seed in range(5):
        tokens, valid = data(1, 32, seed)
        out = m(tokens, valid, gen(seed))
        t, masked = manual_masks(m, tokens, seed)
        expected = math.log(V) * m.schedule.nelbo_weight(t).item() * masked.float().mean().item()
        assert out.loss.item() == pytest.approx(expected, rel=1e-5)
        assert out.metrics["mask_rate"].item() == pytest.approx(masked.float().mean().item())


def test_loss_does_not_double_with_sequence_length() -> None:
    """The same data repeated to twice the length gives about the same loss, not twice it."""
    m = make()
    short, long = [], []
    for seed in range(12):
        tokens, valid = data(8, L, seed)
        short.append(m(tokens, valid, gen(seed)).loss.item())
        tokens2 = torch.cat([tokens, tokens], dim=1)
        long.append(m(tokens2, torch.ones_like(tokens2, dtype=torch.bool), gen(seed)).loss.item())
    ratio = sum(long) / sum(short)
    assert 0.8 <= ratio <= 1.25, ratio


def test_unbiased_at_init() -> None:
    """At init E[loss] = log V * E_t[weight(t) move_chance(t)] = log V * (1 - eps) for loglinear."""
    m = make(randomize=False)
    tokens, valid = data(16, 64)
    losses = [m(tokens, valid, gen(s)).loss.item() for s in range(16)]
    assert sum(losses) / len(losses) == pytest.approx(math.log(V) * (1 - 1e-3), rel=0.05)


def test_likelihood_weight_changes_loss_not_nelbo() -> None:
    tokens, valid = data()
    outs = {w: make(likelihood_weight=w)(tokens, valid, gen(5)) for w in (0.0, 0.5, 1.0)}
    assert outs[0.0].nll_sum.item() == outs[1.0].nll_sum.item() == outs[0.5].nll_sum.item()
    assert abs(outs[0.0].loss.item() - outs[1.0].loss.item()) > 1e-3
    torch.testing.assert_close(outs[1.0].loss, outs[1.0].metrics["nelbo"])
    torch.testing.assert_close(outs[0.0].loss, outs[0.0].metrics["masked_ce"])
    half = outs[0.5]
    torch.testing.assert_close(half.loss, 0.5 * (half.metrics["nelbo"] + half.metrics["masked_ce"]))


def test_antithetic_times() -> None:
    m = make()
    t = m.sample_times(8, torch.device("cpu"), gen(0))
    assert t.shape == (8,) and t.dtype == torch.float32
    assert torch.all((t >= m.sampling_eps) & (t <= 1))
    gaps = t.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full((7,), (1 - m.sampling_eps) / 8), rtol=1e-4, atol=1e-6)
    iid = make(antithetic=False).sample_times(1000, torch.device("cpu"), gen(0))
    assert 0.45 < iid.mean().item() < 0.55 and iid.min() >= 1e-3


def test_determinism_dtype_and_gradients() -> None:
    m = make()
    tokens, valid = data()
    a, b = m(tokens, valid, gen(7)), m(tokens, valid, gen(7))
    assert a.loss.item() == b.loss.item()
    assert a.loss.item() != m(tokens, valid, gen(8)).loss.item()
    assert a.loss.dtype == torch.float32 and a.loss.device == tokens.device
    a.loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    m64 = make().double()
    out = m64(tokens, valid, gen(7))
    assert out.loss.dtype == torch.float64 and m64.sample_times(2, tokens.device, gen(0)).dtype == torch.float64
    # bf16 weights: times/noise and the loss stay float32
    mbf = make().to(torch.bfloat16)
    outbf = mbf(tokens, valid, gen(7))
    assert outbf.loss.dtype == torch.float32 and torch.isfinite(outbf.loss)


@pytest.mark.parametrize("on", [False, True])
def test_time_conditioning_passes_sigma_only_when_on(on: bool) -> None:
    m = make(time_conditioning=on)
    seen: list[torch.Tensor | None] = []
    orig = m.backbone.forward

    def spy(ids: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(sigma)
        return orig(ids, sigma)

    m.backbone.forward = spy  # type: ignore[method-assign]
    tokens, valid = data()
    m(tokens, valid, gen(0))
    if on:
        t, _ = manual_masks(m, tokens, 0)
        assert seen[0] is not None
        torch.testing.assert_close(seen[0], m.schedule.sigma(t))
    else:
        assert seen == [None]


def test_denoise_step_posterior() -> None:
    """From t=1 to s=0.5 (loglinear) a mask stays with prob move(s)/move(t) = 0.5; unmasked ids are copied."""
    m = make()
    x = torch.full((50, 80), m.mask_id)
    x[:, :10] = 3  # some already-decoded tokens
    t, s = torch.ones(50), torch.full((50,), 0.5)
    y = m.denoise_step(x, t, s, gen(0))
    assert torch.all(y[:, :10] == 3)
    still = (y[:, 10:] == m.mask_id).float().mean().item()
    assert still == pytest.approx(0.5, abs=0.03)
    assert torch.all(y[y != m.mask_id] < V)
    # s close to 0: (almost) everything is revealed
    z = m.denoise_step(x, t, torch.full((50,), 1e-6), gen(0))
    assert (z == m.mask_id).float().mean().item() < 1e-3


def test_build_model_validates_schedule() -> None:
    model = build_model(ModelConfig(family="mdlm", size="tiny"), DiffusionConfig(schedule="cosine"), 259)
    assert isinstance(model, MDLM) and model.mask_id == 259 and model.schedule.name == "cosine"
    assert model.backbone.embed.num_embeddings == 260 and model.backbone.vocab_out == 260
    with pytest.raises(ValueError) as err:
        build_model(ModelConfig(family="mdlm"), DiffusionConfig(schedule="bogus"), 259)
    assert "loglinear" in str(err.value) and "geometric" in str(err.value)
    with pytest.raises(KeyError):
        build_model(ModelConfig(family="mdml"), DiffusionConfig(), 259)
    # special ids are accepted (and ignored) by mdlm
    assert isinstance(build_model(ModelConfig(), DiffusionConfig(), 259, bos_id=256, eos_id=257), MDLM)
