"""Registry of model families: name -> FamilySpec (builder, allowed schedules, fields read).

Adding a family is one package under ``difflm/families/<name>/`` whose ``__init__`` calls
``register_family``, plus its import in ``difflm/families/__init__.py``; the trainer, the
spec validation and the CLI discover it here. Importing any ``difflm.families.*`` module
imports the package first, which registers the built-in families, so the registry is never
seen empty.
A family also declares which family-specific spec fields it reads (``FamilySpec.reads``), so a
spec that sets a field the chosen family would silently ignore is rejected by the spec
validation, never by a switch on the name.
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
    reads: the family-specific spec fields (see :func:`family_fields`: every ``diffusion.*``
    field plus ``model.time_conditioning`` and ``model.embed_dim``) this family uses. A spec
    that sets any other of them to a non-default value is rejected, naming the family.
    ``None`` (the default) declares nothing and rejects nothing: a new family works at once
    and opts into the check by listing what it reads. ``diffusion.schedule`` is checked
    against ``schedules`` as well.
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
    reads: frozenset[str] | None = None
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


#: model fields that only some families read (every ``diffusion.*`` field is family-specific too)
FAMILY_MODEL_FIELDS: tuple[str, ...] = ("model.time_conditioning", "model.embed_dim")


def family_fields() -> tuple[str, ...]:
    """Every family-specific spec field, as dotted paths: ``diffusion.*`` and FAMILY_MODEL_FIELDS.

    Derived from DiffusionConfig, so a field added there is checked for every family that
    declares ``reads`` without listing it."""
    from difflm.families.config import DiffusionConfig

    return tuple(f"diffusion.{name}" for name in DiffusionConfig.model_fields) + FAMILY_MODEL_FIELDS


def unread_fields(family: FamilySpec, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig) -> list[str]:
    """The family-specific fields set to a non-default value that ``family`` does not read.

    Compared with the field's default, not with "was it written": a resolved spec (every field
    spelled out, as saved in checkpoints) must validate again, and writing a default changes nothing.
    """
    if family.reads is None:
        return []
    out = []
    for path in family_fields():
        if path in family.reads:
            continue
        section, name = path.split(".", 1)
        cfg: Any = model_cfg if section == "model" else diffusion_cfg
        default = type(cfg).model_fields[name].get_default(call_default_factory=True)
        if getattr(cfg, name) != default:
            out.append(path)
    return out


def register_family(spec: FamilySpec) -> FamilySpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"family {spec.name!r} registered twice")
    if spec.reads is not None:
        unknown = sorted(set(spec.reads) - set(family_fields()))
        if unknown:
            raise ValueError(
                f"family {spec.name!r} declares reads {unknown}, which are not family-specific spec fields; "
                f"choose from {', '.join(family_fields())}"
            )
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
