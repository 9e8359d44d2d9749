"""What a run folder already holds, checked on the driver before Ray starts: fresh start vs explicit resume.

Ray Train V2 restores any run whose name and storage path repeat. difflm makes that explicit:
``difflm train SPEC`` into a folder that holds a run exits 2 naming both ways out, and a resume
(``difflm resume RUN_DIR`` or ``difflm train SPEC --resume``) refuses a spec that differs from the
saved one in anything but the step budget, cadence and locations unless told
(``--allow-spec-change``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from difflm.atomic import atomic_write_text
from orchestrator.errors import SpecError

#: spec fields a resumed run may change without --allow-spec-change: how long, how often, where.
#: (train.max_steps also stretches the cosine LR schedule from the resumed step on.)
RESUME_FREE = frozenset({
    "train.max_steps", "train.eval_every", "train.checkpoint_every", "train.log_every", "train.num_samples",
    "train.keep_checkpoints", "scaling.max_failures", "output.dir", "output.name", "output.tensorboard",
    "data.cache_dir",
})
#: Fields the driver resolves for the machine at launch and records resolved in spec.yaml: "auto" in the
#: spec of a resume matches whatever the run recorded (and is resolved again for this machine).
RESOLVED_AT_LAUNCH = frozenset({"train.precision", "scaling.cpus_per_worker"})
STOP_FILE = "stopped.json"
SWEEP_STATE = "difflm_sweep.json"  # what makes a folder a sweep folder (orchestrator.sweep.driver writes it)
SPEC_FILE = "spec.yaml"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` has a saved spec, a checkpoint or Ray's run state (what Ray would restore)."""
    return (run_dir / SPEC_FILE).is_file() or (run_dir / RAY_SNAPSHOT).exists() or any(run_dir.glob("checkpoint_*"))


def latest_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint whose trainer_state.json reads (None: no checkpoint yet)."""
    from orchestrator.rundir.ckpt_files import checkpoint_dirs

    for d in checkpoint_dirs(run_dir):
        try:
            return int(json.loads((d / "trainer_state.json").read_text())["step"])
        except Exception:
            continue
    return None


def describe_run(run_dir: Path) -> str:
    """``"checkpointed at step 30 of 30, finished"``-style summary of the latest checkpoint, for messages."""
    steps = latest_step(run_dir)
    total = None
    try:
        import yaml

        total = int(yaml.safe_load((run_dir / SPEC_FILE).read_text())["train"]["max_steps"])
    except Exception:
        pass
    if steps is None:
        return "no checkpoint yet"
    done = ", finished" if total is not None and steps >= total else ""
    return f"checkpointed at step {steps}" + (f" of {total}" if total is not None else "") + done


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


def spec_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``path: old -> new`` for every differing field outside RESUME_FREE."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for path in sorted(set(a) | set(b)):
        if path in RESUME_FREE or a.get(path) == b.get(path):
            continue
        if path in RESOLVED_AT_LAUNCH and b.get(path) == "auto":
            continue
        diffs.append(f"{path}: {a.get(path)!r} -> {b.get(path)!r}")
    return diffs


def check_run_folder(run_dir: Path, spec_dump: dict[str, Any], *, resume: bool, allow_spec_change: bool) -> None:
    """SpecError (exit 2, before Ray) for a fresh start over an existing run, a resume with nothing to
    resume, or a resume whose spec changed beyond RESUME_FREE without ``allow_spec_change``."""
    exists = run_dir.is_dir() and holds_run(run_dir)
    if exists and not resume:
        raise SpecError(
            f"{run_dir} already holds a run ({describe_run(run_dir)}); continue it with `difflm resume {run_dir}` "
            "(or `difflm train SPEC --resume`), or start a new run with --name NEW_NAME"
        )
    if not resume:
        return
    if not exists:
        raise SpecError(f"nothing to resume: {run_dir} holds no run; start it without --resume")
    saved_file = run_dir / SPEC_FILE
    if saved_file.is_file():  # (a run that died before writing its spec has nothing to compare with)
        import yaml

        saved = yaml.safe_load(saved_file.read_text()) or {}
        diffs = spec_differences(saved, spec_dump)
        if diffs and not allow_spec_change:
            raise SpecError(
                f"{run_dir}: the spec differs from the run's {SPEC_FILE} in {'; '.join(diffs)}. Resuming changes "
                f"only {', '.join(sorted(p for p in RESUME_FREE if p.startswith('train.')))} freely; pass "
                "--allow-spec-change to resume with the new values anyway, or drop the changes"
            )
    step, max_steps = latest_step(run_dir), int(spec_dump["train"]["max_steps"])
    if step is not None and step >= max_steps:
        raise SpecError(
            f"{run_dir} is checkpointed at step {step} and train.max_steps is {max_steps}: nothing to train; "
            f"to train it longer: `difflm resume {run_dir} --set train.max_steps=N` with N > {step}"
        )


def write_stop(run_dir: Path, reason: str, step: int) -> None:
    atomic_write_text(run_dir / STOP_FILE, json.dumps({"reason": reason, "step": step}, indent=2))


def read_stop(run_dir: Path) -> dict[str, Any] | None:
    f = run_dir / STOP_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return {"reason": f"{f} is unreadable", "step": None}
