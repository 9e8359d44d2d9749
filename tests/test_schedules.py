"""Noise schedules: monotone, right endpoints, dsigma is the derivative of sigma, loglinear weight is 1/t."""

from __future__ import annotations

import math

import pytest
import torch

from difflm.schedules import MDLM_SCHEDULES, NoiseSchedule, get_schedule, move_chance

EPS = 1e-3

# sigma(0) and move_chance(1) of each schedule at eps = 1e-3.
ENDPOINTS: dict[str, tuple[float, float]] = {
    "loglinear": (0.0, 1 - EPS),
    "cosine": (0.0, 1 - EPS),
    "cosinesqr": (0.0, 1 - EPS),
    "sqrt": (0.0, 1 - EPS),
    "linear": (0.0, 1 - math.exp(-10.0)),  # sigma_max = 10
    "geometric": (1e-3, 1 - EPS),  # sigma_min = 1e-3, sigma_max = -log(eps)
}


def test_names_and_default() -> None:
    assert set(MDLM_SCHEDULES) == set(ENDPOINTS)
    assert MDLM_SCHEDULES[0] == "loglinear"


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(KeyError) as err:
        get_schedule("loglinaer")
    for name in MDLM_SCHEDULES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", MDLM_SCHEDULES)
def test_sigma_increasing_and_endpoints(name: str) -> None:
    sched = get_schedule(name, EPS)
    assert isinstance(sched, NoiseSchedule)
    t = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    sigma = sched.sigma(t)
    assert torch.all(sigma[1:] > sigma[:-1])
    assert torch.all(sched.dsigma(t) > 0)
    mc = move_chance(sched, t)
    assert torch.all((mc > 0) & (mc < 1))
    assert torch.all(mc[1:] > mc[:-1])
    sigma0, mc1 = ENDPOINTS[name]
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    assert sched.sigma(zero).item() == pytest.approx(sigma0, abs=1e-12)
    assert sched.move_chance(one).item() == pytest.approx(mc1, rel=1e-9)


@pytest.mark.parametrize("name", MDLM_SCHEDULES)
def test_dsigma_is_autograd_derivative(name: str) -> None:
    sched = get_schedule(name, EPS)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sched.sigma(t).sum(), t)
    torch.testing.assert_close(sched.dsigma(t.detach()), grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", MDLM_SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_keeps_dtype(name: str, dtype: torch.dtype) -> None:
    sched = get_schedule(name, EPS)
    t = torch.tensor([0.25, 0.5, 0.75], dtype=dtype)
    for fn in (sched.sigma, sched.dsigma, sched.move_chance, sched.nelbo_weight):
        out = fn(t)
        assert out.dtype == dtype and out.shape == t.shape
        assert torch.isfinite(out).all()


def test_loglinear_weight_is_one_over_t() -> None:
    sched = get_schedule("loglinear", EPS)
    t = torch.linspace(1e-3, 1.0, 1000, dtype=torch.float64)
    torch.testing.assert_close(sched.nelbo_weight(t), 1 / t, rtol=1e-10, atol=0)
    t32 = t.float()
    torch.testing.assert_close(sched.nelbo_weight(t32), 1 / t32, rtol=1e-4, atol=0)
    # ... and move_chance is linear in t with slope 1 - eps
    torch.testing.assert_close(sched.move_chance(t), (1 - EPS) * t, rtol=1e-10, atol=1e-15)


def test_eps_sets_final_mask_share() -> None:
    one = torch.ones(1, dtype=torch.float64)
    for name in ("loglinear", "cosine", "cosinesqr", "sqrt"):
        assert get_schedule(name, 0.1).move_chance(one).item() == pytest.approx(0.9, rel=1e-9)


def test_sqrt_formula() -> None:
    sched = get_schedule("sqrt", EPS)
    t = torch.tensor([0.04, 0.25, 0.81], dtype=torch.float64)
    torch.testing.assert_close(sched.move_chance(t), (1 - EPS) * t.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.nelbo_weight(t), 1 / (2 * t), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", MDLM_SCHEDULES)
def test_every_schedule_masks_almost_everything_at_t1(name: str) -> None:
    """The NELBO is only a bound (and only comparable across schedules) when x_1 is ~all mask."""
    sched = get_schedule(name, EPS)
    assert float(sched.move_chance(torch.tensor(1.0, dtype=torch.float64))) >= 1 - EPS - 1e-9
