"""Registry of model families: name -> FamilySpec (builder + allowed schedules).

Adding a family is one package under ``difflm/families/<name>/`` whose ``__init__`` calls
``register_family``, plus its import in ``difflm/families/__init__.py``; the trainer, the
spec validation and the CLI discover it here. Importing any ``difflm.families.*`` module
imports the package first, which registers the built-in families, so the registry is never
seen empty.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from difflm.families.base import Family
    from difflm.families.config import DiffusionConfig
    from difflm.models.config import ModelConfig


class FamilyBuilder(Protocol):
    """build(model_cfg, diffusion_cfg, vocab_size, **special_ids) -> Family."""

    def __call__(
        self, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, vocab_size: int, /, **special_ids: Any
    ) -> Family: ...


@dataclass(frozen=True)
class FamilySpec:
    """How to build one family.

    build(model_cfg, diffusion_cfg, vocab_size, **special_ids) -> Family. ``vocab_size`` is the
    tokenizer's; families that need extra tokens (mdlm's mask) add them themselves.
    special_ids: the tokenizer's special token ids as keyword ints (bos_id, eos_id, pad_id);
    a builder takes what it needs (ar: bos_id, to start samples) and ignores the rest, so
    every builder must accept ``**special_ids``.
    schedules: the noise schedule names this family accepts (empty: it has none).
    backbones: the ``model.backbone`` values this family can build, default first.
    switches: the ``diffusion`` fields the family applies in ``Family.configure`` between training
    stages (mdlm: atat, likelihood_weight); a stage of a run spec may change only these, and a
    family-specific option (``diffusion.atat``) may be switched on only for a family listing it.
    """

    name: str
    build: FamilyBuilder
    schedules: tuple[str, ...]
    description: str
    backbones: tuple[str, ...] = ("transformer",)
    switches: tuple[str, ...] = ()


_REGISTRY: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"family {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def family_names() -> list[str]:
    return sorted(_REGISTRY)


def get_family(name: str) -> FamilySpec:
    """The spec of family ``name``; a KeyError that names the closest valid one otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown family {name!r}; choose one of {', '.join(sorted(_REGISTRY))}.{hint}") from None
