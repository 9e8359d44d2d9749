"""Registry of model families: name -> FamilySpec (builder + allowed schedules).

Adding a family is one package under ``difflm/families/<name>/`` whose ``__init__`` calls
``register_family``, plus its import in ``difflm/families/__init__.py``; the trainer, the
spec validation and the CLI discover it here. Importing any ``difflm.families.*`` module
imports the package first, which registers the built-in families, so the registry is never
seen empty.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

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
    defaults: the family's values for ``diffusion`` fields a spec leaves null (e.g. bijective:
        ``{"likelihood_weight": 0.001}``); :meth:`resolve` fills them in at build time, so one
        field can mean "this family's default" without a switch on the family's name.
    check: raises ValueError (naming the field to change) for a model/diffusion combination the
        family cannot build, e.g. sedd's uniform graph without time conditioning. Run by the spec
        validation (exit 2 before Ray starts) and by :func:`difflm.families.build_model`.
    """

    name: str
    build: FamilyBuilder
    schedules: tuple[str, ...]
    description: str
    backbones: tuple[str, ...] = ("transformer",)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[ModelConfig, DiffusionConfig], None] | None = None

    def resolve(self, diffusion_cfg: DiffusionConfig) -> DiffusionConfig:
        """A copy of ``diffusion_cfg`` with null fields set to this family's values: ``schedule`` to the
        first of :attr:`schedules`, the others from :attr:`defaults`."""
        update = {k: v for k, v in self.defaults.items() if getattr(diffusion_cfg, k) is None}
        if diffusion_cfg.schedule is None and self.schedules:
            update["schedule"] = self.schedules[0]
        return diffusion_cfg.model_copy(update=update) if update else diffusion_cfg


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
