"""After a node is lost mid-sweep: free the resources the dead trials' Train runs still hold.

Each trial's ``TorchTrainer`` has a controller actor that reserves its workers' CPUs/GPUs in a
placement group. Ray removes a placement group only when its creator's *job* ends (here: the
sweep driver, still running), so Ray Train V2 starts a detached ``PlacementGroupCleaner``
actor per run that removes the group once the controller dies. When a node is lost, the
cleaner can be on it too: then the group outlives its controller, keeps a surviving node's
CPUs (and the orphaned workers on them), and the trial Tune retries waits for those CPUs
forever. Measured on a 2-node loopback cluster (Ray 2.60): the sweep hung with a 0.99-CPU
group of a dead controller on the surviving node.

:class:`ReleaseOrphanedPlacementGroups` (a Tune callback on the sweep driver) removes, after
a trial errors, is retried or ends, every placement group of the sweep's own Ray job whose
creating actor is dead, exactly what the lost cleaner would have done. It asks the GCS
directly, so it also works where the cleaner's state-API calls cannot reach the head's
dashboard (bound to 127.0.0.1 by `difflm cluster up`). Groups created by
the driver itself (Tune's trial groups), by live actors, detached groups and other jobs'
groups are never touched.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback


def orphaned_placement_groups(job_id_hex: str) -> list[bytes]:
    """Ids of the job's live placement groups whose creating actor is dead."""
    from orchestrator.raycompat import placement_groups

    out = []
    for pg in placement_groups():
        if pg.removed or pg.detached or pg.creator_job_hex != job_id_hex:
            continue
        if not pg.creator_actor_id:
            continue  # made by the driver (Tune's trial groups): its creator is alive
        if pg.creator_actor_dead:
            out.append(pg.placement_group_id)
    return out


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor is dead; return how many."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    n = 0
    for pg_id in orphaned_placement_groups(ray.get_runtime_context().get_job_id()):
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg_id)))
            n += 1
        except Exception:  # removed meanwhile (by Ray Train's own cleaner)
            continue
    return n


class ReleaseOrphanedPlacementGroups(Callback):
    """Tune callback: after a trial fails (e.g. its node was lost), free what its dead Train run still holds.

    Checks at the failure and then every ``every_s`` for ``window_s``: actors owned by a dead
    actor die a moment later, so their groups become orphans after the trial's error arrived.
    Trials that end (ASHA stops them too) start the same window: normally Ray Train's own
    cleaner frees a stopped trial's group, and this only repeats what it would do.
    """

    def __init__(self, every_s: float = 5.0, window_s: float = 120.0) -> None:
        self.every_s, self.window_s = every_s, window_s
        self._until = self._last = 0.0

    def _check(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or (now < self._until and now - self._last >= self.every_s):
            self._last = now
            release_orphaned_placement_groups()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._until = time.monotonic() + self.window_s
        self._check(force=True)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.on_trial_error(iteration, trials, trial, **info)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        # A trial ASHA stopped: Tune kills its actor, and its Train controller with it, a moment later.
        self._until = time.monotonic() + self.window_s

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._check()
