"""orchestrator.raycompat: every private Ray name difflm uses resolves on the installed Ray, and none
is used anywhere else in orchestrator/ (so a Ray upgrade is one module to read)."""

from __future__ import annotations

import inspect
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
