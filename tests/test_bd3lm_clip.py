"""bd3lm's data-driven clipped noise schedule (difflm/families/bd3lm/clipped.py): BD3-LMs' candidate grid, the
variance argmin (summed across workers), in-range mask resampling, the range in the weights, the runner's hook.

Each test was seen red with the code broken once: the grid's last window dropped; argmax for argmin; a biased
(n) variance; the all-reduce result ignored (in clipped.search and in the runner); training drawing from the
schedule instead of the range; resampling without the lower bound or with one mask too many; the loaded buffer
not copied to the host range or an old checkpoint's missing key not filled; the width/resample validators off;
the runner not calling the hook or seeding it with fresh entropy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from difflm.evaluation import counted_positions
from difflm.families import build_model
from difflm.families.bd3lm import BD3LM, clipped
from difflm.families.bd3lm.config import Bd3lmConfig, Bd3lmModelConfig, ClipSearchConfig
from difflm.models import Backbone
from difflm.schedules import get_schedule
from difflm.types import ValTuner
from tests.helpers import RecordingLogger, one_thread, randomize_zero_init  # noqa: F401 (one_thread: autouse fixture)

V = 12
EPS = 1e-3
OWT = [0.5, 0.6, 0.7, 0.8, 0.9]  # BD3-LMs' OpenWebText recipe (README: algo.clip_search_widths)


def bd3(block: int = 4, search: ClipSearchConfig | None = None, **kw: object) -> BD3LM:
    torch.manual_seed(0)
    b = Backbone(V + 1, V + 1, d_model=32, n_layers=2, n_heads=4, cond_dim=16).double()
    randomize_zero_init(b, scale=0.5)
    return BD3LM(b, V, get_schedule("loglinear"), block_size=block, clip_search=search, **kw).eval()  # type: ignore[arg-type]


def batches(n: int, B: int = 3, L: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, V, (B, L), generator=g)
        out.append((x, counted_positions(x)))
    return out


def test_candidate_grid_is_bd3lms() -> None:
    # BD3-LMs (metrics.py init_valid_vars): full range, then per width [clamp(i, eps), i + w] over a float32 arange
    expected = [(EPS, 1.0)]
    for w in OWT:
        for i in torch.arange(0, 1 - w + 0.05, 0.05).tolist():
            expected.append((max(i, EPS), i + w))
    got = clipped.candidate_ranges(OWT, 0.05, EPS, block_size=4)
    assert len(got) == len(expected) == 36
    assert all(a == pytest.approx(b, abs=1e-6) and c == pytest.approx(d, abs=1e-6) for (a, c), (b, d) in zip(got, expected))
    assert clipped.candidate_ranges([0.7, 0.9], 0.1, EPS, 4) == [
        (EPS, 1.0), (EPS, 0.7), (0.1, 0.8), (0.2, 0.9), (0.3, 1.0), (EPS, 0.9), (0.1, 1.0)]
    assert clipped.candidate_ranges(OWT, 0.05, EPS, block_size=1) == [(EPS, 1.0), (1.0, 1.0)]  # 1: full vs AR NLL
    assert clipped.candidate_ranges([1.0], 0.05, EPS, 4) == [(EPS, 1.0)]  # no duplicate of the full range


def _independent_variances(model: BD3LM, data: list, cands: list, seed: int) -> torch.Tensor:
    """The search's statistic recomputed here: per batch, the sample variance over all blocks of the batch of
    each block's mean loss over its counted tokens, summed over batches; every candidate of a batch starts
    from the same generator state."""
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(cands), dtype=torch.float64)
    for x, c in data:
        state = g.get_state()
        for i, rng in enumerate(cands):
            g.set_state(state)
            terms = model.loss_terms(x, c, g, rng)[0].detach()
            means = []
            for row in range(x.shape[0]):
                for start in range(0, x.shape[1], model.block_size):
                    cnt = c[row, start:start + model.block_size]
                    if cnt.any():
                        means.append(float(terms[row, start:start + model.block_size].sum()) / int(cnt.sum()))
            total[i] += torch.tensor(means, dtype=torch.float64).var()
    return total


def test_search_takes_the_argmin_of_independently_computed_variances() -> None:
    search = ClipSearchConfig(widths=[0.5, 0.8], delta=0.1, batches=3)
    model = bd3(4, search)
    assert isinstance(model, ValTuner) and model.noise_clip == (EPS, 1.0)  # starts from the full range
    cands = model.clip_candidates()
    data = batches(3)
    want = _independent_variances(model, data, cands, seed=7)
    out = model.val_tune(data, torch.Generator().manual_seed(7), lambda t: t)
    best = int(torch.argmin(want))
    assert model.noise_clip == pytest.approx(cands[best]) and best != 0  # a clipped range beats the full one here
    assert (out.metrics["clip_beta"], out.metrics["clip_omega"]) == pytest.approx(cands[best])
    got = torch.tensor([out.scalars[f"clip_var_{lo:.3f}_{hi:.3f}"] for lo, hi in cands], dtype=torch.float64)
    assert torch.allclose(got, want / len(data), rtol=1e-9)
    assert want.max() > 2 * want.min()  # the candidates really differ
    # clip_search.update false (BD3-LMs' fix_clipping): the same variances, the range stays
    fixed = bd3(4, search.model_copy(update={"update": False}))
    out2 = fixed.val_tune(data, torch.Generator().manual_seed(7), lambda t: t)
    assert fixed.noise_clip == (EPS, 1.0) and out2.scalars == out.scalars


def test_worker_moments_are_summed_before_the_variance() -> None:
    """Two workers with half a batch each pick what one worker with the whole batch picks: the moments
    (n, sum, sum of squares) are summed across workers, so the variance is over the gathered blocks."""
    cands = [(EPS, 1.0), (0.2, 0.7), (0.5, 1.0)]
    g = torch.Generator().manual_seed(3)
    values = {c: torch.randn(4, 8, generator=g, dtype=torch.float64) * (i + 1) for i, c in enumerate(cands)}
    rows = {0: slice(0, 2), 1: slice(2, 4)}

    def terms_for(part: slice | None):  # type: ignore[no-untyped-def]
        return lambda x, c, gen, rng: values[rng][part] if part is not None else values[rng]

    x = torch.zeros(4, 8, dtype=torch.long)
    c = torch.ones(4, 8, dtype=torch.bool)
    whole = clipped.search(terms_for(None), cands, [(x, c)], 2, torch.Generator(), lambda t: t)
    seen: list[torch.Tensor] = []
    clipped.search(terms_for(rows[1]), cands, [(x[2:], c[2:])], 2, torch.Generator(), lambda t: seen.append(t.clone()) or t)
    split = clipped.search(terms_for(rows[0]), cands, [(x[:2], c[:2])], 2, torch.Generator(), lambda t: t + seen[0])
    assert torch.allclose(split, whole, rtol=1e-12)
    means = values[cands[2]].view(4, 4, 2).mean(-1).flatten()
    assert whole[2] == pytest.approx(float(means.var()), rel=1e-12)


def test_training_draws_lie_in_the_searched_range(monkeypatch: pytest.MonkeyPatch) -> None:
    model = bd3(4, ClipSearchConfig(widths=[0.5], delta=0.25, batches=2))
    model.val_tune(batches(2), torch.Generator().manual_seed(0), lambda t: t)
    lo, hi = model.noise_clip  # type: ignore[misc]
    assert (lo, hi) != (EPS, 1.0)
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    inner = model.block_times

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        out = inner(*a, **k)
        drawn.append(out)
        return out

    monkeypatch.setattr(model, "block_times", spy)
    x = torch.randint(0, V, (64, 16), generator=torch.Generator().manual_seed(1))
    model.train()(x, counted_positions(x), torch.Generator().manual_seed(2))
    m, w = drawn[0]
    assert float(m.min()) >= lo and float(m.max()) <= hi and float(m.max() - m.min()) > 0.8 * (hi - lo)
    assert torch.allclose(w, 1 / m)


def test_resample_keeps_every_blocks_masked_share_in_range() -> None:
    model = bd3(4, noise_clip=(0.3, 0.8), resample_masks=True).train()
    x = torch.randint(0, V, (500, 16), generator=torch.Generator().manual_seed(0))
    c = counted_positions(x)  # the first block has 3 counted tokens (BOS), the last 3 (block-final EOS)
    _, _, masked = model.loss_terms(x, c, torch.Generator().manual_seed(1), model.noise_clip)
    share = masked.view(500, 4, 4).sum(-1).double() / c.view(500, 4, 4).sum(-1)
    assert float(share.min()) >= 0.3 and float(share.max()) <= 0.8
    assert not (masked & ~c).any()
    # the law of BD3-LMs' redraw-until-in-range: Binomial(n, m) truncated to the allowed counts, here n = 4,
    # m = 0.5, [0.3, 0.8] -> counts {2, 3} with probabilities 6/10, 4/10
    n = 40_000
    plain = torch.zeros(n, 4, dtype=torch.bool)
    move = torch.full((n, 4), 0.5, dtype=torch.float64)
    valid = torch.ones(n, 4, dtype=torch.bool)
    got = clipped.resample_block_masks(plain, move, valid, 4, (0.3, 0.8), True, torch.Generator().manual_seed(2))
    counts = torch.bincount(got.sum(-1), minlength=5).double() / n
    assert torch.allclose(counts, torch.tensor([0, 0, 0.6, 0.4, 0], dtype=torch.float64), atol=0.015)
    assert (got.double().mean(0) - 0.6).abs().max() < 0.015  # positions uniform given the count: E[count] / 4
    # beta at sampling_eps: no lower bound (a block may stay unmasked); a range no count fits keeps the plain draw
    low = clipped.resample_block_masks(plain, move, valid, 4, (EPS, 0.5), False, torch.Generator().manual_seed(2))
    assert torch.allclose(torch.bincount(low.sum(-1), minlength=5).double() / n,
                          torch.tensor([1, 4, 6, 0, 0], dtype=torch.float64) / 11, atol=0.015)
    odd = clipped.resample_block_masks(plain, move, valid, 4, (0.3, 0.45), True, torch.Generator().manual_seed(2))
    assert torch.equal(odd, plain)


def test_searched_range_travels_in_the_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    search = ClipSearchConfig(widths=[0.5], delta=0.25, batches=2)
    model = bd3(4, search)
    model.val_tune(batches(2), torch.Generator().manual_seed(0), lambda t: t)
    chosen = model.noise_clip
    save_file(dict(model.state_dict()), str(tmp_path / "w.safetensors"))
    fresh = bd3(4, search)
    assert fresh.noise_clip == (EPS, 1.0) != chosen
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    assert fresh.noise_clip == chosen
    # bf16 (DeepSpeed's bf16 mode casts float buffers): the int64 buffer keeps the range exact
    assert fresh.bfloat16().clip_range.dtype == torch.int64
    # weights saved before clip_range existed: the spec's starting range; a model without a clip ignores it
    old = {k: v for k, v in model.state_dict().items() if k != "clip_range"}
    legacy = bd3(4, noise_clip=(0.3, 0.8))
    legacy.load_state_dict(old)
    assert legacy.noise_clip == (0.3, 0.8)
    plain = bd3(4)
    plain.load_state_dict(model.state_dict())
    assert plain.noise_clip is None and "clip_range" not in plain.state_dict()


def test_config_refusals_name_the_field() -> None:
    def err(**kw: object) -> str:
        with pytest.raises(ValidationError) as info:
            Bd3lmConfig(**kw)  # type: ignore[arg-type]
        return str(info.value)

    assert "clip_search.widths" in err(clip_search={"widths": [0.5, 1.5]}) and "(0, 1]" in err(clip_search={"widths": [0]})
    assert "clip_search.widths" in err(clip_search={"widths": []})
    assert "clip_search.delta" in err(clip_search={"delta": 0})
    assert "clip_search.batches" in err(clip_search={"batches": 0})
    assert "resample_masks needs a clip range" in err(resample_masks=True)
    assert "resample_masks needs block_size >= 2" in err(resample_masks=True, block_size=1, noise_clip=(0.3, 0.8))
    ok = Bd3lmConfig(block_size=1, clip_search={"widths": [0.5]})  # block 1: full range vs [1, 1]
    model = build_model(Bd3lmModelConfig(size=None, d_model=16, n_layers=1, n_heads=2, cond_dim=8), ok, 20)
    assert isinstance(model, BD3LM) and model.clip_candidates() == [(EPS, 1.0), (1.0, 1.0)]


def test_runner_searches_at_eval_points_and_resumes_with_the_range(tmp_path: Path) -> None:
    from difflm.data import prepare_data
    from orchestrator.spec.run import RunSpec
    from orchestrator.train.engine import TorchEngine
    from orchestrator.train.runner import Runner, WorkerContext

    spec = RunSpec.model_validate({
        "model": {"family": "bd3lm", "size": None, "d_model": 16, "n_layers": 1, "n_heads": 2, "cond_dim": 8},
        "diffusion": {"block_size": 4, "sample_steps": 2, "resample_masks": True,
                      "clip_search": {"widths": [0.5], "delta": 0.25, "batches": 2}},
        "data": {"source": "builtin", "seq_len": 16, "max_documents": 60, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_every": 2,
                  "checkpoint_every": 4, "log_every": 2, "num_samples": 0, "eval_samples": 2, "eval_batches": 2},
        "scaling": {"deepspeed": False, "device": "cpu"},
    })
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    cpu = torch.device("cpu")

    def runner(log: RecordingLogger | None = None, events: list | None = None) -> Runner:
        torch.manual_seed(0)
        model = build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size)
        emit = (lambda k, p: events.append(p)) if events is not None else (lambda k, p: None)
        return Runner(spec, data, TorchEngine(model, spec.train, cpu), WorkerContext(0, 1, cpu), logger=log, emit=emit)

    calls: list[tuple[int, int, tuple[int, int], torch.Tensor]] = []
    log, events = RecordingLogger(), []
    r = runner(log, events)
    inner = r.engine.module.val_tune

    def spy(bs, gen, all_reduce):  # type: ignore[no-untyped-def]
        calls.append((r.step, len(bs), tuple(bs[0][0].shape), bs[0][1]))
        return inner(bs, gen, all_reduce)

    r.engine.module.val_tune = spy  # type: ignore[method-assign]
    r.run()
    assert [(s, n, shape) for s, n, shape, _ in calls] == [(2, 2, (2, 16)), (4, 2, (2, 16))]  # not at step 0
    assert torch.equal(calls[0][3], counted_positions(torch.zeros(2, 16)))
    betas, omegas = log.scalars["val/clip_beta"], log.scalars["val/clip_omega"]
    assert [s for s, _ in betas] == [2, 4] and any(k.startswith("val/clip_var_0.250_0.750") for k in log.scalars)
    model: BD3LM = r.engine.module  # type: ignore[assignment]
    assert model.noise_clip == pytest.approx((betas[-1][1], omegas[-1][1]))
    assert r.last_val["val/clip_beta"] == betas[-1][1]
    assert any("clip search: training masking rates" in str(e.get("message")) for e in events)
    # the same step tunes identically (seeded by eval_seed and step), so a resumed run searches as the original
    assert r.val_tune().scalars == r.val_tune().scalars
    r.save(tmp_path / "ckpt")
    back = runner()
    assert back.engine.module.noise_clip == (EPS, 1.0)  # type: ignore[union-attr]
    back.load(tmp_path / "ckpt")
    assert back.engine.module.noise_clip == model.noise_clip  # type: ignore[union-attr]


CPU_ = torch.device("cpu")
TWO = {
    "model": {"family": "bd3lm", "size": None, "d_model": 16, "n_layers": 1, "n_heads": 2, "cond_dim": 8},
    "diffusion": {"block_size": 4, "sample_steps": 2, "clip_search": {"widths": [0.5, 0.8], "delta": 0.1, "batches": 2}},
    "data": {"source": "builtin", "seq_len": 16, "max_documents": 60},
    "train": {"max_steps": 4, "micro_batch_size": 2, "eval_every": 4, "checkpoint_every": 4, "num_samples": 0},
    "scaling": {"deepspeed": False, "device": "cpu", "num_workers": 2},
}


def _two_worker(rank: int, world: int, port: int, cache: str, out: str) -> None:
    import torch.distributed as dist

    from difflm.data import prepare_data
    from orchestrator.spec.run import RunSpec
    from orchestrator.train.engine import TorchEngine
    from orchestrator.train.runner import Runner, WorkerContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec = RunSpec.model_validate({**TWO, "data": {**TWO["data"], "cache_dir": cache}})
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    torch.manual_seed(0)
    model = build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size)
    runner = Runner(spec, data, TorchEngine(model, spec.train, CPU_), WorkerContext(rank, world, CPU_))
    seen: dict = {}
    inner = model.val_tune

    def spy(bs, gen, all_reduce):  # type: ignore[no-untyped-def]
        seen.update(batches=[(x.clone(), c.clone()) for x, c in bs], state=gen.get_state())
        return inner(bs, gen, all_reduce)

    model.val_tune = spy  # type: ignore[method-assign]
    runner.step = 3
    tuned = runner.val_tune()
    torch.save({"scalars": tuned.scalars, "clip": model.noise_clip, **seen}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()



def test_two_workers_pick_one_range_from_their_summed_moments(tmp_path: Path) -> None:
    """Two gloo processes, each with its own val shard and noise, end with the same range, and its variances are
    those of the blocks of both workers together (recomputed here from what each worker was given)."""
    import torch.multiprocessing as mp

    from difflm.data import prepare_data
    from orchestrator.spec.run import RunSpec
    from tests.helpers import free_port

    cache = tmp_path / "cache"
    spec = RunSpec.model_validate({**TWO, "data": {**TWO["data"], "cache_dir": str(cache)}})
    data = prepare_data(spec.data, spec.tokenizer, log=lambda _: None)
    mp.spawn(_two_worker, args=(2, free_port(), str(cache), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["clip"] == r1["clip"] and r0["scalars"] == r1["scalars"]
    assert not torch.equal(r0["batches"][0][0], r1["batches"][0][0])  # different val shards
    torch.manual_seed(0)
    model = build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size).eval()
    cands = model.clip_candidates()
    moments = []
    for r in (r0, r1):
        g = torch.Generator()
        g.set_state(r["state"])
        clipped.search(lambda x, c, gen, rng: model.loss_terms(x, c, gen, rng)[0], cands, r["batches"], 4, g,
                       lambda t: moments.append(t.clone()) or t)
    var = clipped.summed_variances(moments[0] + moments[1]) / len(r0["batches"])
    got = torch.tensor([r0["scalars"][f"clip_var_{lo:.3f}_{hi:.3f}"] for lo, hi in cands], dtype=torch.float64)
    assert torch.allclose(got, var, rtol=1e-6)
    assert r0["clip"] == pytest.approx(cands[int(torch.argmin(var))])
    alone = clipped.summed_variances(moments[0]) / len(r0["batches"])
    assert not torch.allclose(got, alone, rtol=1e-3)  # rank 0's blocks alone give other numbers
