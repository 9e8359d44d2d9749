"""Every Ray name difflm uses that Ray does not promise to keep, in one place.

Why one module: difflm needs a few things Ray has no public API for (quiet start-up, a lean
Train controller, resuming ASHA, cleaning up after lost nodes). Those names live in Ray's
private modules (``ray._private``, ``ray._raylet``, ``ray.*._internal``) or are underscore
attributes of public classes, and any Ray release may move them; pyproject pins ``ray<2.61``
for that reason. Kept here, an upgrade is one file to read: ``tests/test_raycompat.py``
resolves every item's Ray names (and checks the instance attributes on real objects) and fails
naming the item, and a layout test keeps private Ray names out of every other module.

Each item is a function whose docstring says why difflm needs it and which public API would
replace it (``Public replacement:``). :data:`ITEMS` lists them with the Ray names they touch;
every public function of this module is one item. Nothing here imports Ray at module import:
each item imports what it needs on first use (the doctor imports modules that import this one
and must not pay for Ray Train).
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Item:
    """One adapter function and the Ray names it relies on.

    ``names``: ``"module:attr.attr"`` paths that must import; ``probe``: optional check of
    attributes that only exist on instances (it raises AttributeError when one is gone)."""

    name: str
    names: tuple[str, ...]
    probe: Callable[[], None] | None = None


#: item name -> Item (filled by :func:`_uses`; the order of this file)
ITEMS: dict[str, Item] = {}


def load(path: str) -> Any:
    """The object at ``"module:attr.attr"`` (or the module for ``"module"``); ImportError or
    AttributeError when this Ray has no such name."""
    module, _, attrs = path.partition(":")
    obj: Any = importlib.import_module(module)
    for a in filter(None, attrs.split(".")):
        obj = getattr(obj, a)
    return obj


def missing_names() -> list[str]:
    """One line per item whose Ray names this Ray lacks: the item, the name, and the public API that
    would replace it (what tests/test_raycompat.py prints after a Ray upgrade)."""
    import ray

    out = []
    for item in ITEMS.values():
        fn = globals()[item.name]
        doc = " ".join((fn.__doc__ or "").split())
        replacement = doc.partition("Public replacement:")[2].strip() or "none named"
        checks: list[tuple[str, Callable[[], Any]]] = [(n, functools.partial(load, n)) for n in item.names]
        if item.probe is not None:
            checks.append(("instance attributes (" + item.probe.__name__ + ")", item.probe))
        for what, check in checks:
            try:
                check()
            except (ImportError, AttributeError) as exc:
                out.append(
                    f"orchestrator.raycompat.{item.name}: Ray {ray.__version__} has no {what} ({type(exc).__name__}: "
                    f"{exc}); rewrite the item for this Ray; public replacement: {replacement}"
                )
    return out


def _uses(*names: str, probe: Callable[[], None] | None = None) -> Callable[[F], F]:
    def register(fn: F) -> F:
        ITEMS[fn.__name__] = Item(fn.__name__, names, probe)
        return fn

    return register


# --- cluster connection and authentication ---------------------------------------------------

_SERVICES = "ray._private.services"


@_uses(f"{_SERVICES}:canonicalize_bootstrap_address")
def canonicalize_bootstrap_address(address: str) -> str | None:
    """HOST:PORT of the GCS that ``address`` (``auto`` or HOST:PORT) names, None when none is found.

    Why: ``ray.init`` retries an address with no GCS for minutes; difflm resolves ``auto`` itself
    and probes the port so a typo fails at once (orchestrator.cluster.connect).
    Public replacement: none; a timeout argument for ``ray.init(address=...)`` would make it moot."""
    return load(f"{_SERVICES}:canonicalize_bootstrap_address")(address)  # type: ignore[no-any-return]


@_uses(f"{_SERVICES}:find_bootstrap_address")
def find_bootstrap_address() -> str | None:
    """The GCS address of the latest ``ray start`` on this machine (Ray records it under /tmp/ray), or None.

    Why: ``difflm cluster status`` (default ``--address auto``) says "no cluster" instead of a
    connection error when none runs. Public replacement: none (``ray status`` does the same internally)."""
    return load(f"{_SERVICES}:find_bootstrap_address")(None)  # type: ignore[no-any-return]


_TOKEN_SETUP = "ray._private.authentication.authentication_token_setup"


@_uses(f"{_TOKEN_SETUP}:maybe_enable_token_auth_if_token_available")
def enable_token_auth_if_available() -> None:
    """Turn on token authentication for this driver when the machine has a token and RAY_AUTH_MODE is unset.

    Why: Ray does this for ``address="auto"`` but not for HOST:PORT, where a token cluster then
    refuses the driver. Its "token authentication is enabled" warning is silenced (nothing to act on).
    ImportError on a Ray without token authentication.
    Public replacement: ``ray.init`` enabling the token for every address form (or an ``auth`` argument)."""
    fn = load(f"{_TOKEN_SETUP}:maybe_enable_token_auth_if_token_available")
    setup_log = logging.getLogger(_TOKEN_SETUP)
    level = setup_log.level
    setup_log.setLevel(logging.ERROR)
    try:
        fn(warn_if_disabled=False)
    finally:
        setup_log.setLevel(level)


@_uses("ray._raylet:AuthenticationTokenLoader.instance")
def has_auth_token() -> bool:
    """Whether this machine has a Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).

    Why: ``difflm cluster up|join`` refuses to start a token node without one (or generates it on
    the head) instead of a node every driver is then refused by.
    Public replacement: none; ``ray get-auth-token`` prints the token but has no "is there one" answer."""
    loader = load("ray._raylet:AuthenticationTokenLoader")
    return bool(loader.instance().has_token(ignore_auth_mode=True))


@_uses("ray._raylet:Config.initialize")
def refresh_ray_config() -> None:
    """Re-read Ray's C++ config from the environment (after difflm set ``RAY_AUTH_MODE=token``).

    Why: Ray caches its config at import; a private instance must start with token auth on, and
    this is how Ray's own default-enabling code refreshes it (ray._private.authentication).
    Public replacement: an ``auth_mode`` argument of ``ray.init``."""
    load("ray._raylet:Config").initialize("")


@_uses("ray.autoscaler._private.util:prepare_config", "ray.autoscaler._private.util:validate_config")
def validate_launcher_config(raw: dict[str, Any]) -> None:
    """Raise what Ray's cluster launcher would raise for this config (schema and defaults).

    Why: ``difflm cluster up --config`` and spec loading reject a bad launcher YAML with one line
    before ``ray up`` prints a traceback. Public replacement: none (``ray up`` validates inside)."""
    util = load("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(dict(raw)))


# --- start-up of a private instance ----------------------------------------------------------

_AUTOSCALING = "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator"


@_uses(f"{_AUTOSCALING}:get_or_create_autoscaling_coordinator")
def prestart_autoscaling_coordinator() -> None:
    """Start Ray Data's ``AutoscalingCoordinator`` actor now, in the background.

    Why: every Ray Train controller creates it on first use and waits for it (~1.3 s on 2 cores)
    before starting any worker; started right after ``ray.init`` it imports in parallel
    (orchestrator.cluster.session). Public replacement: none (Ray Train could start it lazily)."""
    load(f"{_AUTOSCALING}:get_or_create_autoscaling_coordinator")()


@_uses("ray._private.worker:print_to_stdstream")
def filter_driver_log_lines(drop: Callable[[dict[str, Any]], bool]) -> None:
    """Wrap the driver's printer of worker/raylet log lines so batches for which ``drop(data)`` is
    true are not printed (idempotent: a second call keeps the first filter).

    Why: the raylet's "N worker processes have been started" and 600-character "A worker died"
    paragraphs hide the sweep table and the one-line failure difflm prints instead.
    Public replacement: none; ``log_to_driver=False`` drops every line, a per-source filter would do."""
    ray_worker = importlib.import_module("ray._private.worker")
    original = ray_worker.print_to_stdstream
    if getattr(original, "_difflm_filtered", False):
        return

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        if not drop(data):
            original(data, ignore_prefix)

    filtered._difflm_filtered = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered


# --- cluster state ---------------------------------------------------------------------------


@_uses("ray._private.state:available_resources_per_node")
def available_resources_per_node() -> dict[str, dict[str, float]]:
    """Node id -> resources not in use now.

    Why: ``difflm cluster status`` shows free CPUs/GPUs per node, not only totals.
    Public replacement: ``ray.util.state`` has no per-node availability; ``ray.available_resources()``
    is cluster-wide only."""
    return load("ray._private.state:available_resources_per_node")()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class PlacementGroupRecord:
    """What orchestrator.cluster.recovery needs of one placement group in the GCS table."""

    placement_group_id: bytes
    removed: bool
    detached: bool
    creator_job_hex: str
    creator_actor_id: bytes  # b"" or nil: made by the driver
    creator_actor_dead: bool


@_uses(
    "ray._private.state:state._connect_and_get_accessor",
    "ray.core.generated.gcs_pb2:PlacementGroupTableData.REMOVED",
)
def placement_groups() -> list[PlacementGroupRecord]:
    """Every placement group the GCS knows, with its creator's job and whether its creator actor is dead.

    Why: a Train controller killed with its node leaves its workers' placement group reserved; the
    sweep driver frees those (orchestrator.cluster.recovery) so the retried trial gets the CPUs.
    Public replacement: ``ray.util.placement_group_table()`` lacks the creator fields;
    ``ray.util.state.list_placement_groups`` needs the dashboard."""
    from ray import ActorID

    state = load("ray._private.state:state")
    gcs_pb2 = load("ray.core.generated.gcs_pb2")
    removed = gcs_pb2.PlacementGroupTableData.REMOVED
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        creator = bytes(pg.creator_actor_id) if pg.creator_actor_id and not ActorID(pg.creator_actor_id).is_nil() else b""
        out.append(PlacementGroupRecord(
            placement_group_id=bytes(pg.placement_group_id), removed=pg.state == removed, detached=pg.is_detached,
            creator_job_hex=pg.creator_job_id.hex(), creator_actor_id=creator, creator_actor_dead=pg.creator_actor_dead,
        ))
    return out


@_uses("ray._private.worker:_global_node")
def logs_dir() -> str | None:
    """This process's Ray session logs folder, or None outside a Ray worker/driver.

    Why: off Linux a Train worker finds its own stderr log there by pid (worker-*-<pid>.err) to name
    it in a failure line (on Linux /proc/self/fd/2 is read first).
    Public replacement: none; ``ray.get_runtime_context()`` has no log path."""
    node = load("ray._private.worker:_global_node")
    return None if node is None else str(node.get_logs_dir_path())


# --- Ray Train -------------------------------------------------------------------------------

_TRAIN_CB = "ray.train.v2._internal.callbacks"


def _probe_trainer() -> None:
    from ray.train.torch import TorchTrainer

    if not callable(getattr(TorchTrainer, "_create_default_callbacks", None)):
        raise AttributeError("TorchTrainer._create_default_callbacks")


@_uses(
    f"{_TRAIN_CB}.datasets:DatasetsCallback",
    f"{_TRAIN_CB}.placement_group_callback:PlacementGroupCleanerCallback",
    "ray.train.torch:TorchTrainer._create_default_callbacks",
    probe=_probe_trainer,
)
@functools.cache
def lean_torch_trainer_class() -> type:
    """``TorchTrainer`` that starts no Ray Data ``DatasetManager`` actor when it has no datasets and,
    with ``pg_cleaner=False``, no placement-group cleaner (see orchestrator.train.trainer for why).

    Why: both helper actors cost 1-2 CPU-seconds of start-up per run and do nothing for difflm
    (it feeds workers from its own token cache; a private Ray dies with its driver).
    Public replacement: a ``RunConfig``/``TorchTrainer`` option to leave default callbacks out.
    Overrides the private ``_create_default_callbacks`` and names two ``_internal`` callback classes."""
    from ray.train.torch import TorchTrainer

    datasets_cb = load(f"{_TRAIN_CB}.datasets:DatasetsCallback")
    cleaner_cb = load(f"{_TRAIN_CB}.placement_group_callback:PlacementGroupCleanerCallback")

    class _Lean(TorchTrainer):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, pg_cleaner: bool = True, **kwargs: Any) -> None:
            self.pg_cleaner = pg_cleaner
            super().__init__(*args, **kwargs)

        def _create_default_callbacks(self) -> list[Any]:
            drop: tuple[type, ...] = () if self.datasets else (datasets_cb,)
            if not self.pg_cleaner:
                drop += (cleaner_cb,)
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, drop)]

    _Lean.__name__ = _Lean.__qualname__ = "LeanTorchTrainer"
    return _Lean


def _probe_health_check() -> None:
    cls = load("ray.train.v2._internal.exceptions:WorkerHealthCheckFailedError")
    cause = ValueError("x")
    if getattr(cls("m", cause), "health_check_failure", None) is not cause:
        raise AttributeError("WorkerHealthCheckFailedError.health_check_failure")


@_uses("ray.train.v2._internal.exceptions:WorkerHealthCheckFailedError", probe=_probe_health_check)
def health_check_failure(exc: BaseException) -> BaseException | None:
    """The exception inside Ray Train's ``WorkerHealthCheckFailedError`` (e.g. the worker actor died), else None.

    Why: a dead worker surfaces wrapped in that error; difflm reports "died" for it instead of its
    600-character message (orchestrator.train.failures).
    Public replacement: the error class exported from ``ray.train`` with its cause as ``__cause__``."""
    cls = load("ray.train.v2._internal.exceptions:WorkerHealthCheckFailedError")
    return exc.health_check_failure if isinstance(exc, cls) else None  # type: ignore[attr-defined, no-any-return]


# --- Ray Tune --------------------------------------------------------------------------------


def _probe_tuner() -> None:
    import tempfile

    from ray import tune

    with tempfile.TemporaryDirectory() as d:
        tuner = tune.Tuner(lambda cfg: None, run_config=tune.RunConfig(storage_path=d, name="probe"))
        tuner_run_config(tuner)


@_uses("ray.tune.impl.tuner_internal:TunerInternal.get_run_config", probe=_probe_tuner)
def tuner_run_config(tuner: Any) -> Any:
    """The live ``RunConfig`` of a (restored) ``Tuner``; setting its ``callbacks`` takes effect on ``fit()``.

    Why: ``Tuner.restore`` unpickles the first session's callbacks (its console table, bound to
    that driver); a resumed sweep must draw with its own (orchestrator.sweep.driver).
    Public replacement: a ``run_config``/``callbacks`` argument of ``Tuner.restore``."""
    return tuner._local_tuner.get_run_config()


def _probe_asha() -> None:
    from ray.tune.schedulers import AsyncHyperBandScheduler

    sched = AsyncHyperBandScheduler(metric="m", mode="min", time_attr="t", max_t=8, grace_period=1)
    asha_metric(sched)
    asha_rungs(sched)
    asha_limits(sched)
    if not isinstance(sched._trial_info, dict):
        raise AttributeError("AsyncHyperBandScheduler._trial_info")


@_uses("ray.tune.schedulers:AsyncHyperBandScheduler", probe=_probe_asha)
def asha_bracket(scheduler: Any, trial_id: str) -> Any:
    """The ASHA bracket a trial was assigned to (``on_result(trial, t, value)`` records a report).

    Why: Tune does not save the scheduler's rungs; difflm's ResumableASHA replays each restored
    trial's reports into its bracket (orchestrator.sweep.schedulers; ray-project/ray#30838).
    Public replacement: Tune checkpointing the scheduler with the experiment."""
    return scheduler._trial_info[trial_id]


@_uses("ray.tune.schedulers:AsyncHyperBandScheduler", probe=_probe_asha)
def asha_metric(scheduler: Any) -> tuple[str, str, float]:
    """(time attribute, metric, sign) of an ASHA scheduler: rungs hold ``sign * value`` (sign -1 for mode=min).

    Why: replaying reports (see :func:`asha_bracket`) needs the values the scheduler itself records.
    Public replacement: as for :func:`asha_bracket`."""
    return scheduler._time_attr, scheduler._metric, scheduler._metric_op


@_uses("ray.tune.schedulers:AsyncHyperBandScheduler", probe=_probe_asha)
def asha_limits(scheduler: Any) -> tuple[float, bool]:
    """(max_t, stop_last_trials) of an ASHA scheduler.

    Why: with ``sweep.seeds > 1`` ResumableASHA decides a configuration's stops itself (its seeds
    together, orchestrator.sweep.schedulers.GroupRungs) and must end a trial at ``max_t`` exactly as
    ASHA's own ``on_trial_result`` would. Public replacement: an ASHA that can judge groups of trials."""
    return scheduler._max_t, scheduler._stop_last_trials


@_uses("ray.tune.schedulers:AsyncHyperBandScheduler", probe=_probe_asha)
def asha_rungs(scheduler: Any) -> list[tuple[float, dict[str, float]]]:
    """(milestone, {trial id: recorded value, as stored}) per rung of the first bracket, highest milestone first.

    Why: the sweep tests and the resume message compare rungs before and after a restore.
    Public replacement: as for :func:`asha_bracket`."""
    return [(m, dict(rec)) for m, rec in scheduler._brackets[0]._rungs]


# --- Tune's saved experiment state -----------------------------------------------------------

_EXPERIMENT_STATE = "ray.tune.execution.experiment_state"


@_uses(f"{_EXPERIMENT_STATE}:_find_newest_experiment_checkpoint")
def saved_trial_count(experiment_dir: str) -> int | None:
    """How many trials Tune's newest experiment state in ``experiment_dir`` lists (None: no state file).

    Why: Tune saves its experiment state once as it starts (before any trial exists) and then at most
    every ~10 s. A sweep killed in between leaves a state with no trials beside a search-algorithm
    state that has already handed out the first configuration; ``Tuner.restore`` of that runs one
    trial with an empty config and never the grid (seen on the 2-node cluster test). The sweep
    driver starts such a sweep afresh instead (orchestrator.sweep.driver).
    Public replacement: ``Tuner.can_restore`` telling a restorable state from an empty one."""
    import json

    path = load(f"{_EXPERIMENT_STATE}:_find_newest_experiment_checkpoint")(experiment_dir)
    if path is None:
        return None
    try:
        with open(path) as f:
            return len(json.load(f)["trial_data"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
