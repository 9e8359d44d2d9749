"""The sweep file: a run spec plus a ``sweep:`` section, validated before Ray starts.

``sweep.search`` maps dotted run-spec paths to a domain written as a one-key
mapping, e.g. ``diffusion.schedule: {grid: [loglinear, cosine]}`` or
``diffusion.likelihood_weight: {loguniform: [0.01, 1.0]}``. Every path must name
a run-spec field (typos get the closest valid path); grid/choice values and range
endpoints are applied to the base spec and validated, so a bad value exits 2
before anything runs.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Literal

from pydantic import Field, model_validator

from difflm._config import StrictModel
from orchestrator.errors import SpecError
from orchestrator.spec.run import RunSpec
from orchestrator.spec.yamlio import apply_overrides, deep_merge, read_yaml, set_path, suggest, valid_paths, validate_as

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform", "qloguniform", "qrandint")


class Domain(StrictModel):
    """One searched value: exactly one of the keys below."""

    grid: list[Any] | None = Field(None, min_length=1, description="Try every value (combined across grid paths).")
    choice: list[Any] | None = Field(None, min_length=1, description="Sample one value uniformly per trial.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high] sampled uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high] sampled uniformly in log space.")
    randint: tuple[int, int] | None = Field(None, description="[low, high) integer.")
    quniform: tuple[float, float, float] | None = Field(None, description="[low, high, q] uniform rounded to q.")
    qloguniform: tuple[float, float, float] | None = Field(None, description="[low, high, q] log-uniform rounded to q.")
    qrandint: tuple[int, int, int] | None = Field(None, description="[low, high, q] integer rounded to q (inclusive).")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Domain":
        set_kinds = [k for k in DOMAIN_KINDS if getattr(self, k) is not None]
        if len(set_kinds) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAIN_KINDS)} (got {set_kinds or 'none'})")
        kind = set_kinds[0]
        value = getattr(self, kind)
        if kind not in ("grid", "choice"):
            lo, hi = value[0], value[1]
            if not lo < hi:
                raise ValueError(f"{kind}: low ({lo}) must be below high ({hi})")
            if "log" in kind and lo <= 0:
                raise ValueError(f"{kind}: low must be > 0 for a log scale (got {lo})")
            if kind.startswith("q") and value[2] <= 0:
                raise ValueError(f"{kind}: q must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAIN_KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    def probe_values(self) -> list[Any]:
        """Values that must each pass run-spec validation: every grid/choice value, range endpoints."""
        v = self.value
        if self.kind in ("grid", "choice"):
            return list(v)
        if self.kind in ("randint",):
            return [v[0], v[1] - 1]
        return [v[0], v[1]]

    def to_tune(self) -> Any:
        from ray import tune

        v = self.value
        return {
            "grid": lambda: tune.grid_search(list(v)),
            "choice": lambda: tune.choice(list(v)),
            "uniform": lambda: tune.uniform(*v),
            "loguniform": lambda: tune.loguniform(*v),
            "randint": lambda: tune.randint(*v),
            "quniform": lambda: tune.quniform(*v),
            "qloguniform": lambda: tune.qloguniform(*v),
            "qrandint": lambda: tune.qrandint(*v),
        }[self.kind]()


class SchedulerConfig(StrictModel):
    """Early stopping of weak trials."""

    kind: Literal["asha", "none"] = Field("asha", description="asha: async successive halving; none: run all to budget.")
    grace_period: int = Field(20, ge=1, description="ASHA: optimizer steps every trial runs before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA: keep 1/reduction_factor of trials at each rung.")


class SweepResources(StrictModel):
    """What each trial gets; unset values come from the spec's `scaling` section."""

    workers_per_trial: int | None = Field(None, ge=1, description="Ray Train workers per trial (default scaling.num_workers).")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per worker (default scaling.cpus_per_worker).")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per worker on CUDA (default scaling.gpus_per_worker).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Trials at once; default: as many as fit.")
    in_trial: bool | None = Field(
        None,
        description="Train a one-worker trial inside its Tune trial actor instead of a Ray Train run (two Python "
        "processes fewer per trial: seconds of start-up). null (default): yes when every trial has one worker; "
        "false: always a Ray Train run.",
    )
    trial_cpus: float = Field(
        0.0,
        ge=0,
        le=1,
        description="CPU share each Tune trial actor holds. 0 (default): none (it only waits on its Train run), so "
        "trials never hold CPU that workers need, even when a lost node shrinks the cluster. Above 0 it is carved "
        "out of the trial's workers' reservation.",
    )


class SweepBudget(StrictModel):
    """Limits."""

    max_steps: int | None = Field(None, ge=1, description="Optimizer steps per trial (overrides train.max_steps).")
    time_limit_s: float | None = Field(None, gt=0, description="Wall-clock limit for the whole sweep, seconds.")


class SweepConfig(StrictModel):
    """The `sweep:` section."""

    search: dict[str, Domain] = Field(..., min_length=1, description="Dotted run-spec path -> domain.")
    linked: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict,
        description="Values set together with a searched value: {searched key: {value: {path: value}}}, "
        "e.g. bigger model sizes get more workers. A searched key without a dot is a label whose values "
        "are defined entirely here (e.g. a family + schedule pair).",
    )
    metric: str = Field("val/nll", description="Objective reported at every eval (val/nll: nats/token NELBO).")
    mode: Literal["min", "max"] = Field("min", description="Minimise or maximise the metric.")
    num_samples: int = Field(1, ge=1, description="Trials per grid point (random/optuna: number of trials).")
    algorithm: Literal["basic", "optuna"] = Field(
        "basic", description="basic: grid/random variant generator; optuna: TPE (no grid domains)."
    )
    seed: int = Field(0, description="Seed of the search algorithm.")
    seeds: int = Field(
        1,
        ge=1,
        strict=True,
        description="Training seeds per configuration (replicates). Seed k of every configuration is "
        "train.seed + k, so configurations are compared paired over seeds as well as over val draws; results "
        "group a configuration's seeds (mean, between-seed SD, SE) and ASHA stops them together. With 1, a "
        "verdict covers the val noise only, not training noise.",
    )
    min_effect: float = Field(
        0.005,
        ge=0,
        description="Practical threshold, nats/token: a difference to the best below it is a tie whatever its SE.",
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Early stopping.")
    resources: SweepResources = Field(default_factory=SweepResources, description="Per-trial resources.")
    budget: SweepBudget = Field(default_factory=SweepBudget, description="Step and time limits.")
    max_failures: int = Field(
        0,
        ge=0,
        le=100,
        description="Times Tune restarts a failed trial, from its last checkpoint and on any node with room "
        "(on a cluster: a lost node fails only its trials, which then run elsewhere). 0: a failed trial stays failed.",
    )


class SweepFile(RunSpec):
    """A run spec (the base of every trial) plus the sweep section."""

    sweep: SweepConfig = Field(..., description="What to search and how.")

    @model_validator(mode="after")
    def _paths_and_values(self) -> "SweepFile":
        paths = valid_paths(RunSpec)
        cfg = self.sweep
        for label in self.labels():
            missing = [str(v) for v in cfg.search[label].probe_values() if str(v) not in cfg.linked[label]]
            if cfg.search[label].kind not in ("grid", "choice") or missing:
                raise ValueError(
                    f"sweep: label {label!r} needs grid/choice values that each have an entry in sweep.linked.{label}"
                    + (f" (missing: {', '.join(missing)})" if missing else "")
                )
        for path in [*cfg.search, *(p for m in cfg.linked.values() for v in m.values() for p in v)]:
            if path not in paths and path not in self.labels():
                raise ValueError(f"sweep: {path!r} is not a run-spec field{suggest(path, paths)}")
        for path in cfg.linked:
            if path not in cfg.search:
                raise ValueError(f"sweep.linked: {path!r} is not a searched path; add it to sweep.search")
        if "train.seed" in cfg.search and "seeds" in cfg.model_fields_set:
            raise ValueError(
                "sweep.seeds and a search over train.seed conflict: sweep.seeds sets each trial's train.seed "
                "(train.seed + k); drop one of them"
            )
        if cfg.algorithm == "optuna":
            grids = [p for p, d in cfg.search.items() if d.kind == "grid"]
            if grids:
                raise ValueError(f"sweep: optuna cannot search grid domains ({', '.join(grids)}); use choice")
        if cfg.scheduler.kind == "asha" and cfg.scheduler.grace_period > self.trial_max_steps():
            raise ValueError(
                f"sweep.scheduler.grace_period ({cfg.scheduler.grace_period}) exceeds the steps per trial "
                f"({self.trial_max_steps()})"
            )
        if not (cfg.metric.startswith("val/") or cfg.metric.startswith("train/")):
            raise ValueError(f"sweep.metric {cfg.metric!r}: use a reported metric such as val/nll, val/ppl, val/bpt")
        return self

    def labels(self) -> list[str]:
        """Search keys that are names, not spec paths: plain words whose values are defined in `linked`
        (e.g. `variant: {grid: [mdlm-cosine, dlm-cosine]}` with each value's settings under linked.variant)."""
        return [k for k in self.sweep.search if "." not in k and k in self.sweep.linked]

    def trial_max_steps(self) -> int:
        return self.sweep.budget.max_steps or self.train.max_steps

    def base_raw(self) -> dict[str, Any]:
        """The run spec every trial starts from (sweep section dropped, budget and resources applied)."""
        raw = self.model_dump(mode="json", exclude={"sweep"})
        # Only the family sections' chosen (non-default) fields: a trial of another family (a search over
        # model.family) then starts from what the file set, and a field that family does not read is an
        # error only when the file set it, as a default value never changed anything.
        raw["model"] = self.model.model_dump(mode="json", exclude_defaults=True) | {"family": self.model.family}
        raw["diffusion"] = self.diffusion.model_dump(mode="json", exclude_defaults=True)
        if self._schedule_defaulted:  # each trial's family picks its own default (ar: none at all)
            raw["diffusion"].pop("schedule", None)
        r = self.sweep.resources
        raw["train"]["max_steps"] = self.trial_max_steps()
        for key, val in (
            ("num_workers", r.workers_per_trial),
            ("cpus_per_worker", r.cpus_per_worker),
            ("gpus_per_worker", r.gpus_per_worker),
        ):
            if val is not None:
                raw["scaling"][key] = val
        sc = raw["scaling"]
        if sc["cpus_per_worker"] == "auto":  # trials share the CPUs: one each, as many trials as fit
            sc["cpus_per_worker"] = 1.0
        # A trial actor's CPU share, if any, is carved out of its workers' reservation, so N trials of
        # 1-CPU workers fit on N CPUs (a reservation is a scheduling unit; nobody computes on it).
        if r.trial_cpus > 0:
            sc["cpus_per_worker"] = max(sc["cpus_per_worker"] - r.trial_cpus / sc["num_workers"], 0.01)
        return raw


#: The key that carries a replicate's training seed (sweep.seeds > 1): a grid whose values set train.seed.
#: Not "train.seed" itself: Tune's grid varies the alphabetically first key fastest, and "_seed" sorts
#: first, so a configuration's seeds are created (and start) next to each other and reach ASHA's rungs together.
SEED_KEY = "_seed"


def replicate_seeds(sweep: "SweepFile") -> list[int]:
    """The training seeds every configuration runs with: train.seed, train.seed + 1, ... (sweep.seeds of them).

    Why shared: seed k of configuration A and seed k of configuration B start from the same
    initialisation and data order, so their difference is paired over seeds (training noise
    that both share cancels), as the val draws pair it over the val noise."""
    return [sweep.train.seed + k for k in range(sweep.sweep.seeds)]


#: What Tune's Repeater (optuna with sweep.seeds > 1) calls a replicate's index within its configuration.
REPEAT_INDEX = "__trial_index__"


def trial_seed(params: dict[str, Any], base_seed: int) -> int:
    """The training seed of a trial: its replicate seed (basic: SEED_KEY; optuna: train.seed + Repeater index)."""
    if SEED_KEY in params:
        return int(params[SEED_KEY])
    if REPEAT_INDEX in params:
        return int(base_seed) + int(params[REPEAT_INDEX])
    return int(base_seed)


def config_key(params: dict[str, Any]) -> str:
    """A configuration's identity: its searched values without the replicate seed (what seeds are grouped by)."""
    items = sorted((k, _fmt_value(v)) for k, v in params.items() if k != SEED_KEY and not k.startswith("__"))
    return ", ".join(f"{k}={v}" for k, v in items)


def trial_raw(base: dict[str, Any], params: dict[str, Any], linked: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Base spec + sampled params + linked values, as a plain dict (validated by the caller)."""
    raw = copy.deepcopy(base)
    if SEED_KEY in params or REPEAT_INDEX in params:  # a replicate: its training seed
        seed = trial_seed(params, raw.get("train", {}).get("seed", 0))
        set_path(raw, ["train", "seed"], seed, label="sweep.seeds")
    for path, value in params.items():
        if "." in path or path in raw:  # labels (plain words defined in `linked`) set nothing themselves
            set_path(raw, path.split("."), value, label=f"sweep.search.{path}")
    for path, by_value in linked.items():
        extra = by_value.get(str(params.get(path)))
        for sub_path, sub_value in (extra or {}).items():
            set_path(raw, sub_path.split("."), sub_value, label=f"sweep.linked.{path}")
    return raw


def load_sweep_file(
    path: str, overrides: list[str] | tuple[str, ...] = (), defaults: dict[str, Any] | None = None
) -> SweepFile:
    """Read + validate a sweep file, then probe every grid/choice value and range endpoint against RunSpec.

    ``defaults`` (a scaling profile's fields) sit under the file's run spec: defaults < file < overrides,
    and ``sweep.resources`` and searched values still win per trial.
    """
    raw = read_yaml(path)
    if "sweep" not in raw:
        raise SpecError(f"{path}: no `sweep:` section; a plain run spec runs with `difflm train {path}`")
    raw = deep_merge(defaults or {}, raw)
    raw = apply_overrides(raw, overrides, source=str(path))
    sweep = validate_as(SweepFile, raw, source=str(path))
    base = sweep.base_raw()
    for search_path, domain in sweep.sweep.search.items():
        for value in domain.probe_values():
            if isinstance(value, float) and not math.isfinite(value):
                raise SpecError(f"{path}: sweep.search.{search_path}: {value} is not finite")
            probe = trial_raw(base, {search_path: value}, sweep.sweep.linked)
            validate_as(RunSpec, probe, source=f"{path}: sweep.search.{search_path}={value!r}")
    return sweep


# ------------------------------------------------------------ trial folders
def _short(path: str) -> str:
    return path.split(".")[-1]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def trial_dirname(trial_id: str, params: dict[str, Any]) -> str:
    """Deterministic, readable folder name: ``<trial_id>-schedule=cosine-likelihood_weight=0.1``."""
    parts = [f"{_short(k)}={_fmt_value(v)}" for k, v in sorted(params.items())]
    name = "-".join([trial_id, *parts])
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)[:120]
