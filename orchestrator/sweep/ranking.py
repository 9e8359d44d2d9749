"""Ranking sweep configurations with error bars: equal-budget, paired differences over seeds and val draws.

Shared by ``difflm results`` (:mod:`orchestrator.sweep.results`), the live sweep table
(:mod:`orchestrator.sweep.console`) and ``difflm bench grid``, so all say the same thing.

* **Configurations, not trials.** With ``sweep.seeds: N`` every configuration runs N
  training seeds; seed k of every configuration uses the same ``train.seed`` (same init
  and data order). A configuration's row is the mean over its seeds at one step, with the
  between-seed SD, the SE of that mean and the number of seeds.
* **Equal budget.** A configuration is compared at its last eval step that all its seeds
  reached (an early-stopped one: the step ASHA stopped it at), and its difference to the
  best is taken against the best configuration's val *at that same step*, from the
  per-sequence draws saved there (``<trial>/train/val/step_XXXXXXX.npz``). Configurations
  that ran to the family's furthest step (the full budget) rank above those stopped
  earlier, each group by its mean.
* **The SE of a difference** (docs/sweeps.md has a worked example): for each seed k both
  configurations share, ``d_k`` is the paired difference (common val noise: the error of the
  per-draw differences ``e_k``). Over n shared seeds, ``d = mean(d_k)`` and
  ``SE(d)^2 = var(d_k) / n + mean(e_k^2)``: the between-seed variance of the paired
  differences over n, plus the val noise, which every seed shares (the same val noise), so
  averaging seeds does not shrink it. With one seed only the val term exists, and the
  verdict says it cannot separate configurations by training noise.
* **Ties.** A difference within ``TIE_SE`` SE, below ``sweep.min_effect`` nats/token, or
  that rounds to zero at the printed precision is a tie; the verdict line says whether the
  winner is separated from the runner-up, and at which step.
* Families are ranked **within their family** (different bounds: ar's NLL is exact, mdlm's
  is a NELBO, diffusion_lm's a looser bound); the ``overall`` column decides nothing.
* Without saved draws (an old sweep) the errors are combined as if independent and the row
  says ``(unpaired)``; without seeds it says ``(1 seed)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, stdev

from difflm.evaluation import ValDraws, load_val_draws, paired_difference

#: Differences within this many standard errors are tied.
TIE_SE = 2.0
#: Default practical threshold (sweep.min_effect), nats/token: a smaller difference is a tie whatever its SE.
MIN_EFFECT = 0.005
#: Decimals the tables print a difference with; one that rounds to zero there is never "separated".
DIGITS = 4


@dataclass
class Candidate:
    """One trial (one training seed of one configuration) as the ranking sees it.

    ``nll``/``se``/``draws``: its value at ``step`` (its best, for callers with one point per trial).
    ``curve``: step -> (val, SE) of every eval, ``draws_at``: the saved draws at a step; with them a
    configuration is compared at a common step. ``config`` groups seeds (default: the trial alone);
    ``seed`` pairs seed k of one configuration with seed k of another.
    """

    key: str
    family: str
    nll: float | None
    se: float | None = None
    draws: ValDraws | None = field(default=None, repr=False)
    step: int | None = None
    config: str | None = None
    seed: int | None = None
    curve: dict[int, tuple[float, float | None]] | None = field(default=None, repr=False)
    draws_at: Callable[[int], ValDraws | None] | None = field(default=None, repr=False)

    def points(self) -> dict[int | None, tuple[float, float | None]]:
        """step -> (value, SE) of every finite value (one point at ``step`` without a curve)."""
        if self.curve:
            return {s: v for s, v in self.curve.items() if math.isfinite(v[0])}
        if self.nll is not None and math.isfinite(self.nll):
            return {self.step: (float(self.nll), self.se)}
        return {}

    def draws_for(self, step: int | None) -> ValDraws | None:
        if self.draws_at is not None and step is not None:
            return self.draws_at(step)
        return self.draws if step == self.step else None


@dataclass
class Group:
    """A configuration at its compared step: mean over seeds ± SE, between-seed SD, n seeds."""

    key: str
    family: str
    members: list[Candidate]
    step: int | None = None
    nll: float | None = None
    se: float | None = None
    sd: float | None = None
    full: bool = True

    @property
    def n_seeds(self) -> int:
        return len(self.members)

    @property
    def trials(self) -> list[str]:
        return [c.key for c in self.members]


@dataclass
class Placed:
    """A configuration's place: ``rank`` within its family (1 = best), ``overall`` across families, and its
    difference ``diff`` ± ``diff_se`` to the family's best at step ``at_step`` (0 for the best itself).
    ``paired``: the val draws pair it; ``seeds_paired``: how many training seeds pair it (0: unpaired)."""

    cand: Group
    rank: int | None = None
    overall: int | None = None
    diff: float | None = None
    diff_se: float | None = None
    paired: bool = False
    tied: bool = False
    at_step: int | None = None
    seeds_paired: int = 0
    why_tied: str = ""

    @property
    def is_best(self) -> bool:
        return self.rank == 1


@dataclass
class Ranking:
    rows: list[Placed]
    mixed: bool
    verdicts: list[str]


def group_stats(values: list[float], ses: list[float | None]) -> tuple[float, float, float]:
    """(mean, between-seed SD, SE of the mean) of one configuration's seeds at one step.

    SE^2 = SD^2 / n + mean(se_k^2): the seeds' spread over n, plus the val noise, which all seeds share
    (the same val noise), so it does not average out. SD is nan with one seed (SE: the val SE alone)."""
    n = len(values)
    mean = fmean(values)
    sd = stdev(values) if n >= 2 else math.nan
    val_terms = [s * s for s in ses if s is not None and math.isfinite(s)]
    val_var = fmean(val_terms) if len(val_terms) == n else math.nan
    if n >= 2:
        se = math.sqrt(sd * sd / n + (val_var if math.isfinite(val_var) else 0.0))
    else:
        se = math.sqrt(val_var) if math.isfinite(val_var) else math.nan
    return mean, sd, se


def difference_se(diffs: list[float], val_ses: list[float]) -> tuple[float, float]:
    """(d, SE(d)) from per-seed paired differences ``d_k`` and their val-noise SEs ``e_k``.

    SE(d)^2 = var(d_k) / n + mean(e_k^2) (var with n - 1; the first term only for n >= 2)."""
    n = len(diffs)
    d = fmean(diffs)
    between = stdev(diffs) ** 2 / n if n >= 2 else 0.0
    finite = [e * e for e in val_ses if math.isfinite(e)]
    val = fmean(finite) if len(finite) == n else math.nan
    if not math.isfinite(val):
        return d, (math.sqrt(between) if n >= 2 else math.nan)
    return d, math.sqrt(between + val)


def _common_steps(groups: list[Group]) -> set[int | None]:
    steps: set[int | None] | None = None
    for g in groups:
        for c in g.members:
            s = set(c.points())
            steps = s if steps is None else steps & s
    return steps or set()


def _latest(steps: set[int | None], at_most: int | None = None) -> int | None:
    ints = [s for s in steps if s is not None and (at_most is None or s <= at_most)]
    return max(ints) if ints else None


def _settle(g: Group) -> None:
    """Pick the configuration's compared step (the last all its seeds reached) and its stats there."""
    steps = _common_steps([g])
    if not steps:
        return
    g.step = _latest(steps) if any(s is not None for s in steps) else None
    pts = [c.points()[g.step] for c in g.members]
    g.nll, g.sd, g.se = group_stats([p[0] for p in pts], [p[1] for p in pts])


def _by_seed(g: Group) -> dict[object, Candidate]:
    return {(c.seed if c.seed is not None else "_"): c for c in g.members}


def compare(a: Group, b: Group, step: int | None) -> tuple[float, float, bool, int]:
    """mean(a) - mean(b) at ``step``: (d, SE, paired over val draws, seeds paired), see the module docstring."""
    sa, sb = _by_seed(a), _by_seed(b)
    shared = [k for k in sa if k in sb]
    diffs, errs, paired = [], [], True
    for k in shared:
        ca, cb = sa[k], sb[k]
        pa, pb = ca.points().get(step), cb.points().get(step)
        if pa is None or pb is None:
            continue
        da, db = ca.draws_for(step), cb.draws_for(step)
        pd = None
        if da is not None and db is not None:
            try:
                pd = paired_difference(da, db)
            except ValueError:
                pd = None
        if pd is not None:  # on the sequences both scored (a capped split: the common prefix)
            diffs.append(pd.diff)
            errs.append(pd.se)
            paired &= pd.paired
        else:
            diffs.append(pa[0] - pb[0])
            errs.append(math.hypot(*(s if s is not None and math.isfinite(s) else math.nan for s in (pa[1], pb[1]))))
            paired = False
    if diffs:
        d, se = difference_se(diffs, errs)
        return d, se, paired, len(diffs)
    # no seed in common: the two means, errors combined as independent
    ga = _stats_at(a, step)
    gb = _stats_at(b, step)
    return ga[0] - gb[0], math.hypot(ga[2], gb[2]), False, 0


def _stats_at(g: Group, step: int | None) -> tuple[float, float, float]:
    pts = [c.points()[step] for c in g.members if step in c.points()]
    if not pts:
        return math.nan, math.nan, math.nan
    return group_stats([p[0] for p in pts], [p[1] for p in pts])


def group_candidates(cands: list[Candidate]) -> list[Group]:
    """Configurations in first-seen order, each with its seeds (sorted by seed)."""
    groups: dict[str, Group] = {}
    for c in cands:
        key = c.config if c.config is not None else c.key
        g = groups.setdefault(key, Group(key=key, family=c.family, members=[]))
        g.members.append(c)
    for g in groups.values():
        g.members.sort(key=lambda c: (c.seed is None, c.seed if c.seed is not None else 0, c.key))
        _settle(g)
    return list(groups.values())


def _is_tie(d: float, se: float, min_effect: float) -> str:
    """Why a difference is a tie ('' when it is not)."""
    if round(d, DIGITS) <= 0.0:
        return "rounds to zero"
    if d < min_effect:
        return f"below sweep.min_effect {min_effect:g}"
    if math.isfinite(se) and d <= TIE_SE * se:
        return f"within {TIE_SE:g} SE"
    return ""


def rank_candidates(cands: list[Candidate], min_effect: float = MIN_EFFECT) -> Ranking:
    """Group trials into configurations and rank them within each family (see the module docstring)."""
    groups = group_candidates(cands)
    scored = [g for g in groups if g.nll is not None and math.isfinite(g.nll)]
    unscored = [g for g in groups if g not in scored]
    fam_max: dict[str, int | None] = {}
    for g in scored:
        fam_max[g.family] = max(fam_max.get(g.family) or -1, g.step if g.step is not None else -1)
    for g in scored:
        g.full = (g.step if g.step is not None else -1) >= (fam_max[g.family] or -1)

    def order(g: Group) -> tuple[bool, float]:
        return (not g.full, float(g.nll))  # type: ignore[arg-type]

    families: dict[str, list[Group]] = {}
    for g in sorted(scored, key=order):
        families.setdefault(g.family, []).append(g)
    overall = {id(g): i for i, g in enumerate(sorted(scored, key=order), 1)}
    rows: list[Placed] = []
    verdicts: list[str] = []
    mixed = len(families) > 1
    for fam, members in families.items():
        best = members[0]
        n_best = best.n_seeds
        placed = [Placed(best, rank=1, overall=overall[id(best)], diff=0.0, diff_se=0.0, paired=True,
                         at_step=best.step, seeds_paired=n_best)]
        for i, g in enumerate(members[1:], 2):
            common = _common_steps([g, best])
            step = _latest(common, g.step) if g.step is not None else None
            if step is None and g.step is not None:  # no eval step in common: each at its own step, unpaired
                d = float(g.nll) - float(best.nll)  # type: ignore[arg-type]
                se, paired, seeds = math.hypot(g.se or math.nan, best.se or math.nan), False, 0
            else:
                d, se, paired, seeds = compare(g, best, step)
            why = _is_tie(d, se, min_effect)
            placed.append(Placed(g, rank=i, overall=overall[id(g)], diff=d, diff_se=se, paired=paired,
                                 tied=bool(why), at_step=step, seeds_paired=seeds, why_tied=why))
        if len(placed) > 1:
            placed[0].tied = placed[1].tied
        rows += placed
        verdicts.append(_verdict(fam if mixed else None, placed, min_effect))
    rows += [Placed(g) for g in unscored]
    return Ranking(rows=rows, mixed=mixed, verdicts=[v for v in verdicts if v])


def _at(step: int | None) -> str:
    return "" if step is None else f" at step {step}"


def _verdict(family: str | None, placed: list[Placed], min_effect: float) -> str:
    """One line: is the winner separated from the runner-up (compared at a common step)?"""
    where = f"{family}: " if family else ""
    best = placed[0].cand
    if len(placed) < 2:
        return f"{where}{best.key} is the only scored configuration; nothing to compare it with."
    second = placed[1]
    d, se = second.diff or 0.0, second.diff_se if second.diff_se is not None else math.nan
    z = d / se if se and math.isfinite(se) and se > 0 else math.inf
    head = f"{where}the winner {best.key}"
    vs = f"the runner-up {second.cand.key}{_at(second.at_step)}"
    if not math.isfinite(se):
        return (f"{where}winner {best.key}; {vs} is {d:+.{DIGITS}f} nats/token behind, "
                "with no standard error to judge it (no saved draws)")
    seeds = second.seeds_paired
    se_kind = ("paired SE" if second.paired else "SE (unpaired: no saved draws)")
    if seeds >= 2:
        se_kind += f" over {seeds} paired seeds (val noise + between-seed variance)"
    elif seeds == 0:
        se_kind += " (no training seed in common)"
    if second.tied:
        n_tied = sum(p.tied for p in placed[1:])
        others = f" ({n_tied} configurations tied with it)" if n_tied > 1 else ""
        return (f"{head} is NOT separated from {vs}: difference {d:+.{DIGITS}f} ± {se:.{DIGITS}f} nats/token "
                f"= {z:.1f} {se_kind}, {second.why_tied}{others}; call it a tie"
                + ("" if seeds >= 2 else "; 1 training seed: add sweep.seeds to compare training runs"))
    if seeds < 2:
        return (f"{head} leads {vs} by {d:+.{DIGITS}f} ± {se:.{DIGITS}f} nats/token = {z:.1f} {se_kind}; "
                "this covers the val noise only and cannot separate configurations by training noise "
                "(1 training seed: add sweep.seeds to compare training runs)")
    return (f"{head} is separated from {vs}: difference {d:+.{DIGITS}f} ± {se:.{DIGITS}f} nats/token "
            f"= {z:.1f} {se_kind}, above sweep.min_effect {min_effect:g}")


def draws_at(val_dir: Path, step: int | None) -> ValDraws | None:
    """The saved draws of the eval at ``step`` in ``val_dir``, or None when there are none (or unreadable)."""
    from difflm.evaluation import draws_path

    if step is None:
        return None
    path = draws_path(val_dir, step)
    try:
        return load_val_draws(path) if path.is_file() else None
    except (OSError, ValueError, KeyError):
        return None


def fmt_pm(value: float | None, se: float | None, digits: int = DIGITS) -> str:
    """``3.1234 ± 0.0150`` (just the value when there is no finite SE; ``-`` for no value)."""
    if value is None or not math.isfinite(value):
        return "-"
    if se is None or not math.isfinite(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def fmt_sd(sd: float | None, n: int) -> str:
    """The between-seed SD cell: ``0.0123`` or ``(1 seed)``."""
    if n < 2 or sd is None or not math.isfinite(sd):
        return "(1 seed)"
    return f"{sd:.{DIGITS}f}"


def fmt_diff(p: Placed) -> str:
    """The Δ-to-best cell: ``best`` for the best, ``+0.0123 ± 0.0040 at step 30`` (``(unpaired)`` when so)."""
    if p.rank is None:
        return "-"
    if p.rank == 1:
        return "best"
    text = fmt_pm(p.diff, p.diff_se)
    if text != "-" and text[0] != "-":
        text = "+" + text
    return text + _at(p.at_step) + ("" if p.paired else " (unpaired)")


MIXED_NOTE = (
    "mixed families: ranked within each family. val/nll of different families are different quantities "
    "(ar: exact NLL; mdlm: NELBO; diffusion_lm: a variational bound that is far looser early in training), "
    "so the `overall` column is only the order of those numbers and decides nothing."
)
