"""Registry of model families: name -> FamilySpec (builder, allowed schedules, config classes).

Adding a family is one package under ``difflm/families/<name>/`` whose ``__init__`` calls
``register_family``, plus its import in ``difflm/families/__init__.py``; the trainer, the
spec validation and the CLI discover it here. Importing any ``difflm.families.*`` module
imports the package first, which registers the built-in families, so the registry is never
seen empty.
A family also names its own ``diffusion:`` and ``model:`` config classes (``FamilySpec.config``,
``FamilySpec.model_config``, in its ``config.py``); the run spec validates those sections as the
union of every family's classes picked by ``model.family`` (:func:`section_union`), so a field the
chosen family would silently ignore is an unknown key, never a switch on the name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Callable, Mapping, Protocol, Union

from pydantic import BaseModel, Discriminator, Tag, TypeAdapter

from difflm.families.config import DiffusionConfig, FamilyConfig
from difflm.models.config import BackboneConfig, ModelConfig
from difflm.types import SamplerFn

if TYPE_CHECKING:
    from difflm.families.base import Family


class FamilyBuilder(Protocol):
    """build(model_cfg, diffusion_cfg, vocab_size, **special_ids) -> Family; the configs are the family's
    own classes (:attr:`FamilySpec.model_config`, :attr:`FamilySpec.config`)."""

    def __call__(self, model_cfg: Any, diffusion_cfg: Any, vocab_size: int, /, **special_ids: Any) -> Family: ...


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
    config: the family's ``diffusion:`` section class (a :class:`FamilyConfig` subclass made of the
        field groups in ``difflm/families/config.py``); model_config: its ``model:`` section class
        (a :class:`BackboneConfig` subclass). Their fields are exactly what the family reads; the
        flat defaults (every field) accept anything, for a family that declares nothing yet.
    switches: the ``diffusion`` fields the family applies in ``Family.configure`` between training
    stages (mdlm: atat, likelihood_weight); a stage of a run spec may change only these, and a
    family-specific option (``diffusion.atat``) may be switched on only for a family listing it.
    samplers: the family's samplers by name, unbound (``fn(model, options, generator) -> SampleOutput``,
        :class:`difflm.types.SamplerFn`); :meth:`Family.samplers` binds them and :meth:`Family.sample` runs
        the default, so no family writes either. Registering them here (not importing them in model.py)
        keeps a family's model free of its samplers.
    default_sampler: the name ``difflm sample`` (and ``Family.sample``) uses: a name in ``samplers``, or a
        function of the built model giving one (mdlm: plain ddpm when time-conditioned, where caching is
        invalid); None: the first of ``samplers``.
    """

    name: str
    build: FamilyBuilder
    schedules: tuple[str, ...]
    description: str
    backbones: tuple[str, ...] = ("transformer",)
    switches: tuple[str, ...] = ()
    config: type[FamilyConfig] = DiffusionConfig
    model_config: type[BackboneConfig] = ModelConfig
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Any, Any], None] | None = None
    samplers: Mapping[str, SamplerFn] = field(default_factory=dict)
    default_sampler: str | Callable[[Any], str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.default_sampler, str) and self.default_sampler not in self.samplers:
            raise ValueError(
                f"family {self.name!r}: default_sampler {self.default_sampler!r} is not one of its samplers "
                f"({', '.join(self.samplers) or 'none registered'})"
            )

    def default_for(self, model: Any) -> str:
        """The default sampler's name for the built ``model`` (see :attr:`default_sampler`)."""
        if callable(self.default_sampler):
            return self.default_sampler(model)
        if self.default_sampler is not None:
            return self.default_sampler
        if not self.samplers:
            raise KeyError(f"family {self.name!r} registers no samplers (FamilySpec.samplers)")
        return next(iter(self.samplers))

    def resolve(self, diffusion_cfg: Any) -> Any:
        """A copy of ``diffusion_cfg`` with null fields set to this family's values: ``schedule`` to the
        first of :attr:`schedules`, the others from :attr:`defaults`."""
        update = {k: v for k, v in self.defaults.items() if getattr(diffusion_cfg, k, None) is None}
        if self.schedules and diffusion_cfg.schedule is None:
            update["schedule"] = self.schedules[0]
        return diffusion_cfg.model_copy(update=update) if update else diffusion_cfg

    def sections(self, model_cfg: BaseModel, diffusion_cfg: BaseModel) -> tuple[Any, Any]:
        """``(model_cfg, diffusion_cfg)`` as this family's own classes.

        Instances of them pass through; any other config (the flat :class:`ModelConfig` /
        :class:`DiffusionConfig` of library callers) is converted from its non-default fields, so a
        field this family does not read, set to a non-default value, is a ValueError naming it."""
        return (_convert(self.model_config, model_cfg, "model", self.name),
                _convert(self.config, diffusion_cfg, "diffusion", self.name))


def _convert(cls: type[BaseModel], cfg: BaseModel, section: str, family: str) -> Any:
    if isinstance(cfg, cls):
        return cfg
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    data["family"] = family
    unread = sorted(set(data) - set(cls.model_fields))
    if unread:
        raise ValueError(
            f"{', '.join(f'{section}.{k}' for k in unread)}: not used by family {family}; remove "
            f"{'it' if len(unread) == 1 else 'them'} (its {section} fields: "
            f"{', '.join(k for k in cls.model_fields if k != 'family') or 'none'})"
        )
    return cls.model_validate(data)


_REGISTRY: dict[str, FamilySpec] = {}
#: called after every registration: the run spec (orchestrator.spec.run) rebuilds its per-family
#: sections, so a family registered after the spec module was imported (a user's plugin package, a
#: test-only family) validates like a built-in one
_ON_REGISTER: list[Callable[[], None]] = []


def register_family(spec: FamilySpec) -> FamilySpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"family {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    registry_changed()
    return spec


def registry_changed() -> None:
    """Tell the registry's dependants (the run spec's section union) that the set of families changed;
    register_family calls it, and so must code that edits the registry directly (tests)."""
    for hook in _ON_REGISTER:
        hook()


def on_register(hook: Callable[[], None]) -> None:
    """Call ``hook()`` after every change of the registry (see :data:`_ON_REGISTER`)."""
    _ON_REGISTER.append(hook)


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


# ---- the run spec's per-family sections -----------------------------------------------------------


def _tag(value: Any) -> str | None:
    """The family tag of a ``model:`` / ``diffusion:`` section (a dict or a config instance)."""
    if isinstance(value, dict):
        return value.get("family")
    return getattr(value, "family", None)


def section_union(section: str) -> Any:
    """The type of the run spec's ``model`` or ``diffusion`` field: every registered family's class for
    that section, picked by the ``family`` tag (pydantic's discriminated union).

    Built when the run spec module is imported, after the built-in families registered; the JSON
    Schema then shows each family's own fields (``oneOf``)."""
    attr = "model_config" if section == "model" else "config"
    members = tuple(Annotated[getattr(spec, attr), Tag(name)] for name, spec in sorted(_REGISTRY.items()))
    return Annotated[Union[members], Discriminator(_tag)]  # type: ignore[valid-type]


def tag_sections(data: dict[str, Any]) -> dict[str, Any]:
    """Prepare a raw run spec's ``model`` / ``diffusion`` for :func:`section_union` (a copy; never raises
    for anything pydantic reports better).

    * ``model.family`` defaults to mdlm and is copied into ``diffusion`` as its tag; an unknown family
      is a ValueError naming the closest one.
    * Compatibility with resolved specs written before the per-family sections (a run folder's or
      checkpoint's spec.yaml spells out every field of the flat classes; recognised by carrying all of
      :data:`LEGACY_KEYS`): there, a field the family does not read is dropped when its value is the
      flat class's default, since writing a default never changed anything. Any other value stays and
      is reported as an unknown key, as is every unread field of a hand-written section.
    """
    out = dict(data)
    model = out.get("model")
    if isinstance(model, BaseModel):
        model = model.model_dump(mode="json", exclude_unset=True) | {"family": model.family}  # type: ignore[attr-defined]
    model = dict(model) if isinstance(model, dict) else model
    if model is None:
        model = {}
    if not isinstance(model, dict):
        return out  # pydantic says what is wrong with it
    family = model.setdefault("family", "mdlm")
    if not isinstance(family, str):
        return out
    spec = get_family(family)  # KeyError with the closest name
    diffusion = out.get("diffusion")
    if isinstance(diffusion, BaseModel):
        diffusion = diffusion.model_dump(mode="json", exclude_defaults=True)
    diffusion = {} if diffusion is None else diffusion
    if isinstance(diffusion, dict):
        diffusion = dict(diffusion)
        if diffusion.get("family", family) != family:
            raise KeyError(
                f"diffusion.family {diffusion['family']!r} differs from model.family {family!r}; "
                "drop diffusion.family (it is set from model.family)"
            )
        if LEGACY_KEYS["diffusion"] <= diffusion.keys():
            _drop_unread_defaults(diffusion, spec.config, DiffusionConfig)
        diffusion["family"] = family
        out["diffusion"] = diffusion
    if LEGACY_KEYS["model"] <= model.keys():
        _drop_unread_defaults(model, spec.model_config, ModelConfig)
    out["model"] = model
    return out


#: keys every resolved spec written by the flat-config code carried in its model / diffusion sections
LEGACY_KEYS: dict[str, frozenset[str]] = {
    "model": frozenset({"family", "size", "d_model", "n_layers", "n_heads", "cond_dim", "dropout", "time_conditioning"}),
    "diffusion": frozenset({"schedule", "eps", "sampling_eps", "antithetic", "likelihood_weight", "timesteps",
                            "sample_steps"}),
}


def _drop_unread_defaults(raw: dict[str, Any], cls: type[BaseModel], flat: type[BaseModel]) -> None:
    for key in [k for k in raw if k not in cls.model_fields and k in flat.model_fields]:
        info = flat.model_fields[key]
        try:
            value = TypeAdapter(info.annotation).validate_python(raw[key])
        except Exception:
            continue
        if value == info.get_default(call_default_factory=True):
            del raw[key]


def unread_by(family: str, section: str) -> list[str]:
    """The flat fields of ``section`` (model / diffusion) that ``family``'s class does not have."""
    spec = get_family(family)
    cls, flat = (spec.model_config, ModelConfig) if section == "model" else (spec.config, DiffusionConfig)
    return [k for k in flat.model_fields if k not in cls.model_fields]
