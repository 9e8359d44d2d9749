"""mdlm ATAT: the importance estimator trains, adaptive masking keeps the schedule's rate, the focus and
curriculum move the masks where they should, and eval/val paths stay plain."""

from __future__ import annotations

import math

import pytest
import torch

from difflm.evaluation import make_val_noise

from difflm.families.config import AtatConfig, DiffusionConfig
from difflm.families.mdlm import atat as at
from difflm.families.mdlm.model import MDLM
from difflm.models import Backbone
from difflm.schedules import get_schedule
from tests.helpers import one_thread, randomize_zero_init  # noqa: F401 (one_thread: autouse fixture)

V, L = 8, 16




def make(atat: AtatConfig | None = None, seed: int = 0) -> MDLM:
    torch.manual_seed(seed)
    backbone = Backbone(V + 1, V + 1, d_model=32, n_layers=2, n_heads=4, cond_dim=16)
    return MDLM(backbone, V, get_schedule("loglinear", 1e-3), atat=atat)


def head_cfg(**kw: object) -> AtatConfig:
    """A small head; the seed journal's clean importance unless the test asks for ``importance_from``."""
    kw.setdefault("importance_from", "clean")
    return AtatConfig(importance_head=True, head_width=16, head_layers=1, head_heads=2, **kw)  # type: ignore[arg-type]


def easy_hard_batch(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Even positions always token 0 (easy: certain once learned), odd positions uniform over 1..V-1 (hard)."""
    tokens = torch.randint(1, V, (batch, L), generator=gen)  # (B, L)
    tokens[:, ::2] = 0
    return tokens


def test_backbone_returns_hidden_states_alongside_the_same_logits() -> None:
    m = make()
    randomize_zero_init(m)
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(1))
    logits, hidden = m.backbone(ids, None, return_hidden=True)
    assert hidden.shape == (2, L, 32)
    torch.testing.assert_close(logits, m.backbone(ids))  # the default return is unchanged
    c = m.backbone.condition(None, 2, ids.device)
    torch.testing.assert_close(hidden, m.backbone.hidden(m.backbone.embed(ids), c))


@pytest.mark.parametrize("focus", ["easy", "medium", "hard"])
@pytest.mark.parametrize("move", [0.02, 0.3, 0.75, 0.999])
def test_adaptive_probs_keep_the_schedule_rate_per_sequence(focus: str, move: float) -> None:
    g = torch.Generator().manual_seed(0)
    B = 6
    valid = torch.ones(B, 64, dtype=torch.bool)
    valid[1, 40:] = False  # a shorter sequence: the rate holds over its own real tokens
    importance = torch.rand(B, 64, generator=g)
    bias = at.focus_bias(at.rank_quantiles(importance, valid), focus, 3.0)  # type: ignore[arg-type]
    assert bias.min() >= -3.0 - 1e-6 and bias.max() <= 1e-6
    probs = at.adaptive_mask_probs(torch.full((B,), move), bias, valid, 3.0)
    mean = (probs * valid).sum(-1) / valid.sum(-1)
    torch.testing.assert_close(mean, torch.full((B,), move), atol=2e-6, rtol=0)
    assert torch.all(probs[~valid] == 0) and torch.all((probs >= 0) & (probs <= 1))
    assert probs[valid].std() > 0.01 or move > 0.99  # actually biased (not uniform) except when nearly all masked


def test_mean_mask_rate_over_many_draws_equals_move_chance() -> None:
    """Realised masks through MDLM.nelbo_terms at fixed t: over 512 draws of 64 tokens (one tiled batch, so
    the backbone runs once per t) the mean masked share is move_chance(t), within 4 standard errors."""
    m = make(head_cfg(adaptive_masking=True, strength=4.0))
    g = torch.Generator().manual_seed(0)
    draws = 512
    importance = torch.rand(1, 64, generator=g).expand(draws, 64)  # one sequence's importance, every draw
    tokens = torch.randint(0, V, (1, 64), generator=g).expand(draws, 64)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    bias = at.focus_bias(at.rank_quantiles(importance, valid), "hard", 4.0)
    top = importance[0] > importance[0].median()
    for t_val in (0.1, 0.5, 0.9):
        t = torch.full((draws,), t_val)
        move = float(m.schedule.move_chance(t)[0])
        probs = at.adaptive_mask_probs(m.schedule.move_chance(t), bias, valid, 4.0)
        with torch.no_grad():
            masked = m.nelbo_terms(tokens, valid, t, g, mask_probs=probs)[2].float()  # (draws, 64)
        shares = masked.mean(dim=-1)  # (draws,)
        se = float(shares.std()) / draws ** 0.5
        assert abs(float(shares.mean()) - move) < 4 * se, (t_val, float(shares.mean()), move, se)
        if t_val < 0.9:  # 'hard' focus: the more important half is masked more often
            assert float(masked[:, top].mean() - masked[:, ~top].mean()) > 0.05


def test_focus_direction_and_zero_strength_is_plain_masking() -> None:
    importance = torch.linspace(0, 1, 32)[None].repeat(2, 1)  # token j has rank j
    valid = torch.ones(2, 32, dtype=torch.bool)
    q = at.rank_quantiles(importance, valid)
    move = torch.full((2,), 0.4)
    easy = at.adaptive_mask_probs(move, at.focus_bias(q, "easy", 3.0), valid, 3.0)[0]
    hard = at.adaptive_mask_probs(move, at.focus_bias(q, "hard", 3.0), valid, 3.0)[0]
    medium = at.adaptive_mask_probs(move, at.focus_bias(q, "medium", 3.0), valid, 3.0)[0]
    assert torch.all(easy.diff() < 0) and torch.all(hard.diff() > 0)  # monotone in importance, opposite ways
    assert medium[16] > medium[0] and medium[15] > medium[31]  # the middle ranks are favoured
    flat = at.adaptive_mask_probs(move, at.focus_bias(q, "hard", 0.0), valid, 0.0)
    torch.testing.assert_close(flat, torch.full((2, 32), 0.4))
    # the same noise draw: uniform probabilities reproduce the plain mask exactly
    m = make()
    tokens = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(3))
    t = torch.full((2,), 0.6)
    plain = m.nelbo_terms(tokens, valid, t, torch.Generator().manual_seed(5))[2]
    same = m.nelbo_terms(tokens, valid, t, torch.Generator().manual_seed(5),
                         mask_probs=m.schedule.move_chance(t)[:, None].expand(2, 32))[2]
    assert torch.equal(plain, same)


def test_curriculum_phases_switch_at_the_configured_fractions() -> None:
    bounds = (0.25, 0.6)
    assert [at.curriculum_phase(p, bounds) for p in (0.0, 0.249, 0.25, 0.599, 0.6, 1.0)] == [0, 0, 1, 1, 2, 2]
    cfg = head_cfg(adaptive_masking=True, curriculum=True, curriculum_bounds=bounds)
    assert [at.current_focus(cfg, p) for p in (0.1, 0.3, 0.9)] == ["easy", "medium", "hard"]
    assert at.current_focus(cfg.model_copy(update={"curriculum": False, "focus": "easy"}), 0.9) == "easy"
    m = make(cfg)
    m.train()
    tokens = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    phases = []
    for p in (0.1, 0.5, 0.8):
        m.set_progress(p)
        phases.append(float(m(tokens, valid, torch.Generator().manual_seed(0)).metrics["curriculum_phase"]))
    assert phases == [0.0, 1.0, 2.0]


def _head_kl(m: MDLM, tokens: torch.Tensor) -> float:
    """The head's loss (KL to its targets) on a fixed batch with fixed noise (train-mode forward, no update)."""
    with torch.no_grad():
        out = m(tokens, torch.ones_like(tokens, dtype=torch.bool), torch.Generator().manual_seed(123))
    return float(out.metrics["importance_loss"])


def _train(m: MDLM, params: list[torch.nn.Parameter], steps: int, g: torch.Generator) -> None:
    opt = torch.optim.AdamW(params, lr=3e-3)
    for _ in range(steps):
        tokens = easy_hard_batch(8, g)
        out = m(tokens, torch.ones_like(tokens, dtype=torch.bool), g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()


def test_importance_estimator_trains_and_tells_easy_from_hard_tokens() -> None:
    """Even positions are always token 0 (the denoiser learns them: target -> 0), odd ones uniform over 7
    tokens (target stays ~6/7). The denoiser trains first with the head off (stage 0); then the head trains
    on the frozen denoiser's targets: its loss on a fixed batch falls and its importance separates the kinds."""
    m = make(head_cfg())
    m.train()
    g = torch.Generator().manual_seed(0)
    probe = easy_hard_batch(32, torch.Generator().manual_seed(7))
    m.configure(DiffusionConfig())  # stage 0: plain mdlm (the head exists but is off)
    _train(m, list(m.parameters()), 60, g)
    m.configure(DiffusionConfig(atat=head_cfg()))  # stage 1: + the importance estimator
    assert m.importance is not None
    before = _head_kl(m, probe)
    _train(m, list(m.importance.parameters()), 40, g)
    after = _head_kl(m, probe)
    assert after < 0.2 * before, (before, after)
    with torch.no_grad():
        _, hidden = m.backbone(probe, None, return_hidden=True)
        importance = torch.sigmoid(m.importance(hidden))  # (B, L)
    easy, hard = importance[:, ::2].mean().item(), importance[:, 1::2].mean().item()
    assert hard - easy > 0.3, (easy, hard)


@pytest.mark.parametrize("source", ["clean", "noisy"])
def test_the_head_never_trains_the_backbone(source: str) -> None:
    """Joint training: the head reads detached features, so the backbone's gradients equal plain mdlm's.
    (noisy without adaptive masking: the plain reference replays the probe and its uniform thinning.)"""
    grads = []
    for atat in (None, head_cfg(head_loss_weight=50.0, importance_from=source)):
        m = make(atat)
        randomize_zero_init(m.backbone)
        m.train()
        tokens = easy_hard_batch(4, torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(2)
        if atat is None and source == "noisy":
            t = m.sample_times(4, tokens.device, g)
            move = m.schedule.move_chance(t)[:, None]
            probe = torch.rand(tokens.shape, generator=g) < move.sqrt()  # the probe's masks, thinned uniformly
            probs = torch.where(probe, move / move.sqrt(), 0.0)
            nelbo_tok = m.nelbo_terms(tokens, torch.ones_like(tokens, dtype=torch.bool), t, g, mask_probs=probs)[0]
            (nelbo_tok.sum() / tokens.numel()).backward()
        else:
            m(tokens, torch.ones_like(tokens, dtype=torch.bool), g).loss.backward()
        grads.append([p.grad.clone() for p in m.backbone.parameters()])
        if atat is not None:
            assert m.importance is not None and all(p.grad is not None for p in m.importance.parameters())
            # ... and does not throttle it either: the global grad-norm clip sees (almost) only the backbone
            backbone = torch.stack([p.grad.norm() for p in m.backbone.parameters()]).norm()
            head = torch.stack([p.grad.norm() for p in m.importance.parameters()]).norm()
            assert float(head) < 0.2 * float(backbone), (float(head), float(backbone))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("source", ["clean", "noisy"])
def test_eval_mode_and_val_paths_are_plain_masking(source: str) -> None:
    """ATAT only changes training: in eval mode the loss and masks, and val_nll always, equal plain mdlm's."""
    atat_model = make(head_cfg(adaptive_masking=True, weighted_loss=1.0, strength=5.0, importance_from=source,
                               unbiased=source == "noisy"))
    plain = make()
    plain.backbone.load_state_dict(atat_model.backbone.state_dict())
    randomize_zero_init(atat_model.backbone)
    plain.backbone.load_state_dict(atat_model.backbone.state_dict())
    tokens = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(2))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    for m in (atat_model, plain):
        m.eval()
    a = atat_model(tokens, valid, torch.Generator().manual_seed(9))
    b = plain(tokens, valid, torch.Generator().manual_seed(9))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.nll_sum, b.nll_sum) and "importance_loss" not in a.metrics
    noise = make_val_noise(list(range(4)), 3, L, seed=4)
    atat_model.train()  # val_nll is plain masking whatever the mode
    sa = atat_model.val_nll(tokens, valid, noise)
    atat_model.eval()
    sb = plain.val_nll(tokens, valid, noise)
    assert torch.equal(sa, sb)
    atat_model.train()
    c = atat_model(tokens, valid, torch.Generator().manual_seed(9))
    assert "importance_loss" in c.metrics and not torch.equal(c.loss, b.loss)  # training does use ATAT


def test_importance_weights_keep_the_loss_scale() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(4, L, generator=g)
    masked = torch.rand(4, L, generator=g) < 0.5
    w = at.importance_weights(s, masked, 1.0)
    assert (w * masked).sum() / masked.sum() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(at.importance_weights(s, masked, 0.0) == 1.0)
    assert float(w.flatten()[s.flatten().argmax()]) == pytest.approx(float(w.max()))  # hardest token weighs most
    assert at.importance_target(torch.tensor([0.0, math.log(2), 50.0])).tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_config_rejects_inconsistent_switches() -> None:
    with pytest.raises(ValueError, match="adaptive_masking needs the importance estimator"):
        AtatConfig(adaptive_masking=True)
    with pytest.raises(ValueError, match="unbiased reweights adaptive masks"):
        AtatConfig(importance_head=True, unbiased=True)
    with pytest.raises(ValueError, match="curriculum moves the adaptive-masking focus"):
        AtatConfig(importance_head=True, curriculum=True)
    with pytest.raises(ValueError, match="curriculum_bounds"):
        AtatConfig(curriculum_bounds=(0.8, 0.2))
    with pytest.raises(ValueError, match="was built without the head"):
        make().configure(DiffusionConfig(atat=head_cfg()))


def test_noisy_masks_ignore_the_tokens_the_probe_hid() -> None:
    """importance_from noisy: two sequences that differ only where the probe x_t' is masked get the same
    masking probabilities (and the final mask stays inside the probe's masks, so every token the head saw
    is visible in x_t). The clean variant's probabilities do change: the test can tell them apart."""
    valid = torch.ones(4, L, dtype=torch.bool)
    a = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    probs = {}
    for source in ("noisy", "clean"):
        m = make(head_cfg(adaptive_masking=True, strength=3.0, importance_from=source))
        randomize_zero_init(m)
        m.train()
        am = m.atat_masking(a, valid, t, torch.Generator().manual_seed(5))
        hidden = torch.rand(a.shape, generator=torch.Generator().manual_seed(5)) < m.schedule.move_chance(t).sqrt()[:, None]
        if source == "noisy":
            assert am.where is not None and torch.equal(am.where, hidden)  # the probe's masks, rate m ** 0.5
            assert am.probs is not None and torch.all(am.probs[~hidden] == 0)  # final mask inside the probe's
            rate = (am.probs.sum(-1) / hidden.sum(-1))
            torch.testing.assert_close(rate, m.schedule.move_chance(t) / m.schedule.move_chance(t).sqrt())
        b = torch.where(hidden, (a + 1 + torch.randint(0, V - 1, a.shape, generator=torch.Generator().manual_seed(1))) % V, a)
        assert not torch.equal(a, b)
        bm = m.atat_masking(b, valid, t, torch.Generator().manual_seed(5))
        assert am.probs is not None and bm.probs is not None
        assert am.probs[am.probs > 0].std() > 0.02  # actually biased
        probs[source] = float((am.probs - bm.probs).abs().max())
    assert probs["noisy"] == 0.0 and probs["clean"] > 1e-3, probs


class _FixedImportance(torch.nn.Module):
    """A stand-in head: importance logits fixed per position (whatever the hidden states)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[None].expand(hidden.shape[0], -1)


@pytest.mark.parametrize("source", ["clean", "noisy"])
def test_unbiased_weights_give_the_plain_nelbo_on_a_context_free_toy(source: str) -> None:
    """A denoiser whose per-token CE l_i ignores the context (patched subs_ce) and the loglinear schedule:
    nelbo_weight(t) * move_chance(t) = 1 - eps, so the plain expected loss is (1 - eps) * mean(l), known.
    Adaptive masks with 'hard' focus and importance ranked like l mask the costly tokens more often: their
    loss is measurably above it; with unbiased weights it is back on it within MC error."""
    ell = torch.linspace(0.5, 3.0, L)  # (L,)
    known = (1 - 1e-3) * float(ell.mean())
    tokens = torch.zeros(256, L, dtype=torch.long)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    means = {}
    for unbiased in (False, True):
        m = make(head_cfg(adaptive_masking=True, strength=2.0, importance_from=source, unbiased=unbiased))
        m.importance = _FixedImportance(ell)
        m.subs_ce = lambda logits, toks: ell[None].expand(toks.shape[0], -1).clone()  # type: ignore[method-assign]
        m.train()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            losses = torch.tensor([float(m(tokens, valid, g).metrics["nelbo"]) for _ in range(30)])
        means[unbiased] = (float(losses.mean()), float(losses.std()) / len(losses) ** 0.5)
    (biased, se_b), (fixed, se_u) = means[False], means[True]
    assert abs(fixed - known) < 4 * se_u, (source, fixed, known, se_u)
    assert biased - known > 5 * se_b, (source, biased, known, se_b)


@pytest.mark.parametrize("move", [0.05, 0.5, 0.95])
def test_unbiased_weights_stay_below_e_to_the_strength_and_the_clip_binds_only_above_it(move: float) -> None:
    """rate / p_i <= r + (1 - r) e^strength <= e^strength for the rate-preserving probabilities (the docs' claim
    that max_weight is inactive while strength <= ln(max_weight)); with max_weight below that bound the clip
    caps exactly the rarely masked tokens and leaves the others at rate / p_i; unmasked tokens weigh 0."""
    strength = 3.0
    importance = torch.linspace(0, 1, 64)[None].repeat(2, 1)
    valid = torch.ones(2, 64, dtype=torch.bool)
    rate = torch.full((2,), move)
    probs = at.adaptive_mask_probs(rate, at.focus_bias(at.rank_quantiles(importance, valid), "hard", strength),
                                   valid, strength)
    masked = torch.ones_like(valid)
    masked[1, ::2] = False
    free = at.unbiased_weights(rate, probs, masked, max_weight=1e9)  # no clip
    assert float(free.max()) <= move + (1 - move) * math.exp(strength) + 1e-4
    assert float(free.max()) > 1.05  # the rarely masked tokens are weighted up
    torch.testing.assert_close(free[masked], (move / probs)[masked])
    assert torch.all(free[~masked] == 0)
    cap = 0.5 * float(free.max())
    clipped = at.unbiased_weights(rate, probs, masked, max_weight=cap)
    assert float(clipped.max()) == pytest.approx(cap)
    below = free < cap
    torch.testing.assert_close(clipped[below], free[below])
    assert bool((free > cap).any()) and torch.all(clipped[free > cap] == cap)
    assert torch.equal(at.unbiased_weights(rate, probs, masked, max_weight=math.exp(strength)), free)  # inactive
