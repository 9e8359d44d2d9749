"""Scaling profiles: one machine's defaults for how a run scales, applied under a spec.

A profile is a difflm file in ``clusters/`` (not a Ray cluster-launcher config, which also
lives there): what a machine needs to run any spec well, e.g. the 6-GPU workstation's
six bf16 ZeRO-2 workers with 4 sequences each. ``--profile NAME|PATH`` on ``difflm train``
and ``difflm sweep`` applies it with this precedence (later wins)::

    RunSpec defaults  <  profile  <  the spec file  <  --set / --output / --name

so a spec that says ``scaling.num_workers: 2`` keeps 2 under any profile. The profile's
sections are the run spec's own models (same fields, bounds and descriptions); only the
fields a profile file sets are applied, and only the fields about *where and how big*
(scaling, batch split, precision, shared paths) are allowed: a profile never changes what
a run trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from difflm._config import StrictModel
from difflm.data.config import DataConfig
from orchestrator.errors import SpecError
from orchestrator.spec.run import OutputConfig, RunSpec, ScalingConfig, TrainConfig
from orchestrator.spec.yamlio import read_yaml, validate_as

#: sections and fields a profile may set (everything else is the spec's business)
ALLOWED: dict[str, tuple[str, ...] | None] = {
    "scaling": None,  # all of it
    "train": ("micro_batch_size", "grad_accum", "precision"),
    "data": ("cache_dir",),
    "output": ("dir",),
}
#: keys that mark a Ray cluster-launcher config (``ray up``) rather than a profile
RAY_LAUNCHER_KEYS = ("cluster_name", "provider", "head_start_ray_commands")
#: the key every profile has and no run spec has
PROFILE_KEY = "description"


class Profile(StrictModel):
    """A difflm scaling profile (``clusters/<name>.yaml``)."""

    description: str = Field(..., min_length=1, description="The machine this profile is for, in a sentence.")
    scaling: ScalingConfig | None = Field(None, description="Workers, device, DeepSpeed (any scaling field).")
    train: TrainConfig | None = Field(
        None, description="Only micro_batch_size, grad_accum and precision: how a step is split, not what is trained."
    )
    data: DataConfig | None = Field(None, description="Only cache_dir (a shared path on a multi-node cluster).")
    output: OutputConfig | None = Field(None, description="Only dir (a shared path on a multi-node cluster).")

    @model_validator(mode="after")
    def _only_scaling_fields(self) -> "Profile":
        for section, allowed in ALLOWED.items():
            model = getattr(self, section)
            if model is None or allowed is None:
                continue
            extra = sorted(model.model_fields_set - set(allowed))
            if extra:
                raise ValueError(
                    f"{section}.{extra[0]}: a profile sets how a run scales, not what it trains; "
                    f"allowed in {section}: {', '.join(allowed)} (put the rest in the spec)"
                )
        return self

    def defaults(self) -> dict[str, Any]:
        """The fields this profile sets, as a partial run-spec dict."""
        out: dict[str, Any] = {}
        for section in ALLOWED:
            model = getattr(self, section)
            if model is not None and model.model_fields_set:
                out[section] = model.model_dump(mode="json", include=model.model_fields_set)
        return out


def is_ray_launcher_config(raw: dict[str, Any]) -> bool:
    return any(k in raw for k in RAY_LAUNCHER_KEYS)


def clusters_dirs() -> list[Path]:
    """Where profile names are looked up: ./clusters, then the checkout's clusters/."""
    here = Path.cwd() / "clusters"
    shipped = Path(__file__).resolve().parents[2] / "clusters"
    return [here] if here.resolve() == shipped else [here, shipped]


def profile_names() -> list[str]:
    names: set[str] = set()
    for d in clusters_dirs():
        for f in d.glob("*.yaml"):
            try:
                if not is_ray_launcher_config(read_yaml(f)):
                    names.add(f.stem)
            except SpecError:
                continue
    return sorted(names)


def resolve_profile_path(name_or_path: str) -> Path:
    """A path to a file, or NAME -> clusters/NAME.yaml; SpecError listing the profiles when neither exists."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not p.exists():
            raise SpecError(f"--profile {name_or_path}: file not found")
        return p
    for d in clusters_dirs():
        cand = d / f"{name_or_path}.yaml"
        if cand.exists():
            return cand
    raise SpecError(
        f"--profile {name_or_path}: no such profile; choose one of {', '.join(profile_names()) or '(none found)'} "
        "or give a path to a profile file"
    )


def load_profile(name_or_path: str) -> tuple[Profile, Path]:
    """Read and validate a profile; SpecError (file:line: field: message) on any problem."""
    path = resolve_profile_path(name_or_path)
    raw = read_yaml(path)
    if is_ray_launcher_config(raw):
        raise SpecError(
            f"{path}: this is a Ray cluster-launcher config, not a difflm profile; start that cluster with "
            f"`difflm cluster up --config {path}` and run with --address auto (profiles: {', '.join(profile_names())})"
        )
    profile = validate_as(Profile, raw, source=str(path))
    # Values must also be valid together as a run spec (e.g. fp16 on cpu, mps with 2 workers is checked at launch).
    validate_as(RunSpec, profile.defaults(), source=str(path))
    return profile, path
