"""The val protocol (difflm.evaluation): common random numbers, the masking-rate NELBO, its error bars,
the shared token rule, and how sweeps rank trials with them (orchestrator.sweep.ranking). In-process, tiny models."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from difflm.data import prepare_data
from difflm.data.pipeline import PreparedData
from difflm.evaluation import (
    RATE_MAX,
    RATE_MIN,
    ValDraws,
    counted_positions,
    draws_path,
    load_val_draws,
    paired_difference,
    save_val_draws,
    val_pass,
)
from difflm.families import build_model
from difflm.families.mdlm.model import MDLM
from difflm.schedules import MDLM_SCHEDULES
from orchestrator.rundir.checkpoints import special_ids
from orchestrator.train.engine import TorchEngine
from orchestrator.sweep.ranking import Candidate, rank_candidates
from orchestrator.train.runner import Runner, WorkerContext
from orchestrator.spec.run import RunSpec
from tests.helpers import CPU

SEQ = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread avoids oversubscription on shared CPUs (speed only)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spec(cache: Path, family: str = "mdlm", schedule: str | None = None, time_conditioning: bool = False,
          **train: Any) -> RunSpec:
    raw: dict[str, Any] = {
        "model": {"family": family, "size": None, "d_model": 32, "n_layers": 2, "n_heads": 2, "cond_dim": 16},
        "data": {"source": "builtin", "seq_len": SEQ, "max_documents": 200, "cache_dir": str(cache)},
        "train": {"max_steps": 40, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_samples": 4,
                  "num_samples": 0, **train},
        "scaling": {"deepspeed": False, "device": "cpu"},
    }
    if family != "ar":  # ar has no noise process: no diffusion section, no time conditioning
        raw["model"]["time_conditioning"] = time_conditioning
        raw["diffusion"] = {"schedule": schedule}
    return RunSpec.model_validate(raw)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evalcache")


@pytest.fixture(scope="module")
def data(cache: Path) -> PreparedData:
    spec = _spec(cache)
    return prepare_data(spec.data, spec.tokenizer, log=lambda _: None)


def _runner(spec: RunSpec, data: PreparedData, rank: int = 0, world: int = 1, seed: int = 0,
            val_dir: Path | None = None) -> Runner:
    torch.manual_seed(seed)
    model = build_model(spec.model, spec.diffusion, data.tokenizer.vocab_size, **special_ids(data.tokenizer))
    return Runner(spec, data, TorchEngine(model, spec.train, CPU), WorkerContext(rank, world, CPU), val_dir=val_dir)


def _validate_emulated(spec: RunSpec, data: PreparedData, world: int) -> ValDraws:
    """Runner.validate on ``world`` emulated workers (no process group: each keeps its shard), shards joined."""
    shards = []
    for rank in range(world):
        r = _runner(spec, data, rank, world)
        r.validate()
        assert r.last_draws is not None
        shards.append(r.last_draws)
    return ValDraws.concat(shards)


# ---- the token rule ------------------------------------------------------------------------------


def test_counted_positions_never_bos_or_block_final_eos() -> None:
    eos = 257
    block = torch.tensor([[256, 10, 11, eos, 256 - 1, 12, eos]])  # an interior EOS at 3 is a real document end
    assert counted_positions(block).tolist() == [[False, True, True, True, True, True, False]]


def test_ar_and_mdlm_count_the_same_tokens(cache: Path, data: PreparedData) -> None:
    counts = {}
    for family in ("ar", "mdlm"):
        r = _runner(_spec(cache, family), data)
        val = r.validate()
        tokens = torch.from_numpy(np.asarray(data.val[:8], dtype=np.int64))
        train_count = int(r.engine.forward(tokens, r._valid).num_tokens)
        counts[family] = (val["val/tokens"], train_count)
    n, L = data.val.shape
    assert counts["ar"] == counts["mdlm"] == (n * (L - 2), 8 * (L - 2))


# ---- the protocol: shards and batches -------------------------------------------------------------


class _Recorder:
    """A stand-in family that records which sequences it scored (row i of the blocks is filled with i)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def val_nll(self, tokens: torch.Tensor, counted: torch.Tensor, noise: Any) -> torch.Tensor:
        self.calls.append(tokens[:, 0].tolist())
        return tokens[:, :1].double().expand(-1, noise.samples) + noise.rates  # (B, K)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 10, 11, 64])
def test_shards_cover_every_sequence_once_with_equal_forwards(world_size: int, n: int) -> None:
    from difflm.evaluation import val_batches_per_worker, val_shard

    blocks = np.repeat(np.arange(n)[:, None], 5, axis=1)  # (n, 5)
    parts, forwards = [], []
    for rank in range(world_size):
        rec = _Recorder()
        lo, hi = val_shard(n, rank, world_size)
        parts.append(val_pass(rec, blocks, lo, hi, batch_size=4, samples=2, seed=0, device=CPU,  # type: ignore[arg-type]
                              num_batches=val_batches_per_worker(n, 4, world_size)))
        forwards.append(len(rec.calls))
        assert all(1 <= len(c) <= 4 for c in rec.calls)
    joined = ValDraws.concat(parts)
    assert joined.indices.tolist() == list(range(n))  # each sequence once, in index order
    assert joined.counts.tolist() == [3.0] * n  # 5 positions - BOS - block-final EOS
    assert len(set(forwards)) == 1  # every worker runs the same number of forwards (ZeRO-3)
    if n < world_size:
        assert any(len(p.indices) == 0 for p in parts)  # a worker with nothing to score still ran
    np.testing.assert_array_equal(joined.sums[:, 0] - joined.indices, ValDraws.concat(
        [val_pass(_Recorder(), blocks, 0, n, batch_size=3, samples=2, seed=0, device=CPU)]  # type: ignore[arg-type]
    ).sums[:, 0] - joined.indices)  # the same rates per sequence in any batching


# ---- common random numbers -----------------------------------------------------------------------


def test_identical_weights_identical_val_nll_across_schedules_batches_and_workers(cache: Path,
                                                                                 data: PreparedData) -> None:
    """The val noise of a sequence depends on (eval_seed, its index) only: the same weights read the same
    val NLL under every schedule, any batch size and 1 or 2 workers (up to float rounding of batched matmuls)."""
    reference: ValDraws | None = None
    weights = None
    for schedule in MDLM_SCHEDULES:
        for bs, world in ((8, 1), (3, 1), (1, 2), (8, 2), (3, 2)) if schedule == "loglinear" else ((8, 1), (3, 2)):
            spec = _spec(cache, schedule=schedule, micro_batch_size=bs)
            draws = _validate_emulated(spec, data, world)
            if reference is None:
                reference = draws
                weights = _runner(spec, data).engine.module.state_dict()
                continue
            state = _runner(spec, data).engine.module.state_dict()
            assert all(torch.equal(state[k], weights[k]) for k in weights)  # type: ignore[index]
            assert draws.indices.tolist() == reference.indices.tolist()
            np.testing.assert_allclose(draws.sums, reference.sums, rtol=1e-5, atol=1e-6)
            assert draws.nll == pytest.approx(reference.nll, rel=1e-7), (schedule, bs, world)
            assert draws.se == pytest.approx(reference.se, rel=1e-5)
    # time-conditioned models see sigma = -log(1 - m), not a schedule's sigma(t): invariant too
    tc = [_validate_emulated(_spec(cache, schedule=s, time_conditioning=True), data, 1).nll
          for s in ("loglinear", "linear", "sqrt")]
    assert tc[1] == pytest.approx(tc[0], rel=1e-9) and tc[2] == pytest.approx(tc[0], rel=1e-9)
    # a different eval_seed is different noise
    other = _validate_emulated(_spec(cache, eval_seed=7), data, 1)
    assert reference is not None and abs(other.nll - reference.nll) > 1e-6


# ---- the estimator against an independent one ------------------------------------------------------


def independent_nelbo(model: MDLM, blocks: np.ndarray, nodes: int = 24, masks: int = 4,
                      seed: int = 99) -> tuple[float, float]:
    """The masking-rate NELBO, integral over m in (0, 1] (from 1e-6: below it the integrand, m f(m) in log m, adds
    ~1e-6 of f(0)) of (1/m) E[sum over masked counted tokens of
    -log p(x0 | x_m)] dm, written out independently of MDLM.val_nll: Gauss-Legendre quadrature in log m (where the
    integrand is smooth: dm/m = d log m), ``masks`` Bernoulli mask draws per node from its own generator, the
    backbone called directly. Returns (nats per counted token, Monte Carlo standard error)."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    lo, hi = math.log(1e-6), math.log(RATE_MAX)
    log_m = (hi - lo) / 2 * x + (hi + lo) / 2
    weights = (hi - lo) / 2 * w  # with dm / m = d log m, the 1/m weight cancels
    tokens = torch.from_numpy(np.asarray(blocks, dtype=np.int64))  # (N, L)
    inner = torch.zeros_like(tokens, dtype=torch.bool)
    inner[:, 1:-1] = True
    gen = torch.Generator().manual_seed(seed)
    total, var = 0.0, 0.0
    for m, wt in zip(np.exp(log_m), weights):
        per_draw = []
        for _ in range(masks):
            mask = (torch.rand(tokens.shape, generator=gen) < m) & inner
            xm = torch.where(mask, model.mask_id, tokens)
            sigma = torch.full((len(tokens),), -math.log1p(-m))
            with torch.no_grad():
                logits = model.backbone(xm, sigma if model.time_conditioning else None)[..., : model.vocab_size]
            nll = -logits.float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
            per_draw.append(float(nll[mask].double().sum()))
        total += wt * float(np.mean(per_draw))
        var += wt**2 * float(np.var(per_draw, ddof=1)) / masks
    count = float(inner.sum())
    return total / count, math.sqrt(var) / count


@pytest.fixture(scope="module")
def trained(cache: Path, data: PreparedData) -> dict[str, MDLM]:
    """One tiny time-conditioned mdlm per schedule, 40 steps each (the schedule shapes what it learns)."""
    out = {}
    for schedule in MDLM_SCHEDULES:
        r = _runner(_spec(cache, schedule=schedule, time_conditioning=True), data)
        for _ in range(40):
            r.train_step()
        out[schedule] = r.engine.module.eval()  # type: ignore[assignment]
    return out


def test_val_nll_agrees_with_an_independent_masking_rate_nelbo(trained: dict[str, MDLM], data: PreparedData) -> None:
    blocks = data.val  # 74 blocks of 32 bytes
    for schedule, model in trained.items():
        draws = val_pass(model, blocks, 0, len(blocks), batch_size=37, samples=16, seed=5, device=CPU)
        ref, ref_se = independent_nelbo(model, blocks)
        combined = math.hypot(draws.se, ref_se)
        print(f"{schedule}: val_pass {draws.nll:.4f} ± {draws.se:.4f}, independent {ref:.4f} ± {ref_se:.4f}")
        assert abs(draws.nll - ref) <= 2 * combined, (schedule, draws.nll, draws.se, ref, ref_se)
        assert 2.0 < draws.nll < 5.6 and draws.se < 0.1  # trained a little: below the untrained ~5.6


def test_se_shrinks_like_one_over_sqrt_k_and_pairs_are_tighter(trained: dict[str, MDLM], data: PreparedData) -> None:
    model = trained["loglinear"]
    few = val_pass(model, data.val, 0, len(data.val), batch_size=16, samples=4, seed=5, device=CPU)
    many = val_pass(model, data.val, 0, len(data.val), batch_size=16, samples=16, seed=5, device=CPU)
    assert 1.6 < few.se / many.se < 2.5, (few.se, many.se)  # sqrt(16 / 4) = 2
    assert abs(few.nll - many.nll) <= 3 * math.hypot(few.se, many.se)
    # common random numbers: the difference of two models has a far smaller error than either model
    other = val_pass(trained["linear"], data.val, 0, len(data.val), batch_size=16, samples=16, seed=5, device=CPU)
    for d in (many, other):
        d.meta = {"seed": 5}
    pd = paired_difference(other, many)
    assert pd.paired and pd.diff == pytest.approx(other.nll - many.nll, rel=1e-9)
    assert pd.se < 0.5 * math.hypot(many.se, other.se), (pd.se, many.se, other.se)


# ---- saved draws and the runner -------------------------------------------------------------------


def test_runner_saves_draws_and_reports_se(cache: Path, data: PreparedData, tmp_path: Path) -> None:
    from tests.helpers import RecordingLogger

    spec = _spec(cache, max_steps=4, eval_every=2, checkpoint_every=4, log_every=2)
    r = _runner(spec, data, val_dir=tmp_path / "val")
    log = RecordingLogger()
    r.logger = log
    summary = r.run()
    files = sorted(p.name for p in (tmp_path / "val").iterdir())
    assert files == ["step_0000000.npz", "step_0000002.npz", "step_0000004.npz"]  # no temp files left
    last = load_val_draws(draws_path(tmp_path / "val", 4))
    assert last.sums.shape == (len(data.val), 4) and last.meta == {
        "seed": spec.train.eval_seed, "samples": 4, "family": "mdlm", "step": 4, "rate_min": RATE_MIN,
        "rate_max": RATE_MAX}
    assert last.nll == pytest.approx(dict(log.scalars["val/nll"])[4], rel=1e-12)
    assert last.se == pytest.approx(dict(log.scalars["val/nll_se"])[4], rel=1e-12)
    best_step = min(log.scalars["val/nll"], key=lambda sv: sv[1])[0]
    assert summary["best_val_nll_se"] == pytest.approx(dict(log.scalars["val/nll_se"])[best_step])


def test_save_is_atomic_and_round_trips(tmp_path: Path) -> None:
    d = ValDraws(np.arange(3), np.arange(6, dtype=float).reshape(3, 2), np.full(3, 30.0), {"seed": 1})
    path = save_val_draws(tmp_path / "v" / "step_0000010.npz", d)
    assert [p.name for p in path.parent.iterdir()] == ["step_0000010.npz"]
    back = load_val_draws(path)
    assert np.array_equal(back.sums, d.sums) and back.meta == {"seed": 1} and back.nll == d.nll


def test_val_draws_are_written_like_every_other_run_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through difflm.atomic: fsynced before the rename, and readable by others (0o666 minus the umask,
    not mkstemp's owner-only 0o600)."""
    import os

    import difflm.atomic

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(difflm.atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    old_umask = os.umask(0o022)
    try:
        d = ValDraws(np.arange(2), np.ones((2, 1)), np.full(2, 4.0), {})
        path = save_val_draws(tmp_path / "step_0000001.npz", d)
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert len(synced) >= 1  # the file (and the folder) reach the disk before the rename is relied on


# ---- ranking: ties called ties ----------------------------------------------------------------------


def _draws(base: np.ndarray, shift: float, noise: float, rng: np.random.Generator, seed: int = 1) -> ValDraws:
    """Per-sequence sums of a model that is ``shift`` nats/token worse than ``base``, with private noise."""
    sums = base + shift * 30 + noise * rng.standard_normal(base.shape)
    return ValDraws(np.arange(len(base)), sums, np.full(len(base), 30.0), {"seed": seed})


def test_ranking_marks_ties_and_says_when_the_winner_is_not_separated() -> None:
    rng = np.random.default_rng(2)
    base = 90 + 20 * rng.standard_normal((200, 8))  # shared noise (common random numbers), per-draw sd ~20 nats
    a = _draws(base, 0.0, 2.0, rng)
    b = _draws(base, 0.001, 2.0, rng)  # 0.001 nats/token behind: within 2 paired SE (~0.0024)
    c = _draws(base, 0.05, 2.0, rng)  # far behind
    cands = [Candidate(k, "mdlm", d.nll, d.se, d) for k, d in (("c", c), ("b", b), ("a", a))]
    ranking = rank_candidates(cands)
    assert [p.cand.key for p in ranking.rows] == ["a", "b", "c"]
    top, second, third = ranking.rows
    assert top.is_best and top.tied and second.tied and not third.tied
    assert second.paired and second.diff_se < 0.2 * math.hypot(a.se, b.se)  # pairing removes the shared noise
    assert third.diff == pytest.approx(c.nll - a.nll) and third.diff / third.diff_se > 10
    assert len(ranking.verdicts) == 1 and "NOT separated from the runner-up b" in ranking.verdicts[0]
    clear = rank_candidates([Candidate(k, "mdlm", d.nll, d.se, d) for k, d in (("a", a), ("c", c))])
    # one training seed: a clear val difference, but no claim about training noise
    assert "leads the runner-up c by +0.05" in clear.verdicts[0] and not clear.rows[0].tied
    assert "1 training seed: add sweep.seeds" in clear.verdicts[0] and "separated" not in clear.verdicts[0]
    # without saved draws the errors combine as if independent (and are far larger)
    unpaired = rank_candidates([Candidate("a", "mdlm", a.nll, a.se), Candidate("c", "mdlm", c.nll, c.se)])
    assert not unpaired.rows[1].paired and unpaired.rows[1].diff_se == pytest.approx(math.hypot(a.se, c.se))


def test_mixed_families_rank_within_each_family() -> None:
    rng = np.random.default_rng(1)
    base = 90 + 20 * rng.standard_normal((50, 4))
    m1, m2 = _draws(base, 0.0, 1.0, rng), _draws(base, 0.3, 1.0, rng)
    d1 = _draws(base, 100.0, 1.0, rng)
    ranking = rank_candidates([Candidate("dlm", "diffusion_lm", d1.nll, d1.se, d1),
                               Candidate("m2", "mdlm", m2.nll, m2.se, m2), Candidate("m1", "mdlm", m1.nll, m1.se, m1),
                               Candidate("failed", "mdlm", None)])
    assert ranking.mixed
    assert [(p.cand.key, p.rank, p.overall) for p in ranking.rows] == [
        ("m1", 1, 1), ("m2", 2, 2), ("dlm", 1, 3), ("failed", None, None)]
    assert ranking.rows[2].is_best and ranking.rows[2].diff == 0.0  # diffusion_lm's best is compared with nothing
    assert len(ranking.verdicts) == 2 and ranking.verdicts[1].startswith("diffusion_lm: dlm is the only")


def test_results_table_and_live_table_show_se_paired_difference_and_ties(tmp_path: Path) -> None:
    """The markdown table of `difflm results` and the live sweep table, from trials with saved draws."""
    from orchestrator.sweep.results import TrialResult, markdown_table
    from orchestrator.sweep.console import SweepTable
    from orchestrator.sweep.spec import SweepFile

    rng = np.random.default_rng(2)
    base = 90 + 20 * rng.standard_normal((100, 8))
    runs = {"t1": _draws(base, 0.0, 2.0, rng), "t2": _draws(base, 0.001, 2.0, rng), "t3": _draws(base, 0.2, 2.0, rng)}
    sweep = SweepFile.model_validate({"sweep": {"search": {"diffusion.schedule": {"grid": ["loglinear", "linear",
                                                                                           "cosine"]}}}})
    trials = []
    for i, (key, d) in enumerate(runs.items()):
        tdir = tmp_path / f"{key}-trial"
        save_val_draws(draws_path(tdir / "train" / "val", 30), d)
        save_val_draws(draws_path(tdir / "train" / "val", 15), _draws(base, 1.0, 2.0, rng))  # an earlier, worse eval
        trials.append(SimpleNamespace(trial_id=key, config={"diffusion.schedule": MDLM_SCHEDULES[i]}, status="TERMINATED",
                                      last_result={"step": 30, "val/nll": d.nll}, path=str(tdir)))
    table = SweepTable(sweep, tmp_path)
    ranking = table.ranking(trials)
    assert ranking is not None
    assert [(p.cand.trials, p.tied) for p in ranking.rows] == [(["t1"], True), (["t2"], True), (["t3"], False)]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table._table(trials))
    text = console.export_text()
    assert "config mean ± SE" in text and "Δ to best ± SE" in text and "tied" in text and "at step" in text
    assert f"{runs['t1'].nll:.4f} ± {runs['t1'].se:.4f}" in text and "(1 seed)" in text
    assert "NOT separated from the runner-up diffusion.schedule=linear at step 30" in text

    from orchestrator.sweep.results import ConfigResult

    results = [ConfigResult(config=p.cand.key, params=trials[int(p.cand.trials[0][1]) - 1].config, family="mdlm",
                            trials=p.cand.trials, seeds=[None], n_seeds=1, step=p.cand.step, val_nll_mean=p.cand.nll,
                            val_nll_se=p.cand.se, seed_sd=None, per_seed=[p.cand.nll], rank=p.rank, overall_rank=p.overall,
                            is_best=p.is_best, diff_to_best=p.diff, diff_se=p.diff_se, diff_at_step=p.at_step,
                            paired=p.paired, seeds_paired=p.seeds_paired, tied=p.tied, why_tied=p.why_tied,
                            full_budget=True, stopped_early=False, steps=30, status="TERMINATED", wall_time_s=1.0,
                            error=None, best_checkpoint=None, trial_dir="-") for p in ranking.rows]
    md = markdown_table({"sweep": {"search": {"diffusion.schedule": {}}, "metric": "val/nll"}}, results).splitlines()
    assert md[0].startswith("| rank | trial(s) | schedule | val/nll mean ± SE | seed SD | seeds | at step | Δ to best ± SE "
                            "| tied |")
    assert md[2].startswith(f"| 1 (best) | t1 | loglinear | {runs['t1'].nll:.4f} ± {runs['t1'].se:.4f} | (1 seed) | 1 | "
                            "30 | best | tied |")
    assert "| 2 | t2 | linear |" in md[3] and md[3].count("tied") == 1 and "| +0.00" in md[3] and "at step 30" in md[3]
    assert "| 3 | t3 | cosine |" in md[4] and "tied" not in md[4]


GRID = """
model: {family: mdlm, size: null, d_model: 32, n_layers: 1, n_heads: 2, cond_dim: 16}
data: {source: builtin, seq_len: 32, max_documents: 200, cache_dir: %s}
train: {max_steps: 6, micro_batch_size: 8, warmup_steps: 1, eval_every: 3, checkpoint_every: 6, log_every: 3,
        num_samples: 0, eval_samples: 4}
scaling: {device: cpu, zero_stage: 2}   # as the shipped sweep files: bench grid must run them in plain PyTorch
sweep:
  scheduler: {kind: none}
  search:
    variant: {grid: [mdlm-loglinear, mdlm-linear, ar]}
  linked:
    variant:
      mdlm-loglinear: {model.family: mdlm, diffusion.schedule: loglinear}
      mdlm-linear: {model.family: mdlm, diffusion.schedule: linear}
      ar: {model.family: ar}
"""


def test_bench_grid_ranks_every_grid_point_within_families(cache: Path, tmp_path: Path) -> None:
    """`difflm bench grid`: the in-process full-budget ranking (no Ray) used for docs/benchmarks.md."""
    from click.testing import CliRunner

    from orchestrator.cli import main

    spec = tmp_path / "grid.yaml"
    spec.write_text(GRID % cache)
    res = CliRunner().invoke(main, ["bench", "grid", str(spec), "--output", str(tmp_path / "out")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| 1") or ln.startswith("| 2")]
    ranked = [r.split(" | ")[:3] for r in rows]  # rank, family, trial
    assert [(rank[2:], fam) for rank, fam, _ in ranked] == [("1 (best)", "ar"), ("1 (best)", "mdlm"), ("2", "mdlm")] \
        or [(rank[2:], fam) for rank, fam, _ in ranked] == [("1 (best)", "mdlm"), ("2", "mdlm"), ("1 (best)", "ar")], \
        res.stdout  # families in the order of their best; ranks within each
    assert "overall (bounds differ)" in res.stdout and "mixed families: ranked within each family" in res.stdout
    assert "ar: variant=ar is the only scored configuration" in res.stdout
    assert "mdlm: the winner variant=mdlm-" in res.stdout and "paired SE" in res.stdout
    assert len(list((tmp_path / "out").glob("grid-*/variant=*/val/step_0000006.npz"))) == 3
    bad = CliRunner().invoke(main, ["bench", "grid", str(spec), "--set", "sweep.search.variant={choice: [ar]}"])
    assert bad.exit_code == 2 and "grid domains only" in bad.output, bad.output
