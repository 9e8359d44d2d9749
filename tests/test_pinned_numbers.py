"""Pinning test: every family's training loss and val/nll on the same tiny weights are bit-identical to
the numbers the code gave before the per-family config refactor (issue 19, computed at commit d32ea96).

A refactor of configs, construction or the Family interface must not change any number; a deliberate
change of a loss or estimator updates PINNED (and says so in the commit). Floats are compared as
float.hex strings, i.e. bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from difflm.evaluation import counted_positions, make_val_noise
from difflm.families import build_model
from difflm.families.config import DiffusionConfig
from difflm.models.config import ModelConfig

CASES = {
    "mdlm": ({"family": "mdlm"}, {}),
    "mdlm_tc": ({"family": "mdlm", "time_conditioning": True}, {"schedule": "cosine"}),
    "mdlm_atat": ({"family": "mdlm"}, {"atat": {"importance_head": True, "head_width": 16, "head_layers": 1,
                                            "head_heads": 2, "adaptive_masking": True, "weighted_loss": 0.5}}),
    "ar": ({"family": "ar"}, {}),
    "diffusion_lm": ({"family": "diffusion_lm", "embed_dim": 16}, {"timesteps": 50}),
    "sedd": ({"family": "sedd"}, {}),
    "sedd_uniform": ({"family": "sedd", "time_conditioning": True}, {"graph": "uniform", "schedule": "geometric"}),
    "bijective": ({"family": "bijective", "bijective_blocks": 1}, {}),
}
#: tiny dims so the whole file runs in about a second
DIMS = {"size": None, "d_model": 32, "n_layers": 2, "n_heads": 2, "cond_dim": 16}

def numbers(name: str) -> dict[str, object]:
    """Loss of one training forward and the (B, K) val_nll draws of case ``name``, as float.hex strings."""
    m, d = CASES[name]
    torch.manual_seed(0)
    fam = build_model(ModelConfig(**DIMS, **m), DiffusionConfig(**d), 40, bos_id=1, eos_id=2, pad_id=0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 40, (3, 12), generator=g)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[2, 9:] = False
    fam.train()
    loss = fam(tokens, valid, torch.Generator().manual_seed(2)).loss.detach()
    fam.eval()
    with torch.no_grad():
        noise = make_val_noise([0, 5, 7], 4, 12, seed=1234)
        v = fam.val_nll(tokens, counted_positions(tokens), noise)
    return {"loss": float(loss).hex(), "val": [float(x).hex() for x in v.flatten().tolist()]}


# computed at d32ea96 (before issue 19's refactor) with this file's numbers()
PINNED: dict[str, dict[str, object]] = {
 "mdlm": {
  "loss": "0x1.3a7faa0000000p+2",
  "val": [
   "0x0.0p+0",
   "0x1.7fa6eae24d3a0p+4",
   "0x1.7547b62caffdbp+5",
   "0x1.32eb05e1865a1p+5",
   "0x1.ed57b81a25994p+5",
   "0x1.e28711a20eea7p+5",
   "0x1.8f30788820d4ap+4",
   "0x1.2a4f5b57bc97dp+5",
   "0x1.1620fbbc67ee1p+5",
   "0x1.7f15c4aea1461p+5",
   "0x1.74ec0f29ccf2cp+5",
   "0x1.32b33e7d1443ap+5"
  ]
 },
 "mdlm_tc": {
  "loss": "0x1.0db86c0000000p+2",
  "val": [
   "0x0.0p+0",
   "0x1.7fa6eae24d3a0p+4",
   "0x1.7547b62caffdbp+5",
   "0x1.32eb05e1865a1p+5",
   "0x1.ed57b81a25994p+5",
   "0x1.e28711a20eea7p+5",
   "0x1.8f30788820d4ap+4",
   "0x1.2a4f5b57bc97dp+5",
   "0x1.1620fbbc67ee1p+5",
   "0x1.7f15c4aea1461p+5",
   "0x1.74ec0f29ccf2cp+5",
   "0x1.32b33e7d1443ap+5"
  ]
 },
 "mdlm_atat": {
  "loss": "0x1.4f10e00000000p+2",
  "val": [
   "0x0.0p+0",
   "0x1.7fa6eae24d3a0p+4",
   "0x1.7547b62caffdbp+5",
   "0x1.32eb05e1865a1p+5",
   "0x1.ed57b81a25994p+5",
   "0x1.e28711a20eea7p+5",
   "0x1.8f30788820d4ap+4",
   "0x1.2a4f5b57bc97dp+5",
   "0x1.1620fbbc67ee1p+5",
   "0x1.7f15c4aea1461p+5",
   "0x1.74ec0f29ccf2cp+5",
   "0x1.32b33e7d1443ap+5"
  ]
 },
 "ar": {
  "loss": "0x1.d82d340000000p+1",
  "val": [
   "0x1.271c408000000p+5",
   "0x1.271c408000000p+5",
   "0x1.271c408000000p+5",
   "0x1.271c408000000p+5",
   "0x1.271c408000000p+5",
   "0x1.271c408000000p+5",
   "0x1.271c408000000p+5",
   "0x1.271c408000000p+5",
   "0x1.271c408000000p+5",
   "0x1.271c408000000p+5",
   "0x1.271c408000000p+5",
   "0x1.271c408000000p+5"
  ]
 },
 "diffusion_lm": {
  "loss": "0x1.47177a0000000p+0",
  "val": [
   "0x1.01ff741000000p+11",
   "0x1.303a27e000000p+10",
   "0x1.9747d30000000p+9",
   "0x1.6cba6b8000000p+8",
   "0x1.f633ca0000000p+10",
   "0x1.18fab9b000000p+10",
   "0x1.196d3f8000000p+9",
   "0x1.06ec0cd000000p+8",
   "0x1.254809f000000p+11",
   "0x1.5a68bc0000000p+10",
   "0x1.9aa8e2c000000p+9",
   "0x1.85160a2000000p+8"
  ]
 },
 "sedd": {
  "loss": "0x1.3a7faa0000000p+2",
  "val": [
   "0x0.0p+0",
   "0x1.7fa6eb7296107p+4",
   "0x1.7547b55ec4329p+5",
   "0x1.32eb03de7d322p+5",
   "0x1.ed57b55a8ad63p+5",
   "0x1.e287112b78419p+5",
   "0x1.8f307b2bc0bd8p+4",
   "0x1.2a4f5c2c859f5p+5",
   "0x1.1620fa38f32cep+5",
   "0x1.7f15c4a140f29p+5",
   "0x1.74ec0f8b2377bp+5",
   "0x1.32b33f66c6ac3p+5"
  ]
 },
 "sedd_uniform": {
  "loss": "0x1.c899d60000000p+1",
  "val": [
   "0x1.7aecccd811a2cp+3",
   "0x1.9bfc02217457ap+4",
   "0x1.c4035b46df474p+4",
   "0x1.73db9eb11b705p+3",
   "0x1.21ac6790cd42fp+6",
   "0x1.6ea7f6456b444p+5",
   "0x1.af5b48ad79dcap+4",
   "0x1.c32ea1988642bp+2",
   "0x1.7cb3105d6d519p+5",
   "0x1.660c6bee3f995p+5",
   "0x1.c3233445266cep+4",
   "0x1.78a19734bffa9p+2"
  ]
 },
 "bijective": {
  "loss": "0x1.3d67980000000p+2",
  "val": [
   "0x0.0p+0",
   "0x1.7fa6eae24d3a0p+4",
   "0x1.7547b62caffdbp+5",
   "0x1.32eb05e1865a1p+5",
   "0x1.ed57b81a25994p+5",
   "0x1.e28711a20eea7p+5",
   "0x1.8f30788820d4ap+4",
   "0x1.2a4f5b57bc97dp+5",
   "0x1.1620fbbc67ee1p+5",
   "0x1.7f15c4aea1461p+5",
   "0x1.74ec0f29ccf2cp+5",
   "0x1.32b33e7d1443ap+5"
  ]
 }
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_val_nll_are_bit_identical_to_the_pinned_numbers(name: str) -> None:
    got = numbers(name)
    assert got["val"] == PINNED[name]["val"], f"{name}: val_nll changed"
    assert got["loss"] == PINNED[name]["loss"], f"{name}: training loss changed"
