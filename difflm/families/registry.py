"""Registry of model families: name -> FamilySpec (builder + allowed schedules).

Adding a family is one ``register_family`` call in its module; the trainer, the spec
validation and the CLI discover it here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from difflm.families.base import Family
    from difflm.families.config import DiffusionConfig
    from difflm.models.config import ModelConfig


@dataclass(frozen=True)
class FamilySpec:
    """How to build one family.

    build(model_cfg, diffusion_cfg, vocab_size) -> Family. ``vocab_size`` is the
    tokenizer's; families that need extra tokens (mdlm's mask) add them themselves.
    schedules: the noise schedule names this family accepts (empty: it has none).
    """

    name: str
    build: "Callable[[ModelConfig, DiffusionConfig, int], Family]"
    schedules: tuple[str, ...]
    description: str


_REGISTRY: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"family {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    # Importing the package registers the built-in families.
    import difflm.families  # noqa: F401


def family_names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_family(name: str) -> FamilySpec:
    """The spec of family ``name``; a KeyError that names the closest valid one otherwise."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown family {name!r}; choose one of {', '.join(sorted(_REGISTRY))}.{hint}") from None
