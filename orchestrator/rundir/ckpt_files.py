"""Checkpoint folders on disk: manifests, verification, fallback on resume, best/last links.

Every rank writes its files into a private temporary folder, then ``ray.train.report`` copies
them into ``RUN_DIR/checkpoint_<step>/``. That copy is not atomic, and a checkpoint can be cut
short (a killed worker, a full disk) or damaged later. So each rank also writes
``manifest/rank<r>.json`` listing its files with size and SHA-256; a checkpoint is usable only
when every rank's manifest is there and every file matches. Resuming walks the checkpoints
newest first and takes the first that verifies, saying why it skipped the others.

Retention: Ray keeps the ``train.keep_checkpoints`` most recent checkpoints (scored by
``checkpoint_time``); the best by val/nll survives as ``RUN_DIR/checkpoints/best``, a copy made
of hard links (no extra disk where the filesystem has them). ``checkpoints/last`` points at the
latest. Rank 0 updates both right after each checkpoint, so they are current even if the
driver dies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from difflm.atomic import atomic_symlink, atomic_write_text
from orchestrator.errors import SpecError

MANIFEST_DIR = "manifest"
TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"


class CorruptCheckpointError(SpecError):
    """A checkpoint folder that is incomplete, truncated or altered; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, rank: int, world_size: int, step: int) -> None:
    """List every file this rank wrote under ``directory`` (size + SHA-256); written last, atomically."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel.startswith(f"{MANIFEST_DIR}/"):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"rank": rank, "world_size": world_size, "step": step, "files": files}
    atomic_write_text(directory / MANIFEST_DIR / f"rank{rank}.json", json.dumps(manifest, indent=1))


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    world_size: int
    verified: bool  # False: written before difflm kept manifests (only its JSON and weights header checked)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    f = directory / TRAINER_STATE
    if not f.is_file():
        raise CorruptCheckpointError(f"{f}: missing; {directory.name} is not a complete difflm checkpoint")
    try:
        state = json.loads(f.read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{f}: unreadable ({type(exc).__name__}: {exc}); truncated or corrupted") from None
    return state


def verify_checkpoint(directory: Path) -> CheckpointInfo:
    """Check a checkpoint folder against its manifests; CorruptCheckpointError naming the first bad file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CorruptCheckpointError(f"{directory}: no such checkpoint folder")
    state = read_trainer_state(directory)
    step = int(state["step"])
    world_size = int(state.get("world_size", 1))
    manifests = directory / MANIFEST_DIR
    if not manifests.is_dir():
        # A checkpoint from before manifests: check what can be checked without one.
        _check_safetensors_header(directory / WEIGHTS)
        return CheckpointInfo(directory, step, world_size, verified=False)
    for rank in range(world_size):
        mf = manifests / f"rank{rank}.json"
        if not mf.is_file():
            raise CorruptCheckpointError(
                f"{mf}: missing; the checkpoint is incomplete (rank {rank} of {world_size} never finished writing)"
            )
        try:
            files = json.loads(mf.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            raise CorruptCheckpointError(f"{mf}: unreadable; truncated or corrupted") from None
        for rel, meta in files.items():
            f = directory / rel
            if not f.is_file():
                raise CorruptCheckpointError(f"{f}: missing (listed in {mf.name})")
            size = f.stat().st_size
            if size != meta["size"]:
                raise CorruptCheckpointError(
                    f"{f}: {size:,} bytes where rank {rank} wrote {meta['size']:,}; truncated or corrupted"
                )
            if _sha256(f) != meta["sha256"]:
                raise CorruptCheckpointError(f"{f}: contents differ from what rank {rank} wrote (SHA-256); corrupted")
    return CheckpointInfo(directory, step, world_size, verified=True)


def _check_safetensors_header(path: Path) -> None:
    if not path.is_file():
        raise CorruptCheckpointError(f"{path}: missing")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptCheckpointError(f"{path}: unreadable ({exc}); truncated or corrupted") from None


def _step_of(directory: Path) -> int:
    try:
        return int(json.loads((directory / TRAINER_STATE).read_text())["step"])
    except Exception:
        return -1


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest step first (ties: newest folder first)."""
    dirs = [d for d in run_dir.glob("checkpoint_*") if d.is_dir()]
    return sorted(dirs, key=lambda d: (_step_of(d), d.stat().st_mtime), reverse=True)


def pick_resume_checkpoint(
    run_dir: Path, preferred: Path | None, log: Callable[[str], None]
) -> CheckpointInfo | None:
    """The newest checkpoint of ``run_dir`` that verifies, trying ``preferred`` (Ray's latest) first.

    Only folders inside ``run_dir`` are considered: DeepSpeed's own files are pickles, so a run
    resumes only from checkpoints it wrote itself. Each skipped checkpoint is logged with the reason.
    """
    run_dir = run_dir.resolve()
    candidates: list[Path] = []
    if preferred is not None:
        p = Path(preferred).resolve()
        if not p.is_relative_to(run_dir):
            raise SpecError(f"{p}: refusing to resume from a checkpoint outside the run folder {run_dir}")
        candidates.append(p)
    candidates += [d.resolve() for d in checkpoint_dirs(run_dir) if d.resolve() not in candidates]
    best = run_dir / "checkpoints" / "best"
    if best.exists() and best.resolve() not in candidates and best.resolve().is_relative_to(run_dir):
        candidates.append(best.resolve())  # last resort: the hard-linked copy of the best one
    failures: list[str] = []
    for c in candidates:
        try:
            info = verify_checkpoint(c)
        except CorruptCheckpointError as exc:
            failures.append(str(exc))
            log(f"checkpoint {c.name} unusable: {exc}; trying the previous one")
            continue
        return info
    if failures:
        raise CorruptCheckpointError(f"no usable checkpoint in {run_dir}: " + " | ".join(failures))
    return None


def checkpoint_dir_name(run_dir: Path, step: int) -> str:
    """``checkpoint_<step>``, with ``-2``, ``-3``... when that step was checkpointed before (a resume that
    fell back to an older checkpoint reaches it again; the damaged folder is kept for inspection)."""
    base = f"checkpoint_{step:08d}"
    name, k = base, 1
    while (run_dir / name).exists():
        k += 1
        name = f"{base}-{k}"
    return name


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Recreate ``src`` at ``dst`` with hard links (free, and immune to Ray deleting ``src``); copy where
    the filesystem refuses links."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _ray_kept(run_dir: Path) -> set[str] | None:
    """The checkpoint folder names Ray's run snapshot references (None: unreadable, so touch nothing)."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        names = {r["checkpoint_dir_name"] for r in snap["checkpoint_results"]}
        latest = snap.get("latest_checkpoint_result")
        if latest:
            names.add(latest["checkpoint_dir_name"])
        return names
    except Exception:
        return None


def prune_orphans(run_dir: Path) -> list[Path]:
    """Delete checkpoint folders Ray does not know that are older than every checkpoint it keeps.

    Ray deletes the checkpoints it retires itself; an orphan is a folder whose ``ray.train.report``
    never completed (a worker killed while saving). Folders Ray references are never touched, so
    its run snapshot stays valid for ``difflm resume``; and only folders older than all of them go,
    so a checkpoint Ray has not registered yet (its controller polls) is safe. Returns what was removed.
    """
    kept = _ray_kept(run_dir)
    if not kept:
        return []
    oldest_kept = min(_step_of(run_dir / name) for name in kept)
    removed = []
    for d in checkpoint_dirs(run_dir):
        if d.name not in kept and _step_of(d) < oldest_kept:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def update_links(run_dir: Path, checkpoint: Path, is_best: bool) -> None:
    """``checkpoints/last`` -> ``checkpoint``; when it is the best so far, refresh ``checkpoints/best``.

    Each link is replaced atomically; the new best copy is complete before the link moves to it,
    and the previous copy is removed after.
    """
    links = run_dir / "checkpoints"
    links.mkdir(parents=True, exist_ok=True)
    atomic_symlink(checkpoint, links / "last")
    if not is_best:
        return
    copy = links / f"best-{checkpoint.name}"
    if copy.exists():
        shutil.rmtree(copy)
    tmp = links / f".tmp-best-{checkpoint.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    _link_or_copy_tree(checkpoint, tmp)
    os.replace(tmp, copy)
    atomic_symlink(copy, links / "best")
    for old in links.glob("best-*"):
        if old != copy and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
