"""Backbone/model sub-config and the named size presets.

:class:`BackboneConfig` holds the ``model:`` fields every family reads (family, size, dims, dropout,
backbone); each family's own model class (``difflm/families/<name>/config.py``) extends it with the
fields only that family reads (mdlm: ``time_conditioning``, diffusion_lm: ``embed_dim``, bijective:
``bijective_blocks``), so the run spec's ``model:`` section rejects a field the family would ignore.
:class:`ModelConfig` is the flat union of all of them, kept for library callers and tests that build
a model without a spec: :func:`difflm.families.build_model` converts it to the family's class.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from difflm._config import StrictModel

# Named size presets (torchtitan style). Parameter counts depend on the vocab:
# tiny ~1-3M with the byte tokenizer, small ~38M and base ~110M with GPT-2's.
SIZE_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 128, "n_layers": 4, "n_heads": 4, "cond_dim": 64},
    "small": {"d_model": 256, "n_layers": 4, "n_heads": 4, "cond_dim": 128},
    "base": {"d_model": 768, "n_layers": 12, "n_heads": 12, "cond_dim": 128},
}


class BackboneConfig(StrictModel):
    """Which model family to train and how big its backbone is (the fields every family reads)."""

    family: str = Field(
        "mdlm",
        description="Model family from the registry (difflm.families): mdlm, ar, ... `difflm schema` lists them.",
    )
    size: Literal["tiny", "small", "base"] | None = Field(
        "tiny",
        description="Size preset: tiny (~1-3M params, CPU tests), small (~38M, 256 wide x 4 layers), "
        "base (768 wide x 12 layers x 12 heads, ~110M). Explicit dims below override the preset.",
    )
    d_model: int | None = Field(None, ge=8, le=16384, description="Hidden width; overrides the preset.")
    n_layers: int | None = Field(None, ge=1, le=256, description="Number of transformer blocks; overrides the preset.")
    n_heads: int | None = Field(None, ge=1, le=256, description="Attention heads; must divide d_model.")
    cond_dim: int | None = Field(None, ge=4, le=4096, description="Width of the time-conditioning vector fed to adaLN.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout in attention output and MLP.")
    backbone: Literal["transformer", "bart"] = Field(
        "transformer",
        description="Backbone implementation: transformer (the project's own DiT-style blocks) or bart "
        "(a Hugging Face BART encoder with time injection; diffusion_lm only).",
    )
    pretrained_path: str | None = Field(
        None,
        description="Local folder of a saved Hugging Face BART model (save_pretrained) whose encoder weights "
        "initialise backbone: bart; its dims override d_model/n_layers/n_heads. Never downloaded. "
        "null = random init.",
    )

    @model_validator(mode="after")
    def _dims_resolvable(self) -> "BackboneConfig":
        d = self.dims()
        if d["d_model"] % d["n_heads"] != 0:
            raise ValueError(f"n_heads={d['n_heads']} must divide d_model={d['d_model']}")
        if (d["d_model"] // d["n_heads"]) % 2 != 0:
            raise ValueError("d_model / n_heads must be even for rotary positions")
        if self.pretrained_path is not None and self.backbone != "bart":
            raise ValueError("model.pretrained_path is only used by backbone: bart")
        return self

    def dims(self) -> dict[str, int]:
        """Resolved backbone dims: the preset, overridden by any explicit value."""
        base = dict(SIZE_PRESETS[self.size]) if self.size else {}
        for key in ("d_model", "n_layers", "n_heads", "cond_dim"):
            val = getattr(self, key)
            if val is not None:
                base[key] = val
        missing = [k for k in ("d_model", "n_layers", "n_heads") if k not in base]
        if missing:
            raise ValueError(f"size is null, so set {', '.join(missing)} explicitly")
        base.setdefault("cond_dim", 128)
        return base


class TimeConditioningMixin(BackboneConfig):
    """``model.time_conditioning``: read by the families that may feed the noise level to adaLN."""

    time_conditioning: bool = Field(
        False,
        description="Feed the noise level to adaLN. MDLM's default is off: the share of masked tokens already "
        "tells the time, and the cached sampler relies on it being off.",
    )


class EmbedDimMixin(BackboneConfig):
    """``model.embed_dim``: read by continuous-embedding diffusion (diffusion_lm)."""

    embed_dim: int = Field(
        64,
        ge=16,
        le=1024,
        description="Width of the learned word embeddings that continuous-embedding diffusion (diffusion_lm) "
        "noises; 16-128 is typical.",
    )


class BijectiveBlocksMixin(BackboneConfig):
    """``model.bijective_blocks``: read by the bijective family."""

    bijective_blocks: int | None = Field(
        None,
        ge=1,
        le=256,
        description="bijective only: how many of the backbone's blocks (the first ones) are invertible affine "
        "coupling blocks, whose exact log-determinant enters the loss; null = all n_layers.",
    )


class ModelConfig(BijectiveBlocksMixin, EmbedDimMixin, TimeConditioningMixin):
    """Flat model config with every family's fields, for building a model outside a run spec.

    A run spec's ``model:`` section is the family's own class instead (a field the family does not read
    is an unknown key there); :func:`difflm.families.build_model` converts this one to it, rejecting a
    field set to a non-default value that the family ignores."""
