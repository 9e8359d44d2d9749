"""`difflm sweep`: Ray Tune over a sweep file, each trial a distributed Ray Train run.

Layout of a sweep folder (``output.dir/output.name``)::

    sweep.yaml                      the validated sweep file
    experiment_state-*.json ...     Tune's state (what --resume reads)
    <trial_id>-<params>/            one folder per trial, named from its params
        tensorboard/                the trial's TensorBoard run (+ HParams)
        train/                      the inner Ray Train run dir (RUN_DIR of `difflm train`):
            checkpoint_*/               its checkpoints (resumable)
            val/step_XXXXXXX.npz        per-sequence val draws of every eval point (paired errors)
        result.json ...             Tune's per-trial results
    results.csv, results.json       ranked table (also `difflm results DIR`)
    val_nll_vs_step.png, params_vs_objective.png

Each trial is a Tune *function* trainable holding a tiny CPU share; inside it a
``TorchTrainer`` runs the trial's workers and forwards rank-0 metrics to Tune
with ``TuneReportCallback`` (Ray 2.60: ``Tuner(TorchTrainer(...))`` no longer
works). The inner run's name is derived from the trial id, so a resumed trial
finds its own checkpoints and continues from them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from difflm.data import prepare_data
from orchestrator import raycompat
from orchestrator.errors import SpecError
from difflm.atomic import atomic_write_text
from orchestrator.train.launch import prepare_and_place
from orchestrator.train.trainer import build_trainer
from orchestrator.rundir.run_folder import SWEEP_STATE, read_stop
from orchestrator.spec.run import RunSpec
from orchestrator.sweep.spec import SweepFile, trial_dirname, trial_raw
from orchestrator.spec.yamlio import spec_yaml, validate_as

STATE_FILE = SWEEP_STATE
#: what a trial actor reserves when it holds no CPU (sweep.resources.trial_cpus: 0)
TRIAL_MEMORY = 64 * 1024**2


# ------------------------------------------------------------------- trial
def run_trial(
    config: dict[str, Any], *, base: dict[str, Any], linked: dict[str, Any], sweep_dir: str, device: str,
    in_trial: bool = False,
) -> None:
    """One Tune trial: validate the sampled spec, prepare data (cached), then train: in this actor
    (``in_trial``, one worker: orchestrator.sweep.in_trial) or as an inner TorchTrainer run."""
    started_at = time.time()
    from ray import tune

    ctx = tune.get_context()
    params = dict(config)  # the searched dotted paths (and labels) -> sampled values
    trial_dir = Path(sweep_dir) / trial_dirname(ctx.get_trial_id(), params)
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "starts.log", "a") as f:  # one line per (re)start: resume tests read it
        f.write(f"{os.getpid()}\n")
    try:
        spec = validate_as(RunSpec, trial_raw(base, params, linked), source=f"trial {trial_dir.name}")
    except SpecError as exc:
        raise ValueError(f"sampled spec rejected: {exc}") from None
    if spec.train.eval_at_start is None:  # a trial skips the step-0 eval: its scheduler ranks later steps
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"eval_at_start": False})})
    atomic_write_text(trial_dir / "params.json", json.dumps(params, indent=2, default=str))
    prepared = prepare_data(spec.data, spec.tokenizer, log=lambda _msg: None)
    if in_trial:
        from orchestrator.sweep.in_trial import run_in_trial
        from orchestrator.train.trainer import loop_config

        if spec.scaling.num_workers != 1:  # trains_in_trial checked the base spec and every searched path
            raise ValueError(f"an in-trial run has one worker, the sampled spec asks for {spec.scaling.num_workers}")
        from orchestrator.train.startup import process_start_time

        config_ = loop_config(spec, device, prepared.cache_dir, trial_dir / "train", trial_dir / "tensorboard",
                              None, started_at)
        # the actor's own start (a process importing Ray, Tune and torch) comes before started_at: say it too
        config_["process_started_at"] = process_start_time()
        run_in_trial(config_, tune.report)
        stop = read_stop(trial_dir / "train")
        if stop is not None:
            raise RuntimeError(f"training stopped: {stop['reason']}")
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = build_trainer(
        spec,
        device,
        prepared.cache_dir,
        trial_dir / "train",
        trial_dir / "tensorboard",
        queue=None,
        callbacks=[TuneReportCallback()],
        started_at=started_at,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    stop = read_stop(trial_dir / "train")
    if stop is not None:  # a run of non-finite losses, a non-finite val metric: the trial fails with it
        raise RuntimeError(f"training stopped: {stop['reason']}")


# ------------------------------------------------------------------ driver
def fit_count(sweep: SweepFile, device: str, cpus: float, gpus: float) -> int:
    """How many trials fit at once on the machine or cluster."""
    s = sweep.base_raw()["scaling"]
    per_trial_cpu = round(s["num_workers"] * s["cpus_per_worker"] + sweep.sweep.resources.trial_cpus, 6)
    n = int(round(cpus, 6) // per_trial_cpu) if per_trial_cpu > 0 else 1
    if device == "cuda":
        per_trial_gpu = s["num_workers"] * s["gpus_per_worker"]
        if per_trial_gpu > 0:
            n = min(n, int(gpus // per_trial_gpu))
    return max(1, n)


def _param_space(sweep: SweepFile) -> dict[str, Any]:
    return _seed_space(sweep) | {path: dom.to_tune() for path, dom in sweep.sweep.search.items()}


def _seed_space(sweep: SweepFile) -> dict[str, Any]:
    """Replicates (sweep.seeds > 1): a grid over the training seed (spec.SEED_KEY) crossed with every configuration.

    The basic generator then keeps sampled (random/choice) values constant across that grid
    (``constant_grid_search``), so a configuration's seeds differ only in their training seed."""
    from ray import tune

    from orchestrator.sweep.spec import SEED_KEY, replicate_seeds

    return {SEED_KEY: tune.grid_search(replicate_seeds(sweep))} if sweep.sweep.seeds > 1 else {}


def _tune_config(sweep: SweepFile, max_concurrent: int) -> Any:
    from ray import tune

    from ray.tune.schedulers import FIFOScheduler

    from orchestrator.sweep.schedulers import ResumableASHA

    cfg = sweep.sweep
    if cfg.scheduler.kind == "asha":
        scheduler: Any = ResumableASHA(  # rungs survive `--resume` (Tune does not save schedulers)
            time_attr="step",  # the optimizer step: training_iteration restarts when a trial resumes
            max_t=sweep.trial_max_steps(),
            grace_period=cfg.scheduler.grace_period,
            reduction_factor=cfg.scheduler.reduction_factor,
            seeds=cfg.seeds,
        )
    else:
        scheduler = FIFOScheduler()
    if cfg.algorithm == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Any = OptunaSearch(sampler=TPESampler(seed=cfg.seed))
        if cfg.seeds > 1:  # each suggestion runs sweep.seeds times (REPEAT_INDEX -> train.seed + k); TPE sees the mean
            from ray.tune.search import Repeater

            search_alg = Repeater(search_alg, repeat=cfg.seeds, set_index=True)
    else:
        from ray.tune.search import BasicVariantGenerator

        # A SearchGenerator ignores TuneConfig.max_concurrent_trials: the limit goes here.
        search_alg = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=max_concurrent,
                                           constant_grid_search=cfg.seeds > 1)
    return tune.TuneConfig(
        metric=cfg.metric,
        mode=cfg.mode,
        num_samples=cfg.num_samples * (cfg.seeds if cfg.algorithm == "optuna" else 1),
        search_alg=search_alg,
        scheduler=scheduler,
        max_concurrent_trials=max_concurrent,
        trial_dirname_creator=lambda t: trial_dirname(t.trial_id, t.config),
        trial_name_creator=lambda t: trial_dirname(t.trial_id, t.config),
        time_budget_s=cfg.budget.time_limit_s,
    )


def trains_in_trial(sweep: SweepFile) -> bool:
    """Whether each trial trains in its own Tune actor (orchestrator.sweep.in_trial) rather than as a Ray Train
    run: every trial has one worker (the base spec says so and nothing searched or linked touches
    ``scaling``), unless ``sweep.resources.in_trial`` is false."""
    if sweep.sweep.resources.in_trial is False:
        return False
    if sweep.base_raw()["scaling"]["num_workers"] != 1:
        return False
    paths = set(sweep.sweep.search) | {p for values in sweep.sweep.linked.values() for v in values.values() for p in v}
    return not any(p.startswith("scaling.") for p in paths)


def trial_resources(sweep: SweepFile, device: str, in_trial: bool) -> dict[str, float]:
    """What each trial actor reserves. In-trial it is the worker: its CPUs (the trial's share was carved out
    of them by base_raw) and GPU share. Otherwise it only waits on its Train run (see _trainable)."""
    share = sweep.sweep.resources.trial_cpus
    if in_trial:
        s = sweep.base_raw()["scaling"]
        res = {"CPU": float(s["cpus_per_worker"]) + share}
        if device == "cuda" and s["gpus_per_worker"] > 0:
            res["GPU"] = float(s["gpus_per_worker"])
        return res
    # A trial actor only waits on its Train run. With no CPU it can never hold a fraction of a CPU its own or
    # another trial's workers need: after a node is lost, Tune restarts all its trials at once, and 0.01-CPU
    # actors filling the survivors' last CPU fractions left no room for any worker (a deadlock, measured on a
    # 2-node cluster). A placement-group bundle must not be empty: it reserves a little memory instead.
    return {"CPU": share} if share > 0 else {"CPU": 0, "memory": TRIAL_MEMORY}


def _trainable(sweep: SweepFile, sweep_dir: Path, device: str) -> Any:
    from ray import tune

    in_trial = trains_in_trial(sweep)
    fn = tune.with_parameters(
        run_trial, base=sweep.base_raw(), linked=sweep.sweep.linked, sweep_dir=str(sweep_dir), device=device,
        in_trial=in_trial,
    )
    return tune.with_resources(fn, trial_resources(sweep, device, in_trial))


def check_sweep_unchanged(sweep_dir: Path, sweep: SweepFile) -> None:
    """SpecError (exit 2, before Ray) when a resume's sweep differs from the sweep.yaml the sweep saved.

    The resumed trials would otherwise run a different sweep than the finished ones (and sweep.yaml,
    rewritten, would no longer say what those ran). Locations and cadence may change freely, as for a
    run (orchestrator.rundir.run_folder.RESUME_FREE); ``--allow-spec-change`` accepts the rest."""
    import yaml

    from orchestrator.rundir.run_folder import spec_differences

    saved_file = sweep_dir / "sweep.yaml"
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    diffs = spec_differences(saved, yaml.safe_load(spec_yaml(sweep)) or {})
    if diffs:
        raise SpecError(
            f"{sweep_dir}: the sweep differs from its saved sweep.yaml in {'; '.join(diffs)}; pass "
            "--allow-spec-change to resume with the new values anyway, or restore the sweep file"
        )


def sweep_dir_for(sweep: SweepFile, spec_path: str) -> Path:
    name = sweep.output.name or Path(spec_path).stem
    return Path(sweep.output.dir).expanduser().resolve() / name


def run_sweep(
    sweep: SweepFile,
    spec_path: str,
    *,
    resume: bool,
    address: str | None,
    console: Any,
    overrides: tuple[str, ...] = (),
    profile: str | None = None,
    allow_spec_change: bool = False,
) -> float:
    """Validate resources, start/join Ray, run (or restore) the Tuner. Returns the seconds Tune ran."""
    from ray import tune

    sweep_dir = sweep_dir_for(sweep, spec_path)
    state = sweep_dir / STATE_FILE
    if resume and not state.exists():
        raise SpecError(f"nothing to resume: {sweep_dir} has no sweep state (start it without --resume)")
    if not resume and state.exists():
        raise SpecError(
            f"{sweep_dir} already holds a sweep; resume it with `difflm resume {sweep_dir}` "
            f"(or `difflm sweep {spec_path} --resume`) or choose another folder with --name NEW_NAME"
        )
    if resume and not allow_spec_change:
        check_sweep_unchanged(sweep_dir, sweep)
    restart = resume and not raycompat.saved_trial_count(str(sweep_dir))
    if restart:  # killed before Tune saved a trial: nothing of Tune's to restore (see raycompat.saved_trial_count)
        _set_aside_unsaved(sweep_dir)
    base_spec = validate_as(RunSpec, sweep.base_raw(), source=spec_path)
    # Tokenize once on the driver (trials hit the cache); data errors stop here, before Ray.
    _, _, device, cpus, gpus = prepare_and_place(base_spec, address, console, dashboard=True)
    fits = fit_count(sweep, device, cpus, gpus)
    max_concurrent = min(sweep.sweep.resources.max_concurrent_trials or fits, fits)
    # Trial errors are shown in our table; keep Tune's tracebacks off the console.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "sweep.yaml", spec_yaml(sweep))
    if not resume:
        atomic_write_text(
            state,
            json.dumps(
                {"spec_path": str(Path(spec_path).resolve()), "overrides": list(overrides), "profile": _abs_profile(profile)},
                indent=2,
            ),
        )
    from orchestrator.sweep import console as sweep_console

    sweep_console.ACTIVE["console"] = console
    table = sweep_console.SweepTable(sweep, sweep_dir)
    # Only Tune's JSON results (what `difflm results` reads): its CSV and TensorBoard loggers
    # would put a second, differently-tagged TensorBoard run next to each trial's own.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    from ray.tune.logger import JsonLoggerCallback

    from orchestrator.cluster.recovery import ReleaseOrphanedPlacementGroups

    def callbacks() -> list[Any]:
        return [table, JsonLoggerCallback(), ReleaseOrphanedPlacementGroups()]

    run_config = tune.RunConfig(
        name=sweep_dir.name,
        storage_path=str(sweep_dir.parent),
        callbacks=callbacks(),
        verbose=0,
        # A failed trial (e.g. its node was lost) restarts up to max_failures times, wherever Ray has room;
        # its Train run resumes from its last checkpoint (the run folder is named from the trial id).
        failure_config=tune.FailureConfig(max_failures=sweep.sweep.max_failures, fail_fast=False),
    )
    trainable = _trainable(sweep, sweep_dir, device)
    console.info(
        f"sweep: {sweep_dir}\n{_describe(sweep)}; up to {max_concurrent} trial(s) at once, "
        f"{base_spec.scaling.num_workers} worker(s) per trial, device {device}"
    )
    if restart:
        console.info("resuming: Tune had saved no trial before the sweep stopped; its trials start again "
                     f"(the unsaved first attempt is in {sweep_dir / UNSAVED_DIR})")
    if resume and not restart:
        tuner = tune.Tuner.restore(
            str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
        )
        # The restored run config carries the unpickled table of the first session; draw with ours.
        raycompat.tuner_run_config(tuner).callbacks = callbacks()
        console.info(
            "resuming: finished trials are kept; unfinished ones continue from their last checkpoint; "
            "ASHA's rungs are rebuilt from the trials' reported results"
        )
    else:
        tuner = tune.Tuner(
            trainable, param_space=_param_space(sweep), tune_config=_tune_config(sweep, max_concurrent),
            run_config=run_config,
        )
    start = time.monotonic()
    try:
        tuner.fit()
    finally:
        table.close()
    return time.monotonic() - start


UNSAVED_DIR = "unsaved-attempt"


def _set_aside_unsaved(sweep_dir: Path) -> None:
    """Move Tune's state files and trial folders of a sweep Tune saved no trial of into ``UNSAVED_DIR``.

    A fresh Tuner then starts in the same folder (difflm's sweep.yaml and state file stay); results
    read Tune's newest state, so the set-aside folders cannot mix into the table, and nothing is deleted."""
    keep = {STATE_FILE, "sweep.yaml", UNSAVED_DIR}
    aside = sweep_dir / UNSAVED_DIR
    aside.mkdir(exist_ok=True)
    for p in sweep_dir.iterdir():
        if p.name not in keep:
            p.rename(aside / p.name)


def _abs_profile(profile: str | None) -> str | None:
    """A profile as `difflm resume` can find it again from any folder: a path, absolute."""
    if profile is None:
        return None
    from orchestrator.cluster.profile import resolve_profile_path

    return str(resolve_profile_path(profile).resolve())


def _describe(sweep: SweepFile) -> str:
    cfg = sweep.sweep
    space = ", ".join(f"{p} {d.kind}{list(d.value)}" for p, d in cfg.search.items())
    sched = "ASHA" if cfg.scheduler.kind == "asha" else "no early stopping"
    seeds = f", {cfg.seeds} training seeds per configuration" if cfg.seeds > 1 else ""
    return (f"search {space}; {cfg.algorithm}, {cfg.num_samples} sample(s){seeds}, {sched}, "
            f"{sweep.trial_max_steps()} steps/trial")
