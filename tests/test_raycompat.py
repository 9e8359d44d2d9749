"""orchestrator.raycompat: every private Ray name difflm uses resolves on the installed Ray, and none
is used anywhere else in orchestrator/ (so a Ray upgrade is one module to read)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from orchestrator import raycompat

ORCH = Path(__file__).resolve().parents[1] / "orchestrator"

#: Private or unstable Ray names: private modules, underscore attributes difflm reads on Ray objects.
PRIVATE = re.compile(
    r"ray\._private|ray\._raylet|\._internal\b|autoscaler\._private|_local_tuner|_global_node|_trial_info"
    r"|\._brackets|\._rungs|_metric_op|_time_attr|_create_default_callbacks|gcs_pb2|print_to_stdstream"
    r"|(?<!raycompat)\.health_check_failure|['\"]health_check_failure|ray\.train\.v2\."
)
HELPERS = {"load", "missing_names"}


def test_every_private_ray_name_resolves_on_this_ray() -> None:
    missing = raycompat.missing_names()
    assert not missing, "Ray private names gone:\n" + "\n".join(missing)
    assert len(raycompat.ITEMS) >= 14


def test_a_removed_name_is_reported_by_item(monkeypatch: pytest.MonkeyPatch) -> None:
    item = raycompat.ITEMS["canonicalize_bootstrap_address"]
    monkeypatch.setitem(
        raycompat.ITEMS, item.name, raycompat.Item(item.name, ("ray._private.services:no_such_function",))
    )
    (line,) = raycompat.missing_names()
    assert line.startswith("orchestrator.raycompat.canonicalize_bootstrap_address: Ray ")
    assert "ray._private.services:no_such_function" in line
    assert "public replacement: none; a timeout argument for ``ray.init(address=...)``" in line


def test_every_item_says_why_and_what_replaces_it() -> None:
    functions = {
        n for n, f in vars(raycompat).items()
        if callable(f) and not isinstance(f, type) and getattr(f, "__module__", "") == raycompat.__name__
        and not n.startswith("_")
    }
    assert functions - HELPERS == set(raycompat.ITEMS), "every public function of raycompat is an item"
    for name in raycompat.ITEMS:
        doc = inspect.getdoc(getattr(raycompat, name)) or ""
        assert "Why:" in doc and "Public replacement:" in doc, name


def test_no_private_ray_name_outside_the_adapter() -> None:
    found = [
        f"{f.relative_to(ORCH.parent)}:{i}: {line.strip()}"
        for f in sorted(ORCH.rglob("*.py"))
        if f.name != "raycompat.py"
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not found, "use orchestrator.raycompat for these:\n" + "\n".join(found)


def test_a_sweep_killed_before_tune_saved_a_trial_is_started_afresh(tmp_path: Path) -> None:
    """Tune's first experiment state lists no trial; restoring it ran one trial with an empty config
    (CI, 2026-12-06). saved_trial_count tells that state apart, and the driver sets it aside."""
    from orchestrator.sweep.driver import STATE_FILE, UNSAVED_DIR, _set_aside_unsaved

    assert raycompat.saved_trial_count(str(tmp_path)) is None
    (tmp_path / "experiment_state-2026-12-06_07-11-18.json").write_text(json.dumps({"trial_data": [], "stats": {}}))
    assert raycompat.saved_trial_count(str(tmp_path)) == 0
    (tmp_path / "experiment_state-2026-12-06_07-12-00.json").write_text(json.dumps({"trial_data": [["{}", "{}"]]}))
    assert raycompat.saved_trial_count(str(tmp_path)) == 1  # the newest state is the one Tune restores
    for name in (STATE_FILE, "sweep.yaml", "tuner.pkl"):
        (tmp_path / name).write_text("x")
    (tmp_path / "abc_00000-lr=0.003").mkdir()
    _set_aside_unsaved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([STATE_FILE, "sweep.yaml", UNSAVED_DIR])
    assert (tmp_path / UNSAVED_DIR / "abc_00000-lr=0.003").is_dir()
    assert raycompat.saved_trial_count(str(tmp_path)) is None
