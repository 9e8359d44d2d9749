"""`difflm cluster status`: a cluster's nodes, their resources, and what each runs for difflm.

Read from Ray itself: nodes and their total/available resources from the GCS, live actors
and jobs from Ray's state API (served by the head's dashboard). A driver's Ray job records
its command line, so each actor maps to a command (``difflm sweep sweeps/quickstart.yaml``)
and, per node, the counts say what of it runs where (2 train workers, 2 sweep trials). Private instances of difflm on this machine (and stale
ones) are listed from their folders (``private.py``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

#: the Ray actors that do difflm's work, by what a user calls them; the rest (Train's controller,
#: synchronisation and clean-up actors, the console queue) are counted as helpers
ROLES = {"RayTrainWorker": "train worker", "ImplicitFunc": "sweep trial"}
HELPER = "Ray helper"


@dataclass
class NodeView:
    node_id: str
    ip: str
    is_head: bool
    total: dict[str, float]
    available: dict[str, float] | None
    #: difflm command -> role -> count
    work: dict[str, Counter[str]] = field(default_factory=dict)


def job_label(entrypoint: str | None) -> str:
    """``difflm sweep X`` for a difflm driver (console script or ``python -m orchestrator``), else the command."""
    words = (entrypoint or "").split()
    for i, w in enumerate(words):
        if Path(w).name == "difflm" or (w == "orchestrator" and i > 0 and words[i - 1] == "-m"):
            return " ".join(["difflm", *words[i + 1 :]])
    text = " ".join(words)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} (not difflm)" if text else "unknown job (not difflm)"


def gather() -> tuple[list[NodeView], str | None]:
    """The connected cluster's alive nodes with what runs on them; second value: why work is unknown, if it is."""
    import ray

    try:
        from orchestrator.raycompat import available_resources_per_node

        available: dict[str, dict[str, float]] | None = available_resources_per_node()
    except Exception:  # a private API: totals are still shown
        available = None
    views = {
        n["NodeID"]: NodeView(
            node_id=n["NodeID"],
            ip=n.get("NodeManagerAddress", "?"),
            is_head="node:__internal_head__" in n.get("Resources", {}),
            total=dict(n.get("Resources", {})),
            available=(available or {}).get(n["NodeID"]) if available is not None else None,
        )
        for n in ray.nodes()
        if n.get("Alive")
    }
    try:
        from ray.util.state import list_actors, list_jobs

        gcs = ray.get_runtime_context().gcs_address  # never "the" local instance: there may be several
        jobs = {j.job_id: j for j in list_jobs(address=gcs, raise_on_missing_output=False) if j.job_id}
        actors = list_actors(
            address=gcs, filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False
        )
    except Exception as exc:
        return list(views.values()), (
            f"what runs where is unknown: Ray's state API did not answer ({type(exc).__name__}); it is served by the "
            "head's dashboard, which `difflm cluster up` binds to 127.0.0.1: run this on the head"
        )
    work: dict[str, dict[str, Counter[str]]] = defaultdict(dict)
    for a in actors:
        if a.node_id not in views:
            continue
        job = jobs.get(a.job_id)
        if job is not None and str(job.status).rsplit(".", 1)[-1] not in ("RUNNING", "PENDING"):
            continue  # a detached helper of a finished job (Ray Train leaves one): not work
        label = job_label(job.entrypoint if job else None)
        role = ROLES.get(a.class_name, HELPER)
        work[a.node_id].setdefault(label, Counter())[role] += 1
    for node_id, per_job in work.items():
        views[node_id].work = per_job
    return sorted(views.values(), key=lambda v: (not v.is_head, v.node_id)), None


def _res(view: NodeView, key: str) -> str:
    total = view.total.get(key, 0.0)
    if view.available is None:
        return f"{total:g}"
    return f"{total - view.available.get(key, 0.0):g}/{total:g}"


def render(views: list[NodeView], note: str | None, address: str) -> str:
    """Plain text: one block per node (id, IP, CPU and GPU in use/total, difflm work)."""
    lines = [f"Ray cluster at {address}: {len(views)} node(s)"]
    for v in views:
        lines.append(
            f"  node {v.node_id[:12]}  {v.ip}{'  (head)' if v.is_head else ''}  "
            f"CPU {_res(v, 'CPU')}  GPU {_res(v, 'GPU')}"
        )
        if not v.work:
            lines.append("    idle" if note is None else "    ?")
        for label, roles in sorted(v.work.items()):
            shown = [r for r in ROLES.values() if r in roles] + [r for r in sorted(roles) if r not in ROLES.values()]
            what = ", ".join(f"{roles[r]} {r}{'s' if roles[r] > 1 else ''}" for r in shown)
            lines.append(f"    {label}: {what}")
    if note:
        lines.append(note)
    return "\n".join(lines)


def render_private() -> str | None:
    """This machine's private difflm Ray instances (live and stale), or None when there are none."""
    from orchestrator.cluster.private import is_stale, list_instances
    from orchestrator.cluster.procs import processes_under

    lines = []
    for inst in list_instances():
        n = len(processes_under(inst.temp_dir))
        if is_stale(inst):
            state = f"STALE: its driver is gone, {n} process(es) left (the next difflm start or `difflm cluster down` stops them)"
        else:
            state = f"driver pid {inst.owner.get('pid')} running, {n} process(es)"
        lines.append(f"  {inst.command}  (since {inst.started}; {state})")
    if not lines:
        return None
    return "\n".join(["private Ray instances of difflm on this machine:", *lines])
