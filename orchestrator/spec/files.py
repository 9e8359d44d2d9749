"""File dispatch for `difflm validate` and `difflm schema`: run specs, sweep files, scaling profiles, Ray cluster configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.errors import SpecError
from orchestrator.spec.yamlio import read_yaml


def validate_file(path: Path, overrides: list[str], defaults: dict[str, Any] | None = None) -> str:
    """Validate one file; return its kind; SpecError on any problem.

    Kinds: "run" and "sweep" specs (``defaults``: a profile's fields under them), "profile" (a difflm
    scaling profile, ``clusters/*.yaml``), "Ray cluster-launcher" (checked with Ray's own schema).
    """
    from orchestrator.cluster.profile import PROFILE_KEY, is_ray_launcher_config

    raw = read_yaml(path)
    if is_ray_launcher_config(raw):
        from orchestrator.cluster.nodes import check_launcher_config

        check_launcher_config(raw, str(path))
        return "Ray cluster-launcher"
    if PROFILE_KEY in raw:
        from orchestrator.cluster.profile import load_profile

        load_profile(str(path))
        return "profile"
    if "sweep" in raw:
        from orchestrator.sweep.spec import load_sweep_file

        load_sweep_file(str(path), overrides, defaults=defaults)
        return "sweep"
    from orchestrator.spec.run import load_run_spec

    load_run_spec(path, overrides, defaults=defaults)
    return "run"


def json_schema(sweep: bool = False) -> dict[str, Any]:
    if sweep:
        from orchestrator.sweep.spec import SweepFile

        return SweepFile.model_json_schema()
    from orchestrator.spec.run import RunSpec

    return RunSpec.model_json_schema()


__all__ = ["validate_file", "json_schema", "SpecError"]
