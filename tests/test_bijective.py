"""Bijective family: exact inverse and log-determinant of the coupling blocks, per-token loss, defaults, val."""

from __future__ import annotations

import math

import pytest
import torch

from difflm.evaluation import counted_positions, make_val_noise
from difflm.families import build_model, get_family
from difflm.families.bijective import Bijective, BijectiveBackbone, CouplingBlock
from difflm.families.config import DiffusionConfig
from difflm.schedules import get_schedule
from difflm.models import ModelConfig
from difflm.sampling import SampleOptions, get_sampler
from orchestrator.errors import SpecError
from orchestrator.spec.run import RunSpec, spec_from_dict

V, L = 12, 16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize(module: torch.nn.Module, scale: float = 0.2) -> None:
    """Zero-initialised layers -> random, so the couplings are far from the identity."""
    g = gen(1)
    with torch.no_grad():
        for p in module.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def make(weight: float | None = None, blocks: int | None = None, n_layers: int = 2, rand: bool = True,
         time_conditioning: bool = False) -> Bijective:
    torch.manual_seed(0)
    cfg = ModelConfig(family="bijective", size=None, d_model=32, n_layers=n_layers, n_heads=2, cond_dim=16,
                      bijective_blocks=blocks, time_conditioning=time_conditioning)
    m = build_model(cfg, DiffusionConfig(likelihood_weight=weight), V)
    if rand:
        randomize(m)
    return m  # type: ignore[return-value]


def flow(d_model: int = 16, n_heads: int = 2, blocks: int = 2) -> BijectiveBackbone:
    torch.manual_seed(0)
    bb = BijectiveBackbone(V + 1, V + 1, d_model, blocks, n_heads, cond_dim=8).double()
    randomize(bb, 0.3)
    return bb


# ---- the flow -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("time_conditioned", [False, True])
def test_inverse_reconstructs_input_float64(time_conditioned: bool) -> None:
    bb = flow(d_model=32, blocks=3)
    h = torch.randn(2, 10, 32, generator=gen(2), dtype=torch.float64) * 3
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64) if time_conditioned else None
    c = bb.condition(sigma, 2, h.device)
    z, logdet = bb.flow_forward(h, c)
    assert (z - h).abs().max() > 0.1 and logdet.abs().min() > 1e-3  # far from the identity
    back = bb.flow_inverse(z, c)
    rel = ((back - h).norm() / h.norm()).item()
    assert rel < 1e-5, rel
    assert rel < 1e-8  # round-off: the rotary tables are float32 even in a float64 model


def test_logdet_equals_autograd_jacobian() -> None:
    """sum over positions of the per-position log-det == log|det| of the full (L*D x L*D) Jacobian dz/dh,
    per block and for the stack (attention mixes positions, so the Jacobian is not block-diagonal)."""
    bb = flow(d_model=8, n_heads=2, blocks=2)
    Lq, D = 4, 8
    h = torch.randn(1, Lq, D, generator=gen(3), dtype=torch.float64)
    c = bb.condition(torch.tensor([0.7], dtype=torch.float64), 1, h.device)

    def stacked(x: torch.Tensor) -> torch.Tensor:
        return bb.flow_forward(x.view(1, Lq, D), c)[0].flatten()

    J = torch.autograd.functional.jacobian(stacked, h.flatten(), vectorize=True)  # (L*D, L*D)
    off_diag_positions = J.view(Lq, D, Lq, D).permute(0, 2, 1, 3)[~torch.eye(Lq, dtype=torch.bool)]
    assert off_diag_positions.abs().max() > 1e-3  # positions really interact
    sign, logabs = torch.linalg.slogdet(J)
    _, logdet = bb.flow_forward(h, c)
    assert sign.item() == 1.0
    torch.testing.assert_close(logdet.sum(), logabs, rtol=1e-8, atol=1e-8)
    from difflm.models.backbone import rotary_cos_sin

    cos, sin = rotary_cos_sin(Lq, D // 2 // 2, h.device)
    block: CouplingBlock = bb.flow[0]  # type: ignore[assignment]
    Jb = torch.autograd.functional.jacobian(lambda x: block(x.view(1, Lq, D), c, cos, sin)[0].flatten(), h.flatten(),
                                         vectorize=True)
    torch.testing.assert_close(block(h, c, cos, sin)[1].sum(), torch.linalg.slogdet(Jb)[1], rtol=1e-8, atol=1e-8)


def test_blocks_start_as_identity_and_only_the_first_k_are_invertible() -> None:
    m = make(blocks=1, n_layers=3, rand=False)
    assert len(m.backbone.flow) == 1 and len(m.backbone.blocks) == 2
    h = torch.randn(2, 5, 32, generator=gen(0))
    z, logdet = m.backbone.flow_forward(h, m.backbone.condition(None, 2, h.device))
    assert torch.equal(z, h) and torch.all(logdet == 0)
    assert len(make(n_layers=3).backbone.flow) == 3  # null = all
    h = m.backbone.flow_input(torch.randint(0, V + 1, (2, 5), generator=gen(1)))  # unit RMS: a fixed input scale
    torch.testing.assert_close(h.pow(2).mean(-1), torch.ones(2, 5), rtol=1e-4, atol=1e-4)


# ---- the loss --------------------------------------------------------------------------------------------


def test_loss_is_denoise_plus_weighted_flow_term() -> None:
    """loss = NELBO/token + w (flow NLL/token - logdet/token); NELBO equals mdlm's on the same draws."""
    m = make(weight=0.01)
    tokens = torch.randint(0, V, (4, L), generator=gen(0))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[2, 9:] = False
    out = m(tokens, valid, gen(4))
    n = valid.sum()
    mt = out.metrics
    torch.testing.assert_close(out.loss, mt["denoise_nelbo"] + 0.01 * mt["likelihood"])
    torch.testing.assert_close(mt["likelihood"], mt["flow_nll"] - mt["logdet"])
    assert mt["logdet"].abs() > 1e-3 and out.num_tokens.item() == n.item()
    # the NELBO part is mdlm's, same generator, same draws (t, then the mask uniforms)
    g = gen(4)
    t = m.sample_times(4, tokens.device, g)
    nelbo_tok, _, _ = m.nelbo_terms(tokens, valid, t, g)
    torch.testing.assert_close(out.nll_sum, nelbo_tok.sum().double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(mt["denoise_nelbo"], nelbo_tok.sum() / n, rtol=1e-6, atol=0)
    # flow terms by hand: per real token, positions outside `valid` excluded
    bb = m.backbone
    u = torch.rand(4, L, generator=_replay(4), dtype=torch.float32)
    masked = (u < m.schedule.move_chance(t)[:, None]) & valid
    xt = torch.where(masked, m.mask_id, tokens)
    z, logdet = bb.flow_forward(bb.flow_input(xt), bb.condition(None, 4, xt.device))
    nll = 0.5 * z.pow(2).sum(-1) + 16 * math.log(2 * math.pi)  # D/2 log 2 pi with D = 32
    torch.testing.assert_close(mt["flow_nll"], nll[valid].sum() / n, rtol=1e-5, atol=0)
    torch.testing.assert_close(mt["logdet"], logdet[valid].sum() / n, rtol=1e-5, atol=1e-6)
    assert out.loss.requires_grad and not any(v.requires_grad for v in mt.values())


def _replay(seed: int) -> torch.Generator:
    """A generator advanced past the time draw of a batch of 4 (antithetic: one uniform)."""
    g = gen(seed)
    torch.rand(1, generator=g)
    return g


def test_doubling_sequence_length_of_identical_data_leaves_loss_unchanged() -> None:
    """Constant tokens, all masked (t = 1, u = 0): every position sees the same input, so each per-token term is
    the same at length L and 2L. A likelihood summed over the sequence (the journals' 437,403) would double."""
    m = make(weight=0.1)
    short = torch.full((2, L), 4)
    long = torch.full((2, 2 * L), 4)
    outs = []
    for tok in (short, long):
        valid = torch.ones_like(tok, dtype=torch.bool)
        outs.append(m.loss_at(tok, valid, torch.ones(2), torch.zeros(tok.shape)))
    a, b = outs
    assert a.metrics["mask_rate"].item() == b.metrics["mask_rate"].item() == 1.0
    for key in ("denoise_nelbo", "flow_nll", "logdet", "likelihood"):
        torch.testing.assert_close(a.metrics[key], b.metrics[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=0)
    assert abs(a.metrics["logdet"].item()) > 1e-3 and a.metrics["flow_nll"].item() > 1.0
    assert b.nll_sum.item() == pytest.approx(2 * a.nll_sum.item(), rel=1e-5)  # sums do double; losses do not


def test_forward_is_loss_at_with_its_own_draws() -> None:
    m = make()
    tokens = torch.randint(0, V, (4, L), generator=gen(0))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    out = m(tokens, valid, gen(9))
    g = gen(9)
    t = m.sample_times(4, tokens.device, g)
    u = torch.rand(tokens.shape, generator=g)
    again = m.loss_at(tokens, valid, t, u)
    assert out.loss.item() == again.loss.item()


def test_default_weight_is_the_familys_and_explicit_values_win() -> None:
    assert get_family("bijective").defaults == {"likelihood_weight": 0.001}
    assert make().likelihood_weight == 0.001
    assert make(weight=0.05).likelihood_weight == 0.05
    mdlm = build_model(ModelConfig(family="mdlm", size=None, d_model=16, n_layers=1, n_heads=2), DiffusionConfig(), V)
    assert mdlm.likelihood_weight == 1.0  # a null weight is each family's own default
    spec = RunSpec.model_validate({"model": {"family": "bijective"}})
    assert spec.diffusion.likelihood_weight is None  # resolved when the model is built, per family
    tokens = torch.randint(0, V, (2, L), generator=gen(0))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    zero = make(weight=0.0)(tokens, valid, gen(1))
    torch.testing.assert_close(zero.loss, zero.metrics["denoise_nelbo"])


def test_loss_falls_on_tiny_data() -> None:
    torch.set_num_threads(1)
    data = torch.tensor([2, 5, 9]).repeat_interleave(L).view(3, L).repeat(4, 1)  # (12, L)
    valid = torch.ones_like(data, dtype=torch.bool)
    m = make(rand=False)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = m(data, valid, gen(99))
    g = gen(5)
    for _ in range(60):
        loss = m(data, valid, g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = m(data, valid, gen(99))  # the same noise draws as `first`
    with torch.no_grad():
        sums0 = first.nll_sum.item()
        sums1 = last.nll_sum.item()
    assert last.loss.item() < 0.5 * first.loss.item(), (first.loss.item(), last.loss.item())
    assert sums1 < 0.35 * sums0, (sums0, sums1)
    # the flow term moved too: the log-det is no longer 0 (the blocks left the identity)
    assert abs(last.metrics["logdet"].item()) > 1e-3


# ---- val, sampling, diagnostics, spec ------------------------------------------------------------------------


def test_val_nll_is_mdlms_nelbo_estimate() -> None:
    m = make()
    tokens = torch.randint(0, V, (3, L), generator=gen(0))
    counted = counted_positions(tokens)
    noise = make_val_noise([0, 1, 2], 3, L, seed=7)
    got = m.val_nll(tokens, counted, noise)
    assert got.shape == (3, 3) and got.dtype == torch.float64
    for k in range(3):
        mk = noise.rates[:, k]
        masked = noise.masked(k, counted)
        xt = torch.where(masked, m.mask_id, tokens)
        logp = m.log_probs(xt, -torch.log1p(-mk).float())
        nll = -logp.gather(-1, tokens[..., None]).squeeze(-1)
        expected = noise.weights[:, k] * torch.where(masked, nll, 0.0).sum(-1).double() / mk
        torch.testing.assert_close(got[:, k], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(m.val_nll(tokens, counted, noise), got, rtol=0, atol=0)


def test_inherits_mdlm_sampling_and_denoise() -> None:
    m = make().eval()
    assert list(m.samplers()) == ["ddpm_cache", "ddpm", "analytic"]
    ids = torch.randint(0, V, (L,), generator=gen(3))
    fixed = torch.ones(L, dtype=torch.bool)
    fixed[4:9] = False
    out = get_sampler(m, "ddpm_cache")(SampleOptions(num=2, length=L, steps=8, template=ids, fixed=fixed), gen(0))
    assert torch.all(out.tokens < V) and torch.equal(out.tokens[:, fixed], ids[fixed].expand(2, -1))
    res = m.denoise(ids[None], torch.ones(1, L, dtype=torch.bool), 0.5, gen(0))
    assert torch.all(res.reconstructed < V)


def test_diagnostics_report_logdet_and_inverse_error() -> None:
    m = make().eval()
    tokens = torch.randint(0, V, (4, L), generator=gen(0))
    d = m.diagnostics(tokens, gen(0), lambda ids: "")
    assert set(d.scalars) == {"flow_logdet", "flow_inverse_rel_err"}
    assert d.scalars["flow_inverse_rel_err"] < 1e-4 and abs(d.scalars["flow_logdet"]) > 1e-3


def test_spec_rejects_blocks_the_backbone_cannot_invert() -> None:
    base = {"model": {"family": "bijective", "size": None, "d_model": 32, "n_layers": 2, "n_heads": 4}}
    with pytest.raises(SpecError, match="bijective_blocks=3 exceeds model.n_layers=2"):
        spec_from_dict({"model": {**base["model"], "bijective_blocks": 3}})
    with pytest.raises(SpecError, match="d_model / 2 / n_heads must be an even integer"):
        spec_from_dict({"model": {**base["model"], "n_heads": 16}})  # 32 / 16 = 2 is fine for mdlm, 16 / 16 is odd
    spec_from_dict({"model": {**base["model"], "family": "mdlm", "n_heads": 16}})
    spec_from_dict({"model": {**base["model"], "bijective_blocks": 1}})
    with pytest.raises(TypeError, match="BijectiveBackbone"):
        Bijective(make().backbone.blocks, V, get_schedule("loglinear"))  # type: ignore[arg-type]
