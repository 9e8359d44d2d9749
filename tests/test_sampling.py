"""Samplers (difflm.sampling): cache equivalence, prompts/infilling, semi-AR, temperature/top-p, errors."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from difflm.data.tokenization import ByteTokenizer
from difflm.families.ar.model import AR
from difflm.families.mdlm.model import MDLM
from difflm.models import Backbone
from difflm.sampling import SampleOptions, SamplingError, adjust_log_probs, build_template, get_sampler, parse_prompt
from difflm.families.mdlm.samplers import analytic_transition, window_starts
from difflm.schedules import get_schedule
from difflm.types import Denoiser
from tests.helpers import randomize_zero_init

V = 20


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread avoids oversubscription on shared CPUs (speed only)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mdlm(time_conditioning: bool = False, vocab: int = V) -> MDLM:
    torch.manual_seed(0)
    m = MDLM(Backbone(vocab + 1, vocab + 1, d_model=32, n_layers=2, n_heads=4, cond_dim=16), vocab,
             get_schedule("loglinear"), time_conditioning=time_conditioning)
    randomize_zero_init(m, scale=0.3)
    return m.eval()


def ar(bos_id: int | None = 0, vocab: int = V) -> AR:
    torch.manual_seed(0)
    b = Backbone(vocab, vocab, d_model=32, n_layers=2, n_heads=4, cond_dim=16, causal=True)
    m = AR(b, vocab, bos_id=bos_id)
    randomize_zero_init(m, scale=0.3)
    return m.eval()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(model: torch.nn.Module, name: str, seed: int = 0, **kw: object):  # type: ignore[no-untyped-def]
    return get_sampler(model, name)(SampleOptions(**kw), gen(seed))  # type: ignore[arg-type, operator]


# ---- cached == uncached -------------------------------------------------------------------------


@pytest.mark.parametrize("remasking", ["random", "low_confidence"])
def test_cache_gives_identical_tokens_with_fewer_calls(remasking: str) -> None:
    m = mdlm()
    kw = dict(num=3, length=16, steps=200, remasking=remasking, temperature=0.9, top_p=0.95)
    plain, cached = run(m, "ddpm", **kw), run(m, "ddpm_cache", **kw)
    assert torch.equal(plain.tokens, cached.tokens)
    # T = 200 >> L = 16: most steps reveal nothing and reuse the cached output
    assert plain.nfe >= 150 and cached.nfe <= 60, (plain.nfe, cached.nfe)
    assert cached.notes == []


def test_cache_identical_with_prompt_and_semi_ar() -> None:
    m = mdlm()
    template = torch.arange(40) % V
    fixed = torch.zeros(40, dtype=torch.bool)
    fixed[:5] = True
    fixed[20:23] = True
    kw = dict(num=2, length=40, steps=64, template=template, fixed=fixed, window=16, stride=8)
    assert torch.equal(run(m, "ddpm", **kw).tokens, run(m, "ddpm_cache", **kw).tokens)


def test_time_conditioned_cache_falls_back_and_says_so() -> None:
    m = mdlm(time_conditioning=True)
    assert m.default_sampler == "ddpm"  # caching is invalid, so it is not the default
    kw = dict(num=2, length=12, steps=30)
    plain, cached = run(m, "ddpm", **kw), run(m, "ddpm_cache", **kw)
    assert torch.equal(plain.tokens, cached.tokens) and cached.nfe == plain.nfe
    assert len(cached.notes) == 1 and "time-conditioned" in cached.notes[0]
    assert mdlm().default_sampler == "ddpm_cache"


# ---- validity, reproducibility ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddpm", "ddpm_cache", "analytic"])
def test_no_mask_left_valid_ids_and_seeded(name: str) -> None:
    m = mdlm()
    for steps in (1, 7, 50):
        out = run(m, name, num=4, length=12, steps=steps)
        assert out.tokens.shape == (4, 12) and out.tokens.dtype == torch.int64
        assert torch.all((out.tokens >= 0) & (out.tokens < V)), "a mask id (V) or worse is left"
        assert not out.fixed.any()
    a, b = run(m, name, seed=3, num=4, length=12, steps=20), run(m, name, seed=3, num=4, length=12, steps=20)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, run(m, name, seed=4, num=4, length=12, steps=20).tokens)


def test_low_confidence_reveals_on_schedule_and_fills_everything() -> None:
    m = mdlm()
    out = run(m, "ddpm", num=3, length=16, steps=4, remasking="low_confidence")
    assert torch.all(out.tokens < V)
    # 4 steps over 16 masks on loglinear: 4 revealed per step, so the last step reveals the final 4
    assert out.nfe == 4
    with pytest.raises(SamplingError, match="ddpm and ddpm_cache"):
        run(m, "analytic", num=1, length=8, steps=4, remasking="low_confidence")


def test_model_sample_keeps_working() -> None:
    """Family.sample (the trainer's TensorBoard samples) runs the cached ddpm: same tokens as ddpm."""
    m = mdlm()
    s = m.sample(3, 12, steps=40, generator=gen(5))
    assert torch.equal(s, run(m, "ddpm", seed=5, num=3, length=12, steps=40).tokens)


# ---- prompting ----------------------------------------------------------------------------------


def test_prefix_prompt_tokens_never_change() -> None:
    m = mdlm()
    template = torch.tensor([3, 1, 4, 1, 5] + [0] * 11)
    fixed = torch.tensor([True] * 5 + [False] * 11)
    for name in ("ddpm", "ddpm_cache", "analytic"):
        out = run(m, name, num=6, length=16, steps=10, template=template, fixed=fixed)
        assert torch.equal(out.tokens[:, :5], template[:5].expand(6, 5))
        assert torch.equal(out.fixed, fixed.expand(6, 16))
        assert torch.all(out.tokens < V)


def test_infill_fills_exactly_the_masked_span() -> None:
    tok = ByteTokenizer()
    t = build_template(tok, "ab [MASK:3] cd")
    assert t.kind == "infill" and t.length == 1 + 3 + 3 + 3 and t.num_free == 3
    assert t.ids[0] == tok.bos_id and bytes(t.ids[1:4].tolist()) == b"ab " and bytes(t.ids[7:].tolist()) == b" cd"
    assert t.fixed.tolist() == [True] * 4 + [False] * 3 + [True] * 3
    m = mdlm(vocab=tok.vocab_size)
    out = run(m, "ddpm_cache", num=5, length=t.length, steps=20, template=t.ids, fixed=t.fixed)
    changed = (out.tokens != t.ids).any(dim=0)  # positions that differ from the template in some row
    assert not changed[t.fixed].any()  # nothing outside the span moved
    assert torch.all(out.tokens[:, 4:7] < tok.vocab_size)  # the span is filled with real ids


def test_prompt_parsing_and_errors() -> None:
    parts = parse_prompt("[MASK] x [MASK:12]")
    assert [(p.text, p.masks) for p in parts] == [("", 1), (" x ", 0), ("", 12)]
    for bad in ("a [MASK:0] b", "a [MASK:x] b", "[MASK 3]"):
        with pytest.raises(SamplingError, match="MASK"):
            parse_prompt(bad)
    tok = ByteTokenizer()
    prefix = build_template(tok, "hello", default_length=10)
    assert prefix.kind == "prefix" and prefix.length == 10 and prefix.num_free == 4  # BOS + 5 bytes fixed
    with pytest.raises(SamplingError, match="raise --length"):
        build_template(tok, "hello", 6)
    with pytest.raises(SamplingError, match="--length is 3"):
        build_template(tok, "ab [MASK:2]", 3)
    assert build_template(tok, "ab [MASK:2]", 8).num_free == 2 + 2  # BOS + "ab " + 2 masks = 6, then 2 appended


# ---- semi-autoregressive ------------------------------------------------------------------------


def test_window_starts() -> None:
    assert window_starts(16, 16, 8) == [0]
    assert window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert window_starts(41, 16, 8) == [0, 8, 16, 24, 25]  # the last window ends at the sample's end
    assert window_starts(20, 16, 16) == [0, 4]


def test_semi_ar_samples_longer_than_the_window() -> None:
    m = mdlm()
    seen: list[int] = []
    hook = m.backbone.register_forward_hook(lambda _mod, args, _out: seen.append(args[0].shape[1]))
    try:
        out = run(m, "ddpm_cache", num=2, length=50, steps=8, window=16, stride=8)
    finally:
        hook.remove()
    assert out.tokens.shape == (2, 50) and torch.all(out.tokens < V)
    assert set(seen) == {16}  # the network never sees more than the trained length
    assert window_starts(50, 16, 8) == [0, 8, 16, 24, 32, 34]
    assert any("6 windows of 16 (stride 8)" in n for n in out.notes), out.notes


# ---- temperature and top-p ----------------------------------------------------------------------


def test_adjust_log_probs_numbers() -> None:
    logp = torch.tensor([0.5, 0.3, 0.2, 0.0]).log()
    assert torch.equal(adjust_log_probs(logp), logp)  # identity at T = 1, p = 1
    torch.testing.assert_close(adjust_log_probs(logp, top_p=0.7).exp(), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(adjust_log_probs(logp, top_p=0.45).exp(), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    hot = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    torch.testing.assert_close(adjust_log_probs(logp[:3], temperature=2.0).exp(), hot / hot.sum())


def test_temperature_zero_is_greedy_and_top_p_narrows() -> None:
    m = mdlm()
    # one step from all-masks reveals (almost surely) every position as the argmax of the same prediction
    a = run(m, "ddpm", seed=0, num=3, length=10, steps=1, temperature=0.0)
    b = run(m, "ddpm", seed=9, num=3, length=10, steps=1, temperature=0.0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens[0], a.tokens[2])
    narrow = run(m, "ddpm", num=64, length=4, steps=1, top_p=0.05)  # one step: the top id at each position
    wide = run(m, "ddpm", num=64, length=4, steps=1)
    assert narrow.tokens.unique().numel() < wide.tokens.unique().numel()
    with pytest.raises(SamplingError, match="top_p"):
        run(m, "ddpm", num=1, length=4, steps=1, top_p=0.0)
    with pytest.raises(SamplingError, match="temperature"):
        run(m, "ddpm", num=1, length=4, steps=1, temperature=-1.0)


def test_ar_sampler_prefix_temperature_and_infill_error() -> None:
    m = ar(bos_id=0)
    template = torch.tensor([0, 7, 8, 9] + [0] * 6)
    fixed = torch.tensor([True] * 4 + [False] * 6)
    out = run(m, "ancestral", num=3, length=10, steps=1, template=template, fixed=fixed, temperature=0.5, top_p=0.9)
    assert torch.equal(out.tokens[:, :4], template[:4].expand(3, 4)) and out.nfe == 6
    greedy = run(m, "ancestral", seed=1, num=2, length=8, steps=1, temperature=0.0)
    assert torch.equal(greedy.tokens[0], greedy.tokens[1])  # argmax everywhere: every row is the same
    holes = fixed.clone()
    holes[8] = True
    with pytest.raises(SamplingError, match="prefix prompt"):
        run(m, "ancestral", num=1, length=10, steps=1, template=template, fixed=holes)
    assert list(m.samplers()) == ["ancestral"]
    assert not isinstance(m, Denoiser)  # ar has no noise process: no denoise hook (optional; the CLI checks)


def test_unknown_sampler_lists_the_family_samplers() -> None:
    with pytest.raises(SamplingError) as err:
        get_sampler(mdlm(), "ddpn")
    assert "ddpm_cache, ddpm, analytic" in str(err.value) and "Did you mean 'ddpm'" in str(err.value)
    with pytest.raises(SamplingError, match="choose one of ancestral"):
        get_sampler(ar(), "ddpm")


# ---- analytic = ddpm posterior, denoise, nll_samples --------------------------------------------


def test_analytic_transition_matches_ddpm_posterior() -> None:
    """For absorbing noise the Tweedie update reveals with probability (move_t - move_s) / move_t, as ddpm."""
    sched = get_schedule("loglinear")
    p = torch.softmax(torch.randn(5, V, generator=gen(0), dtype=torch.float64), dim=-1)
    p = torch.cat([p, torch.zeros(5, 1, dtype=torch.float64)], dim=-1)  # (5, V+1), mask column 0
    t, s = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    probs = analytic_transition(p, sched.sigma(t), sched.sigma(s))
    mt, ms = sched.move_chance(t), sched.move_chance(s)
    torch.testing.assert_close(probs[:, -1], (ms / mt).expand(5))
    torch.testing.assert_close(probs[:, :-1], p[:, :-1] * (mt - ms) / mt)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=torch.float64))


def test_mdlm_denoise_masks_only_valid_and_scores() -> None:
    m = mdlm()
    tokens = torch.randint(0, V, (2, 30), generator=gen(0))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[:, 0] = False
    res = m.denoise(tokens, valid, 0.5, gen(1))
    assert res.noised is not None and res.corrupted is not None
    assert not res.noised[:, 0].any() and 0.3 < res.metrics["mask_rate"] < 0.7
    assert torch.equal(res.corrupted[~res.noised], tokens[~res.noised])
    assert torch.equal(res.reconstructed[~res.noised], tokens[~res.noised])  # unmasked ids are copied
    acc = ((res.reconstructed == tokens) & valid).sum().item() / valid.sum().item()
    assert res.metrics["accuracy"] == pytest.approx(acc)
    clean = m.denoise(tokens, valid, 0.0, gen(1))
    assert clean.metrics["accuracy"] == 1.0 and math.isnan(clean.metrics["masked_accuracy"])
    sampled = m.denoise(tokens, valid, 0.9, gen(1), steps=5)
    assert torch.all(sampled.reconstructed < V) and "ddpm" in sampled.method


def test_mdlm_val_nll_is_the_masking_rate_nelbo_draw() -> None:
    """Column k = span / m_k * sum of -log p(x0 | x_m) over the masked counted tokens; nothing else is masked,
    and a time-conditioned model sees sigma = -log(1 - m) (no schedule involved)."""
    from difflm.evaluation import counted_positions, make_val_noise

    for tc in (False, True):
        m = mdlm(time_conditioning=tc)
        tokens = torch.randint(0, V, (3, 16), generator=gen(0))
        counted = counted_positions(tokens)
        noise = make_val_noise([5, 6, 7], 3, 16, seed=11, device="cpu")
        seen: list[torch.Tensor] = []
        real = m.backbone.forward

        def spy(ids: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
            seen.append(ids.clone())
            return real(ids, sigma)

        m.backbone.forward = spy  # type: ignore[method-assign]
        with torch.no_grad():
            out = m.val_nll(tokens, counted, noise)  # (3, K)
        del m.backbone.forward
        assert out.shape == (3, 3) and out.dtype == torch.float64 and torch.all(out >= 0)
        for k in range(3):
            masked = noise.masked(k, counted)
            assert torch.equal(seen[k] == m.mask_id, masked) and not masked[:, [0, -1]].any()
            rate = noise.rates[:, k]
            sigma = -torch.log1p(-rate).float()
            with torch.no_grad():
                logp = m.log_probs(torch.where(masked, m.mask_id, tokens), sigma)  # (3, 16, V+1)
            nll = -logp.gather(-1, tokens[..., None])[..., 0].masked_fill(~masked, 0).double().sum(-1)
            torch.testing.assert_close(out[:, k], noise.weights[:, k] / rate * nll, rtol=1e-6, atol=1e-9)
