"""Ranking sweep trials with error bars: best val NLL ± SE, paired differences to the best, ties called ties.

Shared by ``difflm results`` (:mod:`orchestrator.results`) and the live sweep table
(:mod:`orchestrator.sweep_console`), so both say the same thing.

* Every trial is compared at its best eval point, from the per-sequence val draws its rank 0
  saved there (``<trial>/train/val/step_XXXXXXX.npz``, :mod:`difflm.evaluation`). Two trials
  scored with the same val noise (same ``eval_seed`` and ``eval_samples``: common random
  numbers) get the standard error of their *difference* from the per-draw differences,
  which is far smaller than either trial's own error. Without saved draws (an old run) the
  two errors are combined as if independent, and the row says "unpaired".
* A trial within 2 (paired) SE of its family's best is **tied** with it; the verdict line
  says whether the winner is separated from the runner-up.
* Trials of different families are ranked **within their family**: diffusion_lm's
  variational bound is a different quantity from mdlm's NELBO early in training (hundreds
  of nats/token), and ar's NLL is exact, not a bound. The cross-family position is shown in
  its own, labelled column (``overall``) and decides nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from difflm.evaluation import ValDraws, load_val_draws, paired_difference

#: Trials whose difference to the best is within this many standard errors are tied.
TIE_SE = 2.0


@dataclass
class Candidate:
    """One trial as the ranking sees it: its best value and the draws behind it (None when not saved)."""

    key: str
    family: str
    nll: float | None
    se: float | None = None
    draws: ValDraws | None = field(default=None, repr=False)


@dataclass
class Placed:
    """A candidate's place: ``rank`` within its family (1 = best), ``overall`` across families, and its
    difference ``diff`` ± ``diff_se`` to the family's best (0 for the best itself)."""

    cand: Candidate
    rank: int | None = None
    overall: int | None = None
    diff: float | None = None
    diff_se: float | None = None
    paired: bool = False
    tied: bool = False

    @property
    def is_best(self) -> bool:
        return self.rank == 1


@dataclass
class Ranking:
    rows: list[Placed]
    mixed: bool
    verdicts: list[str]


def _difference(a: Candidate, b: Candidate) -> tuple[float, float, bool]:
    """nll(a) - nll(b), its standard error and whether it is paired (common random numbers)."""
    diff = float(a.nll) - float(b.nll)  # type: ignore[arg-type]
    if a.draws is not None and b.draws is not None:
        try:
            pd = paired_difference(a.draws, b.draws)
        except ValueError:
            pd = None
        if pd is not None:  # on the sequences both scored (a capped split: the common prefix)
            return pd.diff, pd.se, pd.paired
    se_a = a.se if a.se is not None and math.isfinite(a.se) else math.nan
    se_b = b.se if b.se is not None and math.isfinite(b.se) else math.nan
    return diff, math.hypot(se_a, se_b), False


def rank_candidates(cands: list[Candidate]) -> Ranking:
    """Rank within each family by nll (lowest first); families in the order of their best; unscored last."""
    scored = [c for c in cands if c.nll is not None and math.isfinite(c.nll)]
    unscored = [c for c in cands if c not in scored]
    families: dict[str, list[Candidate]] = {}
    for c in sorted(scored, key=lambda c: c.nll):  # type: ignore[arg-type, return-value]
        families.setdefault(c.family, []).append(c)
    overall = {id(c): i for i, c in enumerate(sorted(scored, key=lambda c: c.nll), 1)}  # type: ignore[arg-type, return-value]
    rows: list[Placed] = []
    verdicts: list[str] = []
    mixed = len(families) > 1
    for fam, members in families.items():
        best = members[0]
        placed = [Placed(best, rank=1, overall=overall[id(best)], diff=0.0, diff_se=0.0, paired=True, tied=False)]
        for i, c in enumerate(members[1:], 2):
            diff, se, paired = _difference(c, best)
            tied = math.isfinite(se) and diff <= TIE_SE * se
            placed.append(Placed(c, rank=i, overall=overall[id(c)], diff=diff, diff_se=se, paired=paired, tied=tied))
        if len(placed) > 1:
            placed[0].tied = placed[1].tied
        rows += placed
        verdicts.append(_verdict(fam if mixed else None, placed))
    rows += [Placed(c) for c in unscored]
    return Ranking(rows=rows, mixed=mixed, verdicts=[v for v in verdicts if v])


def _verdict(family: str | None, placed: list[Placed]) -> str:
    """One line: is the winner separated from the runner-up?"""
    where = f"{family}: " if family else ""
    best = placed[0].cand
    if len(placed) < 2:
        return f"{where}{best.key} is the only scored trial; nothing to compare it with."
    second = placed[1]
    se_kind = "paired SE" if second.paired else "SE (unpaired: no saved draws)"
    d, se = second.diff or 0.0, second.diff_se if second.diff_se is not None else math.nan
    z = d / se if se and math.isfinite(se) and se > 0 else math.inf
    n_tied = sum(p.tied for p in placed[1:])
    if not math.isfinite(se):
        return (f"{where}winner {best.key}; the runner-up {second.cand.key} is {d:+.4f} nats/token behind, "
                "with no standard error to judge it (no saved draws)")
    if second.tied:
        others = f" ({n_tied} trial(s) within {TIE_SE:g} SE of it)" if n_tied > 1 else ""
        return (f"{where}the winner {best.key} is NOT separated from the runner-up {second.cand.key}: "
                f"difference {d:+.4f} ± {se:.4f} nats/token = {z:.1f} {se_kind} < {TIE_SE:g}{others}; "
                "call it a tie or evaluate more (train.eval_samples, a larger val split)")
    return (f"{where}the winner {best.key} is separated from the runner-up {second.cand.key}: "
            f"difference {d:+.4f} ± {se:.4f} nats/token = {z:.1f} {se_kind}")


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


def fmt_pm(value: float | None, se: float | None, digits: int = 4) -> str:
    """``3.1234 ± 0.0150`` (just the value when there is no finite SE; ``-`` for no value)."""
    if value is None or not math.isfinite(value):
        return "-"
    if se is None or not math.isfinite(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def fmt_diff(p: Placed) -> str:
    """The Δ-to-best cell: ``best`` for the best, ``+0.0123 ± 0.0040`` (``(unpaired)`` when so) otherwise."""
    if p.rank is None:
        return "-"
    if p.rank == 1:
        return "best"
    text = fmt_pm(p.diff, p.diff_se)
    if text != "-" and text[0] != "-":
        text = "+" + text
    return text + ("" if p.paired else " (unpaired)")


MIXED_NOTE = (
    "mixed families: ranked within each family. val/nll of different families are different quantities "
    "(ar: exact NLL; mdlm: NELBO; diffusion_lm: a variational bound that is far looser early in training), "
    "so the `overall` column is only the order of those numbers and decides nothing."
)
