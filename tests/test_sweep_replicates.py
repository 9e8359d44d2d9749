"""Sweep verdicts that survive a second seed: equal-budget differences, seeds grouped, the SE formulas,
the practical threshold, ASHA judging a configuration's seeds together. In-process, synthetic numbers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from ray.tune.schedulers import TrialScheduler

from difflm.evaluation import ValDraws
from orchestrator.cli import main
from orchestrator.sweep.ranking import Candidate, difference_se, fmt_diff, fmt_sd, group_stats, rank_candidates
from orchestrator.sweep.schedulers import ResumableASHA
from orchestrator.sweep.spec import SEED_KEY, config_key

TOKENS = 30.0


def _draws(base: np.ndarray, shift: float, noise: float, rng: np.random.Generator) -> ValDraws:
    """Per-sequence sums of a model ``shift`` nats/token worse than ``base`` (the shared val noise), own noise."""
    sums = base + shift * TOKENS + noise * rng.standard_normal(base.shape)
    return ValDraws(np.arange(len(base)), sums, np.full(len(base), TOKENS), {"seed": 1})


def _cand(key: str, config: str, seed: int | None, curve: dict[int, ValDraws]) -> Candidate:
    return Candidate(key, "mdlm", None, config=config, seed=seed, curve={s: (d.nll, d.se) for s, d in curve.items()},
                     draws_at=curve.get)


# ---- the formulas -----------------------------------------------------------------------------------


def test_group_and_difference_se_formulas() -> None:
    # mean 3.1, between-seed SD 0.1 (values 3.0, 3.1, 3.2), val SEs 0.01, 0.02, 0.02 -> mean(se^2) = 0.0003
    mean, sd, se = group_stats([3.0, 3.1, 3.2], [0.01, 0.02, 0.02])
    assert mean == pytest.approx(3.1) and sd == pytest.approx(0.1)
    assert se == pytest.approx(math.sqrt(0.1**2 / 3 + 0.0003))
    # one seed: no SD, the val SE alone
    assert group_stats([3.0], [0.02])[1:] == (pytest.approx(math.nan, nan_ok=True), pytest.approx(0.02))
    # the worked example of docs/sweeps.md: d_k = 0.020, 0.035, 0.005; e_k = 0.004 each
    d, se_d = difference_se([0.020, 0.035, 0.005], [0.004, 0.004, 0.004])
    assert d == pytest.approx(0.02)
    assert se_d == pytest.approx(math.sqrt(0.015**2 / 3 + 0.004**2))
    assert se_d == pytest.approx(0.00954, abs=5e-5)


def _seeded(base: np.ndarray, rng: np.random.Generator, shifts: dict[str, list[float]]) -> list[Candidate]:
    """One candidate per (configuration, seed), all at step 100, with the shared val noise."""
    out = []
    for cfg, per_seed in shifts.items():
        for k, shift in enumerate(per_seed):
            out.append(_cand(f"{cfg}{k}", cfg, k, {100: _draws(base, shift, 0.5, rng)}))
    return out


def test_val_se_alone_separates_but_seed_variance_makes_it_a_tie() -> None:
    rng = np.random.default_rng(0)
    base = 90 + 20 * rng.standard_normal((300, 8))
    # b is 0.02 behind a on seed 0 (tiny paired val SE), but seeds move a configuration by ~0.05
    one = rank_candidates(_seeded(base, rng, {"a": [0.0], "b": [0.02]}))
    second = one.rows[1]
    assert second.diff == pytest.approx(0.02, abs=1e-3) and second.diff / second.diff_se > 10  # val SE alone
    assert not second.tied and "1 training seed: add sweep.seeds" in one.verdicts[0]
    assert "is separated" not in one.verdicts[0]
    three = rank_candidates(_seeded(base, rng, {"a": [0.0, 0.06, -0.03], "b": [0.02, 0.0, 0.05]}))
    top, second = three.rows
    assert top.cand.key == "a" and top.cand.n_seeds == 3 and second.seeds_paired == 3
    d_k = [0.02, -0.06, 0.08]
    assert second.diff == pytest.approx(fmean(d_k), abs=1e-3)
    assert second.diff_se == pytest.approx(stdev(d_k) / math.sqrt(3), rel=0.05)  # the seed term dominates
    assert second.tied and second.why_tied.startswith("within 2 SE")
    assert "NOT separated" in three.verdicts[0] and "over 3 paired seeds" in three.verdicts[0]


def test_seed_variance_cancels_in_pairs_and_separates() -> None:
    """The reverse: each configuration's seeds spread widely (unpaired SEs overlap), but seed k of b is
    always 0.03 behind seed k of a (shared init and data order): paired over seeds, separated."""
    rng = np.random.default_rng(1)
    base = 90 + 20 * rng.standard_normal((300, 8))
    seeds_a = [0.0, 0.08, -0.05]
    cands = _seeded(base, rng, {"a": seeds_a, "b": [s + 0.03 for s in seeds_a]})
    ranking = rank_candidates(cands)
    top, second = ranking.rows
    assert top.cand.sd > 0.05 and math.hypot(top.cand.se, second.cand.se) > 0.05  # unpaired: no verdict possible
    assert second.diff == pytest.approx(0.03, abs=1e-3) and second.diff_se < 0.005
    assert not second.tied
    assert "is separated from the runner-up b at step 100" in ranking.verdicts[0]
    assert "over 3 paired seeds" in ranking.verdicts[0]


def test_a_difference_below_min_effect_or_rounding_to_zero_is_a_tie() -> None:
    rng = np.random.default_rng(2)
    base = 90 + 20 * rng.standard_normal((300, 8))
    cands = _seeded(base, rng, {"a": [0.0, 0.0], "b": [0.003, 0.003]})
    for c in cands:  # no own noise: the paired SE is ~0, 0.003 would be "hundreds of SE"
        c.curve = {s: (d.nll, d.se) for s, d in {100: _draws(base, 0.003 if c.config == "b" else 0.0, 0.0, rng)}.items()}
        c.draws_at = {100: _draws(base, 0.003 if c.config == "b" else 0.0, 0.0, rng)}.get
    ranking = rank_candidates(cands)
    assert ranking.rows[1].tied and "below sweep.min_effect 0.005" in ranking.verdicts[0]
    assert not rank_candidates(cands, min_effect=0.001).rows[1].tied
    tiny = [_cand(k, k, 0, {100: _draws(base, shift, 0.0, rng)}) for k, shift in (("a", 0.0), ("b", 0.00001))]
    assert rank_candidates(tiny, min_effect=0.0).rows[1].why_tied == "rounds to zero"


def test_early_stopped_difference_is_taken_at_its_stop_step() -> None:
    """ASHA stopped `cos` at step 30; `log` ran 60 steps. At step 30 they read the same (+0.001): a tie at
    step 30, not the 0.3 nats the 30 extra steps give `log` (comparing bests)."""
    rng = np.random.default_rng(3)
    base = 90 + 20 * rng.standard_normal((200, 8))
    log = {s: _draws(base, v, 0.3, rng) for s, v in ((15, 0.6), (30, 0.3), (45, 0.1), (60, 0.0))}
    cos = {s: _draws(base, v, 0.3, rng) for s, v in ((15, 0.6), (30, 0.301))}
    lin = {s: _draws(base, v, 0.3, rng) for s, v in ((15, 0.6), (30, 0.3), (45, 0.15), (60, 0.05))}
    ranking = rank_candidates([_cand("cos", "cos", 0, cos), _cand("lin", "lin", 0, lin), _cand("log", "log", 0, log)])
    rows = {p.cand.key: p for p in ranking.rows}
    assert [p.cand.key for p in ranking.rows] == ["log", "lin", "cos"]  # full budget first, then stopped early
    assert not rows["cos"].cand.full and rows["lin"].cand.full
    assert rows["cos"].at_step == 30 and rows["cos"].diff == pytest.approx(0.001, abs=2e-3) and rows["cos"].tied
    assert rows["lin"].at_step == 60 and rows["lin"].diff == pytest.approx(0.05, abs=3e-3)
    assert "at step 30" in fmt_diff(rows["cos"]) and "at step 60" in ranking.verdicts[0]


def test_old_results_without_draws_or_seeds_still_rank_marked() -> None:
    """An old sweep: no npz draws, no replicate seeds: unpaired differences, `(1 seed)`."""
    a = Candidate("t1", "mdlm", 3.20, 0.01, step=60, config="a", curve={30: (3.4, 0.01), 60: (3.20, 0.01)})
    b = Candidate("t2", "mdlm", 3.30, 0.01, step=60, config="b", curve={30: (3.45, 0.01), 60: (3.30, 0.01)})
    ranking = rank_candidates([b, a])
    second = ranking.rows[1]
    assert second.diff == pytest.approx(0.1) and second.diff_se == pytest.approx(math.hypot(0.01, 0.01))
    assert fmt_diff(second).endswith("at step 60 (unpaired)") and fmt_sd(second.cand.sd, 1) == "(1 seed)"


# ---- ASHA: a configuration's seeds together ----------------------------------------------------------


@dataclass
class FakeTrial:
    trial_id: str
    config: dict[str, Any]
    path: str = ""

    def __hash__(self) -> int:
        return hash(self.trial_id)


# val/nll at steps 5, 10, 15, 20 per (configuration, seed); grace 5, rf 2: rungs at 5 and 10.
CURVES = {
    ("good", 0): [3.6, 3.4, 3.2, 3.0], ("good", 1): [3.7, 3.5, 3.3, 3.1],
    # one lucky seed (3.3 at step 5, the best of all) and one bad one: the mean (4.0) is below the cut
    ("lucky", 0): [3.3, 3.2, 3.1, 3.0], ("lucky", 1): [4.7, 4.5, 4.4, 4.3],
}


def _sched(seeds: int) -> ResumableASHA:
    return ResumableASHA(time_attr="step", metric="val/nll", mode="min", max_t=20, grace_period=5, reduction_factor=2,
                         seeds=seeds)


def _trials() -> list[FakeTrial]:
    return [FakeTrial(f"{c}{k}", {"diffusion.schedule": c, SEED_KEY: k}) for c, k in CURVES]


def _interleaved(sched: ResumableASHA, trials: list[FakeTrial]) -> dict[str, int]:
    """All trials report step by step (seeds of a configuration run side by side); the step each stopped at."""
    stopped: dict[str, int] = {}
    for i, step in enumerate([5, 10, 15, 20]):
        for t in trials:
            if t.trial_id in stopped:
                continue
            value = CURVES[(t.config["diffusion.schedule"], t.config[SEED_KEY])][i]
            if sched.on_trial_result(None, t, {"step": step, "val/nll": value}) == TrialScheduler.STOP:
                stopped[t.trial_id] = step
    return stopped


def test_asha_stops_a_configurations_seeds_together_on_their_mean() -> None:
    trials = _trials()
    sched = _sched(2)
    for t in trials:
        sched.on_trial_add(None, t)
    stopped = _interleaved(sched, trials)
    # lucky0 reached step 5 first and went on; when lucky1's report completed the pair, their mean was cut and
    # lucky0 stopped at its next report: neither seed ran past the rung after the one the pair was cut at
    assert stopped == {"lucky0": 10, "lucky1": 5, "good0": 20, "good1": 20}
    assert sched.groups.stopped == {config_key(trials[2].config): 5}
    rung5 = dict(sched.rungs())[5]
    assert rung5[config_key(trials[0].config)] == pytest.approx(3.65)
    assert rung5[config_key(trials[2].config)] == pytest.approx(4.0)
    # per trial (seeds: 1), the lucky seed would have been kept past the first rung
    plain = _sched(1)
    for t in trials:
        plain.on_trial_add(None, t)
    assert _interleaved(plain, trials)["lucky0"] > 5


def test_group_rungs_come_back_after_a_restore(tmp_path: Path) -> None:
    import json
    import pickle

    trials = _trials()
    sched = _sched(2)
    at_start = pickle.dumps(sched)
    for t in trials:
        (tmp_path / t.trial_id).mkdir()
        t.path = str(tmp_path / t.trial_id)
        sched.on_trial_add(None, t)
    # good0, good1, lucky0, lucky1 reported step 5 before the interruption; lucky was cut there
    for t, values in ((trials[0], [3.6]), (trials[1], [3.7]), (trials[2], [3.3]), (trials[3], [4.7])):
        for step, v in zip([5], values):
            sched.on_trial_result(None, t, {"step": step, "val/nll": v})
            with open(Path(t.path) / "result.json", "a") as f:
                f.write(json.dumps({"step": step, "val/nll": v}) + "\n")
    restored = pickle.loads(at_start)
    for t in trials:
        restored.on_trial_add(None, t)
    assert restored.groups.stopped == sched.groups.stopped and restored.rungs() == sched.rungs()
    assert restored.groups.stopped == {config_key(trials[2].config): 5}
    # the restored lucky seed stops at its next report; good goes on
    assert restored.on_trial_result(None, trials[2], {"step": 10, "val/nll": 3.2}) == TrialScheduler.STOP
    assert restored.on_trial_result(None, trials[1], {"step": 10, "val/nll": 3.5}) == TrialScheduler.CONTINUE
    assert dict(restored.rungs())[5][config_key(trials[0].config)] == pytest.approx(3.65)


# ---- bad input ---------------------------------------------------------------------------------------

BASE = """
model: {family: mdlm, size: tiny}
train: {max_steps: 40, eval_every: 10, checkpoint_every: 10}
scaling: {num_workers: 1, device: cpu}
output: {dir: %s}
sweep:
  search:
%s
"""


@pytest.mark.parametrize(
    "extra,expected",
    [
        ("    diffusion.schedule: {grid: [cosine]}\n  seeds: 0", r"sweep\.seeds.*greater than or equal to 1"),
        ("    diffusion.schedule: {grid: [cosine]}\n  seeds: -2", r"sweep\.seeds.*greater than or equal to 1"),
        ("    diffusion.schedule: {grid: [cosine]}\n  seeds: 1.5", r"sweep\.seeds.*valid integer"),
        ("    diffusion.schedule: {grid: [cosine]}\n  seeds: two", r"sweep\.seeds.*valid integer"),
        ("    train.seed: {grid: [0, 1]}\n  seeds: 2", r"sweep\.seeds and a search over train\.seed conflict"),
    ],
)
def test_bad_seeds_exit_2_naming_the_field(tmp_path: Path, extra: str, expected: str) -> None:
    p = tmp_path / "sweep.yaml"
    p.write_text(BASE % (tmp_path / "runs", extra))
    res = CliRunner().invoke(main, ["validate", str(p)])
    assert res.exit_code == 2, res.output
    assert re.search(expected, res.output), res.output
    assert "Traceback" not in res.output


def test_seed_assignment_basic_grid_and_optuna_repeater() -> None:
    """basic: a grid over SEED_KEY that varies fastest (a configuration's seeds are adjacent), sampled values kept
    across it; optuna: Tune's Repeater, num_samples x seeds trials; both set train.seed = base + k."""
    from ray.tune.search import BasicVariantGenerator, Repeater
    from ray.tune.search.variant_generator import generate_variants

    from orchestrator.sweep.driver import _param_space, _tune_config
    from orchestrator.sweep.spec import REPEAT_INDEX, SweepFile, trial_raw

    sweep = SweepFile.model_validate({"train": {"seed": 7}, "sweep": {
        "search": {"diffusion.schedule": {"grid": ["cosine", "linear"]}, "train.lr": {"loguniform": [1e-4, 1e-2]}},
        "seeds": 3}})
    variants = [v for _, v in generate_variants(_param_space(sweep), constant_grid_search=True)]
    assert [(v["diffusion.schedule"], v[SEED_KEY]) for v in variants] == [
        ("cosine", 7), ("cosine", 8), ("cosine", 9), ("linear", 7), ("linear", 8), ("linear", 9)]
    assert len({v["train.lr"] for v in variants}) == 1
    assert trial_raw(sweep.base_raw(), variants[1], {})["train"]["seed"] == 8
    cfg = _tune_config(sweep, 2)
    assert isinstance(cfg.search_alg, BasicVariantGenerator) and cfg.num_samples == 1
    opt = SweepFile.model_validate({"train": {"seed": 7}, "sweep": {
        "search": {"train.lr": {"loguniform": [1e-4, 1e-2]}}, "algorithm": "optuna", "num_samples": 4, "seeds": 3}})
    cfg = _tune_config(opt, 2)
    assert isinstance(cfg.search_alg, Repeater) and cfg.num_samples == 12
    assert trial_raw(opt.base_raw(), {"train.lr": 1e-3, REPEAT_INDEX: 2}, {})["train"]["seed"] == 9
    assert config_key({"train.lr": 1e-3, REPEAT_INDEX: 2}) == config_key({"train.lr": 1e-3, REPEAT_INDEX: 0})
