"""SEDD's discrete diffusion graphs (Lou et al. 2024): how tokens are corrupted, the denoising score
entropy (DSE) and the reverse-process pieces the samplers need.

A graph is a rate matrix Q over the ``dim`` states a position can take; the forward process at
total noise sigma is ``exp(sigma Q)``. The network predicts the *concrete score*
``s_y(x_t) = p_t(y) / p_t(x_t)`` for every state y at every position (one token changed), as a
log: the score of the current state is 1 (log 0) by construction.

absorb   states: V tokens + MASK (id V). A token jumps to MASK with probability 1 - e^-sigma and stays
         there. Only masked positions carry information; the network output is shifted by
         ``-log(expm1(sigma)) - log(V)`` ("scale_by_sigma" in the reference), so an output of zeros
         is the uniform guess at the right scale and the network itself need not know sigma.
uniform  states: the V tokens. A token is resampled uniformly with probability 1 - e^-sigma
         (Q = 11^T / V - I). Every position can be corrupted, so every position is scored.

DSE of one position with log score s and the true conditional ratios c_y = p_t(y|x0)/p_t(x_t|x0):
``sum_{y != x_t} w_y (e^{s_y} - c_y s_y + c_y (log c_y - 1))`` with the graph's weights w
(absorb: 1 from MASK to each token; uniform: 1/V). Each summand equals ``c phi(s - log c)`` with
``phi(u) = e^u - 1 - u >= 0``: zero exactly at the true ratios and positive elsewhere. The
implementation uses that form (no cancellation between large terms at small sigma). Everything
here is plain tensor maths; the reference is louaaron/Score-Entropy-Discrete-Diffusion
``graph_lib.py`` (formulas re-derived, not copied).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def _phi(u: Tensor) -> Tensor:
    """e^u - 1 - u, >= 0 with equality at u = 0; expm1 keeps it accurate near 0. -inf -> +inf."""
    return torch.expm1(u) - u


class Graph(ABC):
    """A discrete diffusion graph over ``dim`` states; ``vocab_size`` of them are real tokens."""

    name: str = ""
    absorb: bool = False

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)

    @property
    @abstractmethod
    def dim(self) -> int:
        """Number of states (V, plus the MASK for absorb)."""

    @property
    def input_vocab(self) -> int:
        """Ids the network reads (= dim)."""
        return self.dim

    @abstractmethod
    def corrupt(self, x0: Tensor, noised: Tensor, random_ids: Tensor | None) -> Tensor:
        """x_t (B, L) from clean x0 (B, L) given the positions that jump (B, L) bool.

        random_ids (B, L): the uniform graph's new tokens (ids in [0, V)); absorb ignores them."""

    @property
    def needs_random_ids(self) -> bool:
        return False

    @abstractmethod
    def log_score(self, out: Tensor, xt: Tensor, sigma: Tensor) -> Tensor:
        """Network output (B, L, V) -> log concrete score (B, L, dim), 0 at each position's own state.

        sigma (B,): total noise of x_t."""

    @abstractmethod
    def score_entropy(self, log_score: Tensor, xt: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
        """DSE per position (B, L), without the time weight sigma'(t); 0 where a position is not scored."""

    @abstractmethod
    def move_weights(self, x: Tensor, score: Tensor, rate: Tensor) -> Tensor:
        """Euler: probabilities (M, dim) of jumping from state x (M,) to each other state in one step,
        ``rate`` (M,) = dt * sigma'(t) (the reverse rate is Q^T-weighted score); 0 at x itself."""

    @abstractmethod
    def tweedie(self, x: Tensor, score: Tensor, dsigma: Tensor) -> Tensor:
        """Tweedie tau-leaping: unnormalised probabilities (M, dim) of the state at sigma - dsigma given
        state x (M,) and score (M, dim) at sigma (staggered score times the transposed transition)."""

    @abstractmethod
    def limit(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
        """A draw from the limiting distribution (all MASK, or uniform tokens)."""


class Absorbing(Graph):
    """Tokens jump to MASK (id ``vocab_size``) and stay; see the module docstring."""

    name = "absorb"
    absorb = True

    @property
    def dim(self) -> int:
        return self.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def corrupt(self, x0: Tensor, noised: Tensor, random_ids: Tensor | None) -> Tensor:
        return torch.where(noised, self.mask_id, x0)  # (B, L)

    def log_score(self, out: Tensor, xt: Tensor, sigma: Tensor) -> Tensor:
        shift = torch.log(torch.expm1(sigma)).to(out.dtype)[:, None, None] + math.log(self.vocab_size)  # (B, 1, 1)
        s = torch.cat([out - shift, torch.zeros_like(out[..., :1])], dim=-1)  # (B, L, V+1)
        return s.scatter(-1, xt[..., None], 0.0)  # own state: score 1

    def score_entropy(self, log_score: Tensor, xt: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
        """At masked positions: ``sum_{y != MASK} e^{s_y} - r s_{x0} + r (log r - 1)``, r = 1 / expm1(sigma),
        computed as ``r (expm1(logsumexp(a)) - a_{x0})`` with a = s + log expm1(sigma) (the normalised
        log score: log p(y | x_t) when the model is right)."""
        masked = xt == self.mask_id  # (B, L)
        log_em1 = torch.log(torch.expm1(sigma)).to(log_score.dtype)[:, None, None]  # (B, 1, 1)
        a = log_score[..., : self.vocab_size] + log_em1  # (B, L, V)
        lse = a.logsumexp(dim=-1)  # (B, L)
        a_x0 = a.gather(-1, x0.clamp(max=self.vocab_size - 1)[..., None]).squeeze(-1)  # (B, L)
        r = torch.exp(-log_em1[:, :, 0])  # (B, 1)
        dse = r * (torch.expm1(lse) - a_x0)  # (B, L)
        return torch.where(masked, dse, 0.0)

    def move_weights(self, x: Tensor, score: Tensor, rate: Tensor) -> Tensor:
        """From MASK: rate * score_y to every token; from a token: no move (absorbing)."""
        w = score[:, : self.vocab_size] * rate[:, None]  # (M, V)
        w = torch.where((x == self.mask_id)[:, None], w, 0.0)
        return torch.cat([w, torch.zeros_like(w[:, :1])], dim=-1)  # (M, V+1)

    def tweedie(self, x: Tensor, score: Tensor, dsigma: Tensor) -> Tensor:
        """From MASK: token y with weight expm1(dsigma) score_y, stay masked with 1 - expm1(dsigma) sum_y score_y
        (clamped at 0); from a token: stay. (Staggered score x transposed transition, simplified.)"""
        em1 = torch.expm1(dsigma)[:, None]  # (M, 1)
        tokens = em1 * score[:, : self.vocab_size]  # (M, V)
        stay = (1 - tokens.sum(dim=-1, keepdim=True)).clamp_min(0.0)  # (M, 1)
        probs = torch.cat([tokens, stay], dim=-1)  # (M, V+1)
        own = torch.zeros_like(probs).scatter_(-1, x[:, None], 1.0)
        return torch.where((x == self.mask_id)[:, None], probs, own)

    def limit(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
        return torch.full(shape, self.mask_id, dtype=torch.long, device=device)


class Uniform(Graph):
    """Tokens are resampled uniformly over the V tokens; Q = 11^T / V - I."""

    name = "uniform"

    @property
    def dim(self) -> int:
        return self.vocab_size

    @property
    def needs_random_ids(self) -> bool:
        return True

    def corrupt(self, x0: Tensor, noised: Tensor, random_ids: Tensor | None) -> Tensor:
        if random_ids is None:
            raise ValueError("the uniform graph needs random_ids to corrupt tokens")
        return torch.where(noised, random_ids, x0)  # (B, L); a draw may equal x0 (probability 1/V)

    def log_score(self, out: Tensor, xt: Tensor, sigma: Tensor) -> Tensor:
        return out.scatter(-1, xt[..., None], 0.0)  # (B, L, V)

    def log_ratios(self, xt: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
        """log c_y = log p_t(y | x0) / p_t(x_t | x0), (B, L, V) (0 at y = x_t).

        x_t == x0: every other y has c = e / (e + V) with e = expm1(sigma);
        x_t != x0: c = 1 + V / e at y = x0 and 1 at the other tokens."""
        V = self.vocab_size
        log_e = torch.log(torch.expm1(sigma))[:, None, None]  # (B, 1, 1)
        log_ratio = log_e - torch.logaddexp(log_e, torch.full_like(log_e, math.log(V)))  # log e/(e+V), (B, 1, 1)
        same = (xt == x0)[..., None]  # (B, L, 1)
        base = torch.where(same, log_ratio, 0.0).expand(*xt.shape, V)  # (B, L, V)
        at_x0 = torch.where(same, log_ratio, -log_ratio)  # log(1 + V/e) = -log(e/(e+V)), (B, L, 1)
        return base.scatter(-1, x0[..., None], at_x0).scatter(-1, xt[..., None], 0.0)

    def score_entropy(self, log_score: Tensor, xt: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
        """``(1/V) sum_{y != x_t} c_y phi(s_y - log c_y)`` at every position (the reference's
        pos - neg + const of ``Uniform.score_entropy``, regrouped so that each summand is >= 0)."""
        log_c = self.log_ratios(xt, x0, sigma.to(log_score.dtype))  # (B, L, V)
        terms = log_c.exp() * _phi(log_score - log_c)  # (B, L, V)
        terms = terms.scatter(-1, xt[..., None], 0.0)
        return terms.sum(dim=-1) / self.vocab_size  # (B, L)

    def move_weights(self, x: Tensor, score: Tensor, rate: Tensor) -> Tensor:
        w = score * (rate[:, None] / self.vocab_size)  # (M, V): Q^T off-diagonal is 1/V
        return w.scatter(-1, x[:, None], 0.0)

    def tweedie(self, x: Tensor, score: Tensor, dsigma: Tensor) -> Tensor:
        """Staggered score ``e^{ds} s - (e^{ds} - 1)/V sum(s)`` times the uniform transition over dsigma
        (``(1 - e^{-ds})/V`` to every state plus e^{-ds} at x), clamped at 0."""
        V = self.vocab_size
        ds = dsigma[:, None]  # (M, 1)
        stag = score * torch.exp(ds) - torch.expm1(ds) / V * score.sum(dim=-1, keepdim=True)  # (M, V)
        trans = (-torch.expm1(-ds) / V).expand_as(score).clone()  # (M, V)
        trans.scatter_add_(-1, x[:, None], torch.exp(-ds))
        return (stag * trans).clamp_min(0.0)

    def limit(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
        return torch.randint(0, self.vocab_size, shape, generator=generator, device=device)


GRAPHS: dict[str, type[Graph]] = {g.name: g for g in (Absorbing, Uniform)}


def get_graph(name: str, vocab_size: int) -> Graph:
    """Graph ``name`` (absorb | uniform) over ``vocab_size`` tokens; KeyError listing the valid ones."""
    try:
        return GRAPHS[name](vocab_size)
    except KeyError:
        raise KeyError(f"unknown sedd graph {name!r}; choose one of {', '.join(GRAPHS)}") from None
