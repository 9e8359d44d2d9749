"""Spec-file dispatch for `difflm validate` and `difflm schema`: run specs and sweep files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.errors import SpecError
from orchestrator.spec.yamlio import read_yaml


def validate_file(path: Path, overrides: list[str]) -> str:
    """Validate one file; return its kind ("run" or "sweep"); SpecError on any problem."""
    raw = read_yaml(path)
    if "sweep" in raw:
        from orchestrator.sweep.spec import load_sweep_file

        load_sweep_file(str(path), overrides)
        return "sweep"
    from orchestrator.spec.run import load_run_spec

    load_run_spec(path, overrides)
    return "run"


def json_schema(sweep: bool = False) -> dict[str, Any]:
    if sweep:
        from orchestrator.sweep.spec import SweepFile

        return SweepFile.model_json_schema()
    from orchestrator.spec.run import RunSpec

    return RunSpec.model_json_schema()


__all__ = ["validate_file", "json_schema", "SpecError"]
