"""val/nll covers the whole masking-rate range (0, 1]: checked against an exact enumeration of every mask pattern.

For a model without time conditioning the masked-diffusion NELBO of a sequence with n counted
positions is, exactly,

    integral over m in (0, 1] of (1/m) sum over masks M of m^|M| (1-m)^(n-|M|) sum_{j in M} CE_j(M) dm
    = sum over masks M of B(|M|, n - |M| + 1) sum_{j in M} CE_j(M),

(the Beta integral of m^(|M|-1) (1-m)^(n-|M|)), with CE_j(M) = -log p(x_j | x with M masked).
On 8-token blocks (6 counted positions: 63 non-empty masks) that is 63 forwards per sequence.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy.special import betainc, beta

from difflm.evaluation import counted_positions, val_pass
from difflm.families.mdlm.model import MDLM
from difflm.models import Backbone
from difflm.schedules import get_schedule
from tests.helpers import randomize_zero_init

V, L, N = 12, 8, 192


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _toy() -> tuple[MDLM, np.ndarray]:
    torch.manual_seed(0)
    m = MDLM(Backbone(V + 1, V + 1, d_model=16, n_layers=1, n_heads=2, cond_dim=8), V, get_schedule("loglinear"),
             time_conditioning=False)
    randomize_zero_init(m, scale=0.5)
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, V, (N, L), generator=gen).numpy()
    return m.eval(), blocks


def exact_nelbo(model: MDLM, blocks: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> float:
    """Nats per counted token of the NELBO integrated over m in [lo, hi], by enumerating every mask pattern."""
    tokens = torch.from_numpy(blocks.astype(np.int64))  # (N, L)
    counted = counted_positions(tokens)[0]  # (L,)
    positions = [j for j in range(L) if counted[j]]
    n = len(positions)
    total = 0.0
    for size in range(1, n + 1):
        # integral over [lo, hi] of m^(size-1) (1-m)^(n-size) dm (regularised incomplete Beta times Beta)
        weight = beta(size, n - size + 1) * (betainc(size, n - size + 1, hi) - betainc(size, n - size + 1, lo))
        for subset in itertools.combinations(positions, size):
            mask = torch.zeros(L, dtype=torch.bool)
            mask[list(subset)] = True
            xm = torch.where(mask, model.mask_id, tokens)  # (N, L)
            with torch.no_grad():
                ce = model.subs_ce(model.backbone(xm, None), tokens)  # (N, L)
            total += weight * float(ce[:, mask].double().sum())
    return total / (len(blocks) * n)


def test_val_nll_equals_the_exact_nelbo_over_all_of_0_1() -> None:
    model, blocks = _toy()
    full = exact_nelbo(model, blocks)
    truncated = exact_nelbo(model, blocks, 1e-3, 1 - 1e-3)  # what val/nll integrated before
    draws = val_pass(model, blocks, 0, len(blocks), batch_size=N, samples=64, seed=7, device="cpu")
    print(f"val_pass {draws.nll:.5f} ± {draws.se:.5f}; exact (0, 1] {full:.5f}; exact [0.001, 0.999] {truncated:.5f}")
    assert abs(draws.nll - full) <= 3 * draws.se, (draws.nll, draws.se, full)
    assert full - truncated > 0.005  # the old truncation was a real bias, in the diffusion family's favour
    # (the mask draws' noise, SE ~0.04 here, hides a 0.009 bias; the next test pins the rates down exactly)
    assert math.isfinite(draws.se) and draws.se < 0.06


def test_rates_and_weights_integrate_over_all_of_0_1() -> None:
    """The rates and weights alone, without mask noise: mean_k weight_k * f(m_k) over many sequences equals
    the integral of f over (0, 1] to 2e-4 (stratified in u), for f = (1 - m)^p (integral 1 / (p + 1)), which
    puts its mass near 0 for large p. The old range [0.001, 0.999] missed ~0.001 * f(0) = 0.001 of it."""
    from difflm.evaluation import make_val_noise

    noise = make_val_noise(list(range(20000)), 64, 1, seed=3)
    for power in (0, 1, 5):
        est = float((noise.weights * (1 - noise.rates) ** power).mean())
        assert est == pytest.approx(1 / (power + 1), abs=2e-4), power
    assert float(noise.rates.min()) > 0 and float(noise.rates.max()) <= 1
    assert float(noise.rates.min()) < 1e-3 and float(noise.rates.max()) > 0.999  # the whole range is visited
