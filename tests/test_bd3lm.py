"""bd3lm (difflm/families/bd3lm): block diffusion's loss against mdlm and ar, its mask, its exact KV cache."""

from __future__ import annotations

import itertools

import pytest
import torch

from difflm.evaluation import counted_positions, make_val_noise
from difflm.families import build_model
from difflm.families.bd3lm import BD3LM, block_diffusion_mask
from difflm.families.mdlm.model import MDLM
from difflm.models import Backbone
from difflm.sampling import SampleOptions, SamplingError, get_sampler
from difflm.schedules import get_schedule
from tests.helpers import one_thread, randomize_zero_init  # noqa: F401 (one_thread: autouse fixture)

V = 12



def backbone(vocab: int = V) -> Backbone:
    torch.manual_seed(0)
    b = Backbone(vocab + 1, vocab + 1, d_model=32, n_layers=2, n_heads=4, cond_dim=16).double()
    randomize_zero_init(b, scale=0.5)
    return b


def bd3(block: int, vocab: int = V, **kw: object) -> BD3LM:
    return BD3LM(backbone(vocab), vocab, get_schedule("loglinear"), block_size=block, **kw).eval()  # type: ignore[arg-type]


def test_mask_is_block_diffusions() -> None:
    m = block_diffusion_mask(4, 2, torch.device("cpu")).int()
    # rows/cols: x_t positions 0..3 then x0 positions 0..3; blocks {0,1} {2,3}
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1]])
    assert torch.equal(m, expected)


def test_block_size_seq_len_reproduces_mdlm_loss_and_val() -> None:
    L = 10
    tokens = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(1))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[2, 7:] = False
    mdlm = MDLM(backbone(), V, get_schedule("loglinear")).train()
    for block in (L, 64):  # one block, or a block longer than the sequence
        model = bd3(block).train()
        a = model(tokens, valid, torch.Generator().manual_seed(2))
        b = mdlm(tokens, valid, torch.Generator().manual_seed(2))
        assert torch.allclose(a.loss, b.loss, rtol=1e-10) and a.loss > 0
        noise = make_val_noise([0, 1, 2], 3, L, seed=5)
        counted = counted_positions(tokens)
        assert torch.allclose(model.val_nll(tokens, counted, noise), mdlm.val_nll(tokens, counted, noise), rtol=1e-10)
    # smaller blocks see less context: a different (larger on average) bound
    assert not torch.allclose(bd3(2).train()(tokens, valid, torch.Generator().manual_seed(2)).loss, b.loss)


def test_block_size_one_is_an_autoregressive_factorisation() -> None:
    """Block 1: the lone masked token at i is predicted from the clean tokens < i only, so the conditionals
    multiply to a normalised distribution over all sequences (summed over every sequence of a toy vocab)."""
    vocab, L = 3, 3
    model = bd3(1, vocab)
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=L)))  # (27, 3)
    xt = torch.full_like(seqs, model.mask_id)  # every block masked: each predicted from the clean prefix
    logits = model.denoiser_logits(xt, seqs)[..., :vocab].log_softmax(-1)  # (27, L, vocab)
    chain = logits.gather(-1, seqs[..., None]).squeeze(-1).sum(-1)  # (27,) log p(x) by the chain rule
    assert torch.isclose(chain.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-10)
    # the prediction at i does not depend on x_{>= i}
    changed = seqs.clone()
    changed[:, 2] = (changed[:, 2] + 1) % vocab
    assert torch.allclose(model.denoiser_logits(xt, changed)[:, :2], model.denoiser_logits(xt, seqs)[:, :2])
    # and the val NELBO estimate at masking rate 1 is exactly that chain-rule NLL
    counted = torch.ones_like(seqs, dtype=torch.bool)
    noise = make_val_noise(list(range(27)), 1, L, seed=0)
    noise.rates.fill_(1.0)
    noise.weights.fill_(1.0)
    diff = model.val_nll(seqs, counted, noise)[:, 0] + chain.detach()
    assert diff.abs().max() < 1e-5, diff  # the CE is computed in float32 (token_cross_entropy)


@pytest.mark.parametrize("remasking", ["random", "low_confidence", "threshold"])
def test_kv_cached_block_sampling_equals_uncached(remasking: str) -> None:
    model = bd3(4)
    kw = dict(num=3, length=14, steps=4, remasking=remasking, threshold=0.3, temperature=0.9)
    cached = get_sampler(model, "ddpm")(SampleOptions(**kw), torch.Generator().manual_seed(3))  # type: ignore[arg-type]
    plain = get_sampler(model, "ddpm_uncached")(SampleOptions(**kw), torch.Generator().manual_seed(3))  # type: ignore[arg-type]
    assert torch.equal(cached.tokens, plain.tokens)
    assert int((cached.tokens >= V).sum()) == 0
    assert cached.nfe > plain.nfe  # the cache costs one forward of each finished block (on 4 positions, not 14)


def test_registered_and_refuses_mdlm_caches() -> None:
    from difflm.families.bd3lm.config import Bd3lmConfig, Bd3lmModelConfig

    model = build_model(Bd3lmModelConfig(size=None, d_model=16, n_layers=1, n_heads=2, cond_dim=8),
                        Bd3lmConfig(block_size=8, noise_clip=(0.3, 0.8)), 20)
    assert isinstance(model, BD3LM) and model.block_size == 8 and model.noise_clip == (0.3, 0.8)
    out = model(torch.randint(0, 20, (2, 16)), torch.ones(2, 16, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert out.loss > 0
    m, w = model.block_times(4, 16, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert float(m.min()) >= 0.3 and float(m.max()) <= 0.8 and torch.allclose(w, 1 / m)
    assert torch.equal(m[:, :8], m[:, :1].expand(4, 8)) and not torch.equal(m[:, 0], m[:, 8])  # one rate per block
    with pytest.raises(SamplingError, match="exact KV cache"):
        get_sampler(model, "ddpm")(SampleOptions(num=1, length=8, steps=2, cache="dual"))
    with pytest.raises(ValueError, match="noise_clip"):
        Bd3lmConfig(noise_clip=(0.8, 0.3))


def test_kv_cached_logits_equal_uncached(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactness at the level of the numbers, not only the drawn tokens (a wrong cache can still draw the same
    tokens from a tiny model's near-flat predictions): every decoding step's logits agree to float64 rounding."""
    from difflm.families.bd3lm import samplers as bs

    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    inner = bs._logp
    mode = {"cache": True}

    def record(model: BD3LM, logits: torch.Tensor, ids: torch.Tensor, options: SampleOptions) -> torch.Tensor:
        seen[mode["cache"]].append(logits.detach().clone())
        return inner(model, logits, ids, options)

    monkeypatch.setattr(bs, "_logp", record)
    model = bd3(4)
    kw = dict(num=2, length=14, steps=3, temperature=0.9)
    for cache, name in ((True, "ddpm"), (False, "ddpm_uncached")):
        mode["cache"] = cache
        get_sampler(model, name)(SampleOptions(**kw), torch.Generator().manual_seed(5))  # type: ignore[arg-type]
    assert len(seen[True]) == len(seen[False]) >= 4 * 3
    for a, b in zip(seen[True], seen[False]):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-9, rtol=0), (a - b).abs().max()
