"""SEDD family: the denoising score entropy against exact ratios and the formula, samplers, prompts, val, training."""

from __future__ import annotations

import math

import pytest
import torch

from difflm.evaluation import counted_positions, make_val_noise
from difflm.families import build_model, get_family
from difflm.families.config import DiffusionConfig
from difflm.families.sedd import SEDD, Absorbing, Uniform, get_graph
from difflm.models import ModelConfig
from difflm.sampling import SampleOptions, SamplingError, get_sampler
from difflm.schedules import sample_times

V, L = 12, 16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(graph: str = "absorb", schedule: str = "loglinear", randomize: bool = True) -> SEDD:
    torch.manual_seed(0)
    model_cfg = ModelConfig(family="sedd", size=None, d_model=32, n_layers=2, n_heads=2, cond_dim=16,
                            time_conditioning=graph == "uniform")
    m = build_model(model_cfg, DiffusionConfig(graph=graph, schedule=schedule), V)
    if randomize:  # zero-init layers -> random, so the scores depend on the input
        g = gen(1)
        with torch.no_grad():
            for p in m.parameters():
                if torch.all(p == 0):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m  # type: ignore[return-value]


# ---- the score entropy against exact transition matrices ------------------------------------------


def transition(graph: str, sigma: float) -> torch.Tensor:
    """P = expm(sigma R) (dim, dim), row = from, column = to; built from the rate matrix, not from graphs.py."""
    if graph == "absorb":
        R = torch.zeros(V + 1, V + 1, dtype=torch.float64)
        R[:V, V] = 1.0
        R[torch.arange(V), torch.arange(V)] = -1.0
    else:
        R = torch.full((V, V), 1.0 / V, dtype=torch.float64) - torch.eye(V, dtype=torch.float64)
    return torch.linalg.matrix_exp(sigma * R)


def dse_definition(graph: str, s: torch.Tensor, xt: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_{y != x_t} w_y (e^{s_y} - c_y s_y + c_y (log c_y - 1)) per row, w = 1 (absorb, from MASK) or 1/V;
    c = 0 terms reduce to e^{s_y}. Rows (N, dim)."""
    w = 1.0 if graph == "absorb" else 1.0 / V
    k = torch.where(c > 0, c * (c.clamp_min(1e-300).log() - 1), 0.0)
    cs = torch.where(c > 0, c * s, 0.0)
    terms = (s.exp() - cs + k).scatter(-1, xt[:, None], 0.0)
    if graph == "absorb":
        terms = terms[:, :V]  # y ranges over the tokens (the MASK is x_t itself)
    return w * terms.sum(-1)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("sigma", [1e-3, 0.3, 3.0])
def test_dse_zero_at_true_ratios_positive_elsewhere(graph: str, sigma: float) -> None:
    """Data = one sequence x0: the true concrete score at x_t is P[x0, y] / P[x0, x_t] (from expm). The DSE is 0
    there at every scored position and > 0 under any perturbation."""
    g = get_graph(graph, V)
    P = transition(graph, sigma)
    x0 = torch.randint(0, V, (1, 64), generator=gen(0))
    if graph == "absorb":
        xt = torch.where(torch.rand(1, 64, generator=gen(1)) < 0.5, V, x0)
    else:
        xt = torch.where(torch.rand(1, 64, generator=gen(1)) < 0.5, torch.randint(0, V, (1, 64), generator=gen(2)), x0)
    ratio = P[x0[0]] / P[x0[0], xt[0]][:, None]  # (64, dim)
    s_true = ratio.log()[None]  # (1, 64, dim); -inf where unreachable
    sig = torch.tensor([sigma], dtype=torch.float64)
    scored = (xt == V) if graph == "absorb" else torch.ones_like(xt, dtype=torch.bool)
    assert scored.sum() > 10
    zero = g.score_entropy(s_true, xt, x0, sig)
    assert zero.abs().max().item() < 1e-9 * max(1.0, 1 / sigma)
    for seed in range(5):
        bump = torch.randn(s_true.shape, generator=gen(10 + seed), dtype=torch.float64) * 0.3
        s = torch.where(torch.isfinite(s_true), s_true + bump, bump).scatter(-1, xt[..., None], 0.0)
        pos = g.score_entropy(s, xt, x0, sig)
        assert torch.all(pos[scored] > 0) and torch.all(pos[~scored] == 0)
        # and the graph's value is the definition's
        torch.testing.assert_close(pos[0][scored[0]], dse_definition(graph, s[0], xt[0], ratio)[scored[0]],
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_expected_dse_minimised_at_marginal_ratios(graph: str) -> None:
    """Data = a mixture over three tokens (one position). For each noisy state the expected DSE over the posterior
    of x0 is smallest at the true marginal ratios p_t(y) / p_t(x_t): zero gradient there, larger anywhere else."""
    g = get_graph(graph, V)
    sigma = torch.tensor([0.7], dtype=torch.float64)
    P = transition(graph, 0.7)
    p0 = torch.zeros(P.shape[0], dtype=torch.float64)
    p0[[2, 5, 7]] = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    pt = p0 @ P  # marginal over states
    states = [V] if graph == "absorb" else list(range(V))
    for x in states:
        post = p0 * P[:, x] / pt[x]  # p(x0 | x_t = x), (V,)
        x0s = torch.nonzero(post[:V]).flatten()
        xt = torch.full((1, len(x0s)), x)

        def expected(s: torch.Tensor) -> torch.Tensor:
            dse = g.score_entropy(s.expand(1, len(x0s), -1), xt, x0s[None], sigma)  # (1, n)
            return (dse[0] * post[x0s]).sum()

        s_true = (pt / pt[x]).log().clone().requires_grad_(True)  # (dim,)
        best = expected(s_true)
        (grad,) = torch.autograd.grad(best, s_true)
        reachable = torch.isfinite(s_true.detach())
        assert grad[reachable].abs().max().item() < 1e-10
        for seed in range(3):
            bump = torch.randn(s_true.shape, generator=gen(seed), dtype=torch.float64) * 0.2
            bump[x] = 0.0
            s = torch.where(reachable, s_true.detach() + bump, bump)
            assert expected(s).item() > best.item() + 1e-6


def test_absorb_loss_matches_the_formula() -> None:
    """forward's loss = (1/n_real) sum_masked sigma'(t) [sum_{y != MASK} e^{s_y} - r s_x0 + r (log r - 1)],
    r = 1/expm1(sigma), written out independently and replayed with forward's draws (t, then the uniforms)."""
    m = make().double()
    tokens = torch.randint(0, V, (4, L), generator=gen(0))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, 10:] = False
    out = m(tokens, valid, gen(3))
    g = gen(3)
    t = sample_times(4, sampling_eps=m.sampling_eps, antithetic=True, device=tokens.device, dtype=torch.float64,
                     generator=g)
    u = torch.rand(4, L, generator=g, dtype=torch.float64)
    sigma, dsigma = m.schedule.sigma(t), m.schedule.dsigma(t)
    masked = (u < 1 - torch.exp(-sigma)[:, None]) & valid
    xt = torch.where(masked, V, tokens)
    s = m.log_score(xt, sigma)  # (B, L, V+1)
    r = (1 / torch.expm1(sigma))[:, None]  # (B, 1)
    formula = s[..., :V].exp().sum(-1) - r * s.gather(-1, tokens[..., None]).squeeze(-1) + r * (r.log() - 1)
    expected = (dsigma[:, None] * torch.where(masked, formula, 0.0)).sum() / valid.sum()
    assert masked.sum() > 10
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(out.nll_sum, expected * valid.sum(), rtol=1e-9, atol=0)
    assert out.num_tokens.item() == valid.sum().item()
    assert out.metrics["noised_rate"].item() == pytest.approx(masked.sum().item() / valid.sum().item())


def test_uniform_scores_every_position_and_absorb_only_masks() -> None:
    for graph in ("absorb", "uniform"):
        m = make(graph).double()
        tokens = torch.randint(0, V, (8, L), generator=gen(0))
        t = torch.full((8,), 0.3, dtype=torch.float64)
        per_pos, noised = m.dse_terms(tokens, torch.ones_like(tokens, dtype=torch.bool), t, gen(1))
        if graph == "absorb":
            assert torch.all(per_pos[~noised] == 0) and torch.all(per_pos[noised] > 0)
        else:
            assert torch.all(per_pos > 0) and (~noised).sum() > 0  # unmoved positions contribute too


def test_normalised_per_real_token() -> None:
    """Doubling identical data (all positions masked at t = 1) leaves the loss unchanged; pads are not counted."""
    m = make(randomize=False)
    tok = torch.full((2, L), 3)
    t = torch.ones(2)
    per_short, _ = m.dse_terms(tok, torch.ones_like(tok, dtype=torch.bool), t, gen(0))
    per_long, _ = m.dse_terms(torch.cat([tok, tok], 1), torch.ones(2, 2 * L, dtype=torch.bool), t, gen(0))
    assert per_short.mean().item() == pytest.approx(per_long.mean().item(), rel=1e-5)
    valid = torch.ones_like(tok, dtype=torch.bool)
    valid[:, 8:] = False
    out = m(tok, valid, gen(0))
    assert out.num_tokens.item() == 16
    none = m(tok, torch.zeros_like(valid), gen(0))
    assert none.loss.item() == 0.0 and none.num_tokens.item() == 0


def test_at_init_absorb_costs_log_v_per_token_on_average() -> None:
    """Zero output = uniform scores at the right scale: DSE = r log V per mask, so E[loss] = log V (1 - eps)."""
    m = make(randomize=False)
    tokens = torch.randint(0, V, (16, 32), generator=gen(0))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    losses = [m(tokens, valid, gen(s)).loss.item() for s in range(12)]
    assert sum(losses) / len(losses) == pytest.approx(math.log(V) * (1 - 1e-3), rel=0.05)


# ---- val -------------------------------------------------------------------------------------------


def test_val_nll_absorb_is_the_masked_nelbo_when_scores_are_normalised() -> None:
    """With scores that sum to r (a proper p(x0|x_t)), draw k is exactly span * (1/m) * sum_masked -log p(x0|x_m):
    mdlm's NELBO estimate. The model here is untrained (zero output: uniform p), so -log p = log V."""
    m = make(randomize=False)
    tokens = torch.randint(0, V, (3, L), generator=gen(0))
    counted = counted_positions(tokens)
    noise = make_val_noise([0, 1, 2], 4, L, seed=5)
    got = m.val_nll(tokens, counted, noise)  # (B, K)
    assert got.shape == (3, 4) and got.dtype == torch.float64
    for k in range(4):
        n_masked = noise.masked(k, counted).sum(-1).double()
        expected = noise.weights[:, k] * n_masked * math.log(V) / noise.rates[:, k]
        torch.testing.assert_close(got[:, k], expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(m.val_nll(tokens, counted, noise), got, rtol=0, atol=0)  # common random numbers


def test_val_nll_uniform_matches_dse_integral_and_is_reproducible() -> None:
    """Uniform graph: draw k = span * sum_counted DSE(sigma(m)) / (1 - m), with the new tokens drawn from the
    per-sequence seeds (same noise, same value; other seeds, other tokens)."""
    m = make("uniform").double()
    tokens = torch.randint(0, V, (2, L), generator=gen(0))
    counted = counted_positions(tokens)
    noise = make_val_noise([3, 4], 2, L, seed=1)
    got = m.val_nll(tokens, counted, noise)
    ids = torch.stack([torch.randint(0, V, (2, L), generator=gen(int(s))) for s in noise.seeds])  # (B, K, L)
    for k in range(2):
        mk = noise.rates[:, k]
        sigma = -torch.log1p(-mk)
        xt = torch.where(noise.masked(k, counted), ids[:, k], tokens)
        dse = m.graph.score_entropy(m.log_score(xt, sigma), xt, tokens, sigma)
        expected = noise.weights[:, k] * torch.where(counted, dse, 0.0).sum(-1) / (1 - mk)
        torch.testing.assert_close(got[:, k], expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(m.val_nll(tokens, counted, noise), got, rtol=0, atol=0)


def test_nll_samples_k1_is_forwards_draw() -> None:
    m = make()
    tokens = torch.randint(0, V, (4, L), generator=gen(0))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    sums, counts = m.nll_samples(tokens, valid, gen(2), 1)
    out = m(tokens, valid, gen(2))
    torch.testing.assert_close(sums.sum(), out.nll_sum, rtol=1e-6, atol=0)
    assert counts.tolist() == [L] * 4
    many, _ = m.nll_samples(tokens, valid, gen(2), 5)
    assert many.shape == (4, 5) and many.dtype == torch.float64


# ---- samplers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("sampler", ["euler", "analytic"])
def test_samplers_leave_no_mask_and_give_valid_ids(graph: str, sampler: str) -> None:
    m = make(graph).eval()
    fn = get_sampler(m, sampler)
    out = fn(SampleOptions(num=3, length=L, steps=12), gen(0))
    assert out.tokens.shape == (3, L) and out.tokens.dtype == torch.long
    assert torch.all((out.tokens >= 0) & (out.tokens < V))  # no MASK (id V) left
    assert not out.fixed.any()
    # 12 steps + the denoising step; absorb stops as soon as no mask is left
    assert out.nfe == 13 if graph == "uniform" else 1 <= out.nfe <= 13
    again = fn(SampleOptions(num=3, length=L, steps=12), gen(0))
    assert torch.equal(out.tokens, again.tokens)  # seeded
    greedy = fn(SampleOptions(num=3, length=L, steps=4, temperature=0.0, top_p=0.5), gen(1))
    assert torch.all((greedy.tokens >= 0) & (greedy.tokens < V))
    # stopping at t = 0.5 leaves many positions corrupted: the denoising step must finish them
    early = fn(SampleOptions(num=3, length=L, steps=2, eps=0.5), gen(2))
    assert torch.all(early.tokens < V) and early.nfe == 3


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("sampler", ["euler", "analytic"])
def test_prompt_and_infill_positions_never_change(graph: str, sampler: str) -> None:
    """A template (BOS + text + a span to infill + text): fixed ids are kept exactly, the span is filled."""
    m = make(graph).eval()
    ids = torch.randint(0, V, (L,), generator=gen(3))
    fixed = torch.ones(L, dtype=torch.bool)
    fixed[5:9] = False  # [MASK:4]
    seen: list[torch.Tensor] = []  # every network input: the prompt must be there at every step
    log_score = m.log_score
    m.log_score = lambda xt, sigma: (seen.append(xt.clone()), log_score(xt, sigma))[1]  # type: ignore[method-assign]
    out = get_sampler(m, sampler)(SampleOptions(num=4, length=L, steps=10, template=ids, fixed=fixed), gen(0))
    assert len(seen) >= 2 and all(torch.equal(x[:, fixed], ids[fixed].expand(4, -1)) for x in seen)
    assert torch.equal(out.tokens[:, fixed], ids[fixed].expand(4, -1))
    assert torch.all(out.tokens[:, ~fixed] < V) and torch.equal(out.fixed, fixed.expand(4, L))


def test_uniform_moves_any_position_unless_held() -> None:
    """The uniform graph changes any position, so the prompt is held by the sampler (held positions are never
    drawn), not by the graph."""
    m = make("uniform").eval()
    x = torch.randint(0, V, (4, L), generator=gen(0))
    from difflm.families.sedd import samplers as ss

    moved, _ = ss.run(m, x.clone(), torch.zeros_like(x, dtype=torch.bool), SampleOptions(num=4, length=L, steps=20),
                      gen(1), kind="euler")
    held, _ = ss.run(m, x.clone(), torch.ones_like(x, dtype=torch.bool), SampleOptions(num=4, length=L, steps=20),
                     gen(1), kind="euler")
    assert (moved != x).any() and torch.equal(held, x)


def test_semi_ar_windows_and_unsupported_options() -> None:
    m = make().eval()
    out = get_sampler(m, "analytic")(SampleOptions(num=2, length=40, steps=4, window=L), gen(0))
    assert out.tokens.shape == (2, 40) and torch.all(out.tokens < V) and "windows" in out.notes[0]
    with pytest.raises(SamplingError, match="remasking"):
        get_sampler(m, "euler")(SampleOptions(num=1, length=L, steps=2, remasking="low_confidence"), gen(0))
    with pytest.raises(SamplingError, match="choose one of analytic, euler"):
        get_sampler(m, "ddpm")


def test_analytic_reveal_probability() -> None:
    """Absorb, one analytic step t -> s from MASK reveals with probability expm1(sigma_t - sigma_s) * sum_y score_y.
    With normalised scores (sum = 1/expm1(sigma_t): exactly the zero-output model, by the sigma scaling) that is
    the exact posterior (move(t) - move(s)) / move(t); the sampler's empirical reveal rate agrees."""
    from difflm.families.sedd import samplers as ss

    n = 256
    times = torch.tensor([0.8, 0.5])
    for randomize in (False, True):
        m = make(randomize=randomize).eval()
        sigmas = m.schedule.sigma(times)
        move = m.schedule.move_chance(times.double())
        posterior = ((move[0] - move[1]) / move[0]).item()
        x = torch.full((n, L), V)
        score = m.log_score(x, sigmas[0].expand(n)).double().exp().flatten(0, 1)  # (n L, V+1)
        probs = m.graph.tweedie(x.flatten(), score, (sigmas[0] - sigmas[1]).double().expand(n * L))
        p_reveal = 1 - probs[:, -1] / probs.sum(-1)
        expected = (torch.expm1((sigmas[0] - sigmas[1]).double()) * score[:, :V].sum(-1)).clamp(max=1)
        torch.testing.assert_close(p_reveal, expected, rtol=1e-6, atol=1e-9)
        if not randomize:
            torch.testing.assert_close(p_reveal, torch.full_like(p_reveal, posterior), rtol=1e-4, atol=0)
            # the sampler's jump decision draws reveals at that rate
            rows = x.flatten()
            moved = ss._move(rows, probs.scatter(-1, rows[:, None], 0.0), probs[:, -1], SampleOptions(), gen(0))
            rate = (moved != V).double().mean().item()
            assert rate == pytest.approx(posterior, abs=4 * math.sqrt(posterior * (1 - posterior) / (n * L)))


# ---- denoise, training, registry -----------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_denoise_corrupts_only_valid_and_reconstructs(graph: str) -> None:
    m = make(graph).eval()
    tokens = torch.randint(0, V, (1, L), generator=gen(0))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[:, 0] = valid[:, -1] = False
    for steps in (None, 6):
        res = m.denoise(tokens, valid, 0.6, gen(1), steps)
        assert not (res.noised & ~valid).any() and res.noised.any()
        assert torch.equal(res.reconstructed[~valid], tokens[~valid])
        assert torch.all(res.reconstructed < V)
        if graph == "absorb":
            assert torch.all(res.corrupted[res.noised] == V) and torch.equal(res.reconstructed[~res.noised],
                                                                             tokens[~res.noised])
        assert 0 <= res.metrics["accuracy"] <= 1 and res.metrics["mask_rate"] > 0
    clean = m.denoise(tokens, valid, 0.0, gen(1))
    assert not clean.noised.any()


def test_uniform_graph_loss_falls_on_tiny_data() -> None:
    """Three constant sequences (a, a, ...), 60 Adam steps: the bound under fixed noise (nll_samples, seed 99)
    falls from ~log V to a third of it or less with the uniform graph (the absorb graph, sedd's default, is
    the family contract's: tests/test_family_contract.py)."""
    torch.set_num_threads(1)
    data = torch.tensor([2, 5, 9]).repeat_interleave(L).view(3, L).repeat(4, 1)  # (12, L)
    valid = torch.ones_like(data, dtype=torch.bool)
    for graph in ("uniform",):
        m = make(graph, randomize=False)
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)

        def bound() -> float:
            with torch.no_grad():
                sums, counts = m.nll_samples(data, valid, gen(99), 8)
            return float(sums.mean(1).sum() / counts.sum())

        before = bound()
        g = gen(5)
        for _ in range(60):
            loss = m(data, valid, g).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = bound()
        assert before > 0.8 * math.log(V) and after < 0.35 * before, (graph, before, after)


def test_registry_and_spec_checks() -> None:
    spec = get_family("sedd")
    assert spec.schedules == ("loglinear", "geometric")
    m = build_model(ModelConfig(family="sedd", size=None, d_model=16, n_layers=1, n_heads=2),
                    DiffusionConfig(schedule="geometric", sigma_min=1e-3, sigma_max=5.0), V)
    assert isinstance(m.graph, Absorbing) and m.backbone.vocab_in == V + 1 and m.backbone.vocab_out == V
    assert m.schedule.sigma(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([1e-3, 5.0])
    u = build_model(ModelConfig(family="sedd", size=None, d_model=16, n_layers=1, n_heads=2, time_conditioning=True),
                    DiffusionConfig(graph="uniform"), V)
    assert isinstance(u.graph, Uniform) and u.backbone.vocab_in == V
    with pytest.raises(ValueError, match="model.time_conditioning: true"):
        build_model(ModelConfig(family="sedd", size=None, d_model=16, n_layers=1, n_heads=2),
                    DiffusionConfig(graph="uniform"), V)
    with pytest.raises(ValueError, match="not accept schedule 'cosine'"):
        build_model(ModelConfig(family="sedd"), DiffusionConfig(schedule="cosine"), V)
