"""BART-encoder denoiser for continuous-embedding diffusion (``model.backbone: bart``).

The journal behind the diffusion_lm family trained a BART-based Diffusion-LM; this module
makes that backbone available. It is a Hugging Face ``BartEncoder`` (bidirectional
self-attention, learned absolute positions, post-norm) built from a ``BartConfig`` with the
spec's dims and random init; with ``model.pretrained_path`` pointing at a local
``save_pretrained`` folder (BartModel or BartForConditionalGeneration), the encoder weights
are loaded from there instead and its own dims win. Nothing is ever downloaded.

The encoder's token-embedding table is deleted: inputs are the diffusion's noisy
embeddings, projected ``E -> d_model``. Time is injected twice (documented choice):

* additively at the input: ``h = in_proj(x_t) + time_in(c)``, as the original Diffusion-LM
  adds its time embedding to the input of its BERT encoder; BART then adds its positions
  and applies ``layernorm_embedding``;
* adaLN at the output: the shared :class:`~difflm.models.backbone.FinalLayer` shifts/scales
  the normalised last hidden state by c before projecting ``d_model -> E`` (zero-initialised,
  so x0_hat = 0 at init, as the DiT denoiser). Only the input path reaches the attention
  layers: BART's blocks have no adaLN.

``transformers`` is imported only when a BART denoiser is built (it costs seconds to import).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from difflm.models.backbone import FinalLayer
from difflm.families.diffusion_lm.denoiser import TimeConditioner, input_projection


def build_bart_encoder(
    d_model: int,
    n_layers: int,
    n_heads: int,
    dropout: float = 0.0,
    max_positions: int = 2048,
    pretrained_path: str | None = None,
) -> nn.Module:
    """A BartEncoder without its token table: random init from the dims, or loaded from a local folder."""
    from transformers import BartConfig, BartModel
    from transformers.models.bart.modeling_bart import BartEncoder

    if pretrained_path is not None:
        path = Path(pretrained_path).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model.pretrained_path {str(path)!r} is not a local Hugging Face model folder (no config.json); "
                "difflm never downloads weights: save a BART model there with save_pretrained first"
            )
        encoder: Any = BartModel.from_pretrained(str(path), local_files_only=True).encoder
    else:
        config = BartConfig(
            vocab_size=4,  # the token table is deleted below; inputs are embeddings
            d_model=d_model,
            encoder_layers=n_layers,
            encoder_attention_heads=n_heads,
            encoder_ffn_dim=4 * d_model,
            decoder_layers=1,
            decoder_attention_heads=n_heads,
            decoder_ffn_dim=4 * d_model,
            max_position_embeddings=max_positions,
            dropout=dropout,
            attention_dropout=0.0,
            activation_dropout=0.0,
            encoder_layerdrop=0.0,
        )
        encoder = BartEncoder(config)
    del encoder.embed_tokens  # never used with inputs_embeds; an unused table would get no gradient
    return encoder


class BartDenoiser(nn.Module):
    """x0-predictor on a BART encoder: noisy embeddings (B, L, E) + t/T (B,) -> x0_hat (B, L, E)."""

    def __init__(
        self,
        embed_dim: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        cond_dim: int,
        dropout: float = 0.0,
        max_positions: int = 2048,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder = build_bart_encoder(d_model, n_layers, n_heads, dropout, max_positions, pretrained_path)
        d_model = int(self.encoder.config.d_model)  # a pretrained encoder's width wins
        self.embed_dim, self.d_model = embed_dim, d_model
        self.max_positions = int(self.encoder.config.max_position_embeddings)
        self.in_proj = input_projection(embed_dim, d_model)
        self.time = TimeConditioner(cond_dim)
        self.time_in = nn.Linear(cond_dim, d_model)
        self.final = FinalLayer(d_model, embed_dim, cond_dim)

    def condition(self, t_frac: Tensor) -> Tensor:
        """t/T (B,) -> c (B, cond_dim)."""
        return self.time(t_frac)

    def forward_embeddings(self, x: Tensor, c: Tensor) -> Tensor:
        """Noisy embeddings x (B, L, E) under conditioning c (B, cond_dim) -> x0 prediction (B, L, E)."""
        if x.shape[1] > self.max_positions:
            raise ValueError(f"sequence length {x.shape[1]} exceeds BART's max_position_embeddings {self.max_positions}")
        h = self.in_proj(x.to(self.in_proj[0].weight.dtype)) + self.time_in(c)[:, None, :]  # (B, L, D)
        h = self.encoder(inputs_embeds=h).last_hidden_state  # (B, L, D)
        return self.final(h, c)  # (B, L, E)

    def forward(self, x: Tensor, t_frac: Tensor) -> Tensor:
        return self.forward_embeddings(x, self.condition(t_frac))  # (B, L, E)
