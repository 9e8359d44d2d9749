"""Model families (mdlm, ar, ...) behind one interface, plus their registry.

Importing this package registers the built-in families. :func:`build_model` is the one
call the trainer needs: spec sections + vocab in, a :class:`Family` out.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from difflm.families.base import Family, LossOutput
from difflm.families.config import DiffusionConfig
from difflm.families.registry import FamilySpec, family_names, get_family, register_family
from difflm.models.config import ModelConfig

# Imported for their register_family side effect (after the registry itself).
from difflm.families import ar, diffusion_lm, mdlm  # noqa: E402,F401  isort: skip
from difflm.families import bijective, sedd  # noqa: E402,F401  isort: skip
from difflm.families import bd3lm  # noqa: E402,F401  isort: skip


def build_model(
    model_cfg: BaseModel, diffusion_cfg: BaseModel, vocab_size: int, **special_ids: Any
) -> Family:
    """Build family ``model_cfg.family`` for a tokenizer of ``vocab_size`` ids.

    special_ids: the tokenizer's bos_id / eos_id / pad_id (ints), for families that use them
    (ar starts its samples from bos_id). Null diffusion fields take the family's values
    (:meth:`FamilySpec.resolve`). The configs may be the family's own classes (a run spec's sections)
    or the flat :class:`ModelConfig` / :class:`DiffusionConfig`, converted by :meth:`FamilySpec.sections`
    (a non-default field the family does not read is a ValueError). Raises KeyError for an unknown family and ValueError for a
    schedule, backbone or combination (:attr:`FamilySpec.check`) the family does not accept.
    """
    spec = get_family(model_cfg.family)
    model_cfg, diffusion_cfg = spec.sections(model_cfg, diffusion_cfg)  # the family's own config classes
    diffusion_cfg = spec.resolve(diffusion_cfg)  # null schedule / defaults -> the family's values
    if spec.schedules and getattr(diffusion_cfg, "schedule", None) not in spec.schedules:
        raise ValueError(
            f"family {spec.name!r} does not accept schedule {diffusion_cfg.schedule!r}; "
            f"choose one of {', '.join(spec.schedules)}"
        )
    if model_cfg.backbone not in spec.backbones:
        raise ValueError(
            f"family {spec.name!r} does not support backbone {model_cfg.backbone!r}; "
            f"choose one of {', '.join(spec.backbones)}"
        )
    if spec.check is not None:
        spec.check(model_cfg, diffusion_cfg)
    return spec.build(model_cfg, diffusion_cfg, vocab_size, **special_ids)


__all__ = [
    "Family",
    "LossOutput",
    "FamilySpec",
    "get_family",
    "family_names",
    "register_family",
    "build_model",
]
