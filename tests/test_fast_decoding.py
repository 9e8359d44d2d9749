"""Fast decoding for masked families (difflm/families/mdlm/fast.py): threshold remasking, block decoding and
Fast-dLLM's prefix / dual KV caches; plus the backbone's additive cache arguments."""

from __future__ import annotations


import pytest
import torch

from difflm.families.mdlm.model import MDLM
from difflm.models import Backbone
from difflm.sampling import SampleOptions, SamplingError, get_sampler
from difflm.schedules import get_schedule
from tests.helpers import one_thread, randomize_zero_init  # noqa: F401 (one_thread: autouse fixture)

V = 20



def mdlm(dtype: torch.dtype = torch.float32, scale: float = 0.3) -> MDLM:
    torch.manual_seed(0)
    m = MDLM(Backbone(V + 1, V + 1, d_model=32, n_layers=2, n_heads=4, cond_dim=16), V, get_schedule("loglinear"))
    randomize_zero_init(m, scale=scale)
    return m.to(dtype).eval()


def run(model: MDLM, name: str = "ddpm", seed: int = 0, **kw: object):  # type: ignore[no-untyped-def]
    return get_sampler(model, name)(SampleOptions(**kw), torch.Generator().manual_seed(seed))  # type: ignore[arg-type]


def test_threshold_one_equals_low_confidence_one_token_per_step() -> None:
    m = mdlm(scale=1.5)  # peaked: a lower threshold would reveal several tokens in a step
    L = 12
    for seed in (0, 1):
        low = run(m, "ddpm", seed, num=3, length=L, steps=L, remasking="low_confidence", temperature=0.9)
        thr = run(m, "ddpm_cache", seed, num=3, length=L, steps=L, remasking="threshold", threshold=1.0,
                  temperature=0.9)
        assert torch.equal(low.tokens, thr.tokens)
        assert thr.nfe == L  # one reveal per step


def test_threshold_reveals_in_parallel_and_fills_everything() -> None:
    m = mdlm(scale=1.5)  # peaked predictions: many positions clear a low threshold
    out = run(m, "ddpm", num=4, length=16, steps=16, remasking="threshold", threshold=0.3, temperature=0.0)
    assert int((out.tokens >= V).sum()) == 0
    assert out.nfe < 16  # fewer network calls than one reveal per step


def test_block_decoding_fills_blocks_left_to_right() -> None:
    """With block decoding, block k is complete before block k + 1 gets its first token."""
    m = mdlm()
    seen: list[torch.Tensor] = []
    from difflm.families.mdlm import fast

    real = fast.threshold_step

    def spy(x, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(x.clone())
        return real(x, *a, **k)

    fast.threshold_step = spy  # type: ignore[assignment]
    try:
        run(m, num=2, length=12, block_length=4, remasking="threshold", threshold=1.0)
    finally:
        fast.threshold_step = real  # type: ignore[assignment]
    assert [s.shape[1] for s in seen] == [4] * 12  # each step sees only its 4-position block


def test_prefix_cache_is_exact_for_one_block_and_dual_equals_per_row() -> None:
    m = mdlm(torch.float64)
    kw = dict(num=3, length=12, steps=4, remasking="low_confidence", temperature=0.8)
    base = run(m, **kw)
    pre = run(m, **kw, cache="prefix")  # one block: nothing before it, the cache holds nothing -> exact
    assert torch.equal(base.tokens, pre.tokens)
    # batched dual cache with threshold (rows finish blocks at different steps) == each row on its own
    kw = dict(length=12, block_length=4, remasking="threshold", threshold=0.2, temperature=0.0, cache="dual")
    m = mdlm(torch.float64, scale=1.5)
    template = torch.full((4, 12), 3)
    fixed = torch.zeros(4, 12, dtype=torch.bool)
    fixed[1, :3] = True  # rows differ: row 1 is prompted
    fixed[2, 5] = True
    template[2, 5] = 7
    batch = run(m, num=4, template=template, fixed=fixed, **kw)
    for i in range(4):
        row = run(m, num=1, template=template[i], fixed=fixed[i], **kw)
        assert torch.equal(batch.tokens[i], row.tokens[0]), i


def test_caches_cut_compute_but_stay_close_to_uncached() -> None:
    """The cached calls see fewer positions; with a full refresh per block the first step is exact."""
    m = mdlm(torch.float64)
    kw = dict(num=2, length=12, block_length=4, remasking="low_confidence", steps=4, temperature=0.0)
    ref = run(m, **kw)
    for cache in ("prefix", "dual"):
        out = run(m, **kw, cache=cache)
        assert out.nfe == ref.nfe
        assert (out.tokens == ref.tokens).float().mean() > 0.5  # approximate, not arbitrary


def test_backbone_kv_cache_matches_full_forward() -> None:
    """past_kv + positions give the logits of the full forward at those positions (no mask: exact)."""
    torch.manual_seed(0)
    bb = Backbone(V, V, d_model=32, n_layers=2, n_heads=4, cond_dim=16).double()
    randomize_zero_init(bb, scale=0.3)
    ids = torch.randint(0, V, (2, 10))
    kv: list = []
    full = bb(ids, None, kv_out=kv)
    assert torch.equal(full, bb(ids))  # kv_out alone changes nothing
    past = [(torch.cat([k[:, :, :3], k[:, :, 7:]], 2), torch.cat([v[:, :, :3], v[:, :, 7:]], 2)) for k, v in kv]
    part = bb(ids[:, 3:7], None, positions=torch.arange(3, 7), past_kv=past)
    assert torch.allclose(part, full[:, 3:7], atol=1e-12)


def test_fast_options_refused_where_they_do_not_apply() -> None:
    m = mdlm()
    with pytest.raises(SamplingError, match="not analytic"):
        run(m, "analytic", num=1, length=8, steps=2, cache="dual", block_length=4)
    with pytest.raises(SamplingError, match="threshold"):
        run(m, num=1, length=8, steps=2, remasking="threshold", threshold=0.0)


def test_sample_help_documents_fast_options_and_bench_parses_settings() -> None:
    from click.testing import CliRunner

    from orchestrator.bench.sampling import parse_setting
    from orchestrator.cli import main

    out = CliRunner().invoke(main, ["sample", "--help"]).output
    for opt in ("--remasking", "threshold", "--threshold", "--block-length", "--cache", "prefix", "dual"):
        assert opt in out, opt
    assert parse_setting("threshold=0.7,block=64,cache=dual", 32, 100) == (
        None, {"steps": 100, "remasking": "threshold", "threshold": 0.7, "block_length": 32, "cache": "dual"})
    assert parse_setting("sampler=ddpm,remasking=low_confidence,steps=L", 32, 100) == (
        "ddpm", {"steps": 32, "remasking": "low_confidence"})
    with pytest.raises(ValueError, match="unknown key 'blocks'"):
        parse_setting("blocks=4", 32, 100)


def test_bijective_backbone_kv_cache_matches_full_forward_and_dual_cache_runs_batched() -> None:
    """The bijective backbone (coupling blocks whose sub-networks attend, then ordinary blocks) takes the same
    cache arguments: a cached partial forward gives the full forward's logits, and its batched dual-cache
    sampling equals per-row runs (issue 25: the Fast-dLLM caches for every masked family)."""
    from difflm.families.bijective import Bijective, BijectiveBackbone

    torch.manual_seed(0)
    bb = BijectiveBackbone(V + 1, V + 1, d_model=32, n_layers=3, n_heads=2, cond_dim=16, bijective_blocks=2).double()
    randomize_zero_init(bb, scale=0.3)
    ids = torch.randint(0, V, (2, 10))
    kv: list = []
    full = bb(ids, None, kv_out=kv)
    assert len(kv) == 2 * 2 + 1  # two sub-networks per coupling block, then one ordinary block
    assert torch.equal(full, bb(ids))  # kv_out alone changes nothing
    past = [(torch.cat([k[:, :, :3], k[:, :, 7:]], 2), torch.cat([v[:, :, :3], v[:, :, 7:]], 2)) for k, v in kv]
    part = bb(ids[:, 3:7], None, positions=torch.arange(3, 7), past_kv=past)
    assert torch.allclose(part, full[:, 3:7], atol=1e-12)

    m = Bijective(bb, V, get_schedule("loglinear")).double().eval()
    kw = dict(length=12, block_length=4, remasking="threshold", threshold=0.2, temperature=0.0, cache="dual")
    template = torch.full((3, 12), 3)
    fixed = torch.zeros(3, 12, dtype=torch.bool)
    fixed[1, :3] = True
    batch = run(m, num=3, template=template, fixed=fixed, **kw)
    assert int((batch.tokens >= V).sum()) == 0
    for i in range(3):
        row = run(m, num=1, template=template[i], fixed=fixed[i], **kw)
        assert torch.equal(batch.tokens[i], row.tokens[0]), i
