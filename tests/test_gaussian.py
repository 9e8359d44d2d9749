"""Gaussian schedule tables: formulas, monotonicity, beta clipping, posterior coefficients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from difflm.families.diffusion_lm.gaussian import GAUSSIAN_SCHEDULES, MAX_BETA, GaussianSchedule, get_gaussian_schedule, posterior_coefs


@pytest.mark.parametrize("name", GAUSSIAN_SCHEDULES)
@pytest.mark.parametrize("T", [1, 2, 100, 2000])
def test_tables_monotone_and_clipped(name: str, T: int) -> None:
    s = get_gaussian_schedule(name, T)
    for table in (s.betas, s.alpha_bar, s.posterior_var, s.posterior_coef_x0, s.bound_weight):
        assert table.dtype == torch.float64 and table.shape == (T,)
        assert torch.all(torch.isfinite(table))
    assert torch.all((s.betas > 0) & (s.betas <= MAX_BETA))
    assert torch.all((s.alpha_bar > 0) & (s.alpha_bar <= 1))
    assert torch.all(s.alpha_bar[1:] < s.alpha_bar[:-1])
    torch.testing.assert_close(s.alpha_bar, torch.cumprod(1 - s.betas, 0), rtol=0, atol=0)
    torch.testing.assert_close(s.sqrt_alpha_bar**2 + s.sqrt_one_minus_alpha_bar**2, torch.ones(T, dtype=torch.float64))
    assert s.posterior_var[0] == 0 and s.posterior_coef_x0[0] == 1 and s.posterior_coef_xt[0] == 0
    assert torch.all(s.bound_weight > 0)


def test_sqrt_formula_and_last_beta_clip() -> None:
    T = 2000
    s = get_gaussian_schedule("sqrt", T)
    ab = lambda u: 1 - math.sqrt(u + 1e-4)  # noqa: E731
    assert s.alpha_bar[0].item() == pytest.approx(ab(1 / T) / ab(0), rel=1e-12)  # 0.98536
    assert s.alpha_bar[0].item() == pytest.approx(0.985359, abs=1e-6)
    assert s.alpha_bar[999].item() == pytest.approx(ab(1000 / T) / ab(0), rel=1e-10)
    assert s.betas[-1].item() == MAX_BETA  # alpha_bar(1) < 0: the clip makes the last step valid
    assert s.alpha_bar[-1].item() == pytest.approx(2.02e-7, rel=1e-2)


def test_cosine_and_linear_formulas() -> None:
    T = 1000
    cos = get_gaussian_schedule("cosine", T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cos.alpha_bar[499].item() == pytest.approx(f(500 / T) / f(0), rel=1e-10)
    assert cos.betas[-1].item() == MAX_BETA
    lin = get_gaussian_schedule("linear", T)
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    lin2 = get_gaussian_schedule("linear", 2000)  # rescaled by 1000/T: same total noise
    assert lin2.betas[-1].item() == pytest.approx(0.01)
    assert lin2.alpha_bar[-1].item() == pytest.approx(lin.alpha_bar[-1].item(), rel=0.05)


@pytest.mark.parametrize("t,s", [(5, 4), (50, 10), (1999, 0)])
def test_posterior_matches_gaussian_conditioning(t: int, s: int) -> None:
    """q(x_s | x_t, x0) from Bayes: x_s ~ N(sqrt(ab_s) x0, 1-ab_s), x_t | x_s ~ N(sqrt(a) x_s, 1-a), a = ab_t/ab_s."""
    sch = get_gaussian_schedule("sqrt", 2000)
    ab_t, ab_s = sch.alpha_bar[t], sch.alpha_bar[s]
    a = ab_t / ab_s
    precision = 1 / (1 - ab_s) + a / (1 - a)
    var = 1 / precision
    x0, xt = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-1.3, dtype=torch.float64)
    mean = var * (ab_s.sqrt() * x0 / (1 - ab_s) + a.sqrt() * xt / (1 - a))
    post = posterior_coefs(ab_t, ab_s)
    torch.testing.assert_close(post.var, var)
    torch.testing.assert_close(post.coef_x0 * x0 + post.coef_xt * xt, mean)
    if s == t - 1:  # the per-step tables are the same formula
        torch.testing.assert_close(sch.posterior_var[t], var)


def test_bound_weight_is_snr_difference() -> None:
    s = get_gaussian_schedule("cosine", 500)
    snr = s.snr()
    torch.testing.assert_close(s.bound_weight[1:], 0.5 * (snr[:-1] - snr[1:]), rtol=1e-9, atol=0)
    assert s.bound_weight[0].item() == pytest.approx(0.5 / s.betas[0].item())
    assert torch.all(snr[1:] < snr[:-1])


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown Gaussian schedule 'loglinear'; choose one of sqrt, cosine, linear"):
        get_gaussian_schedule("loglinear", 100)
    with pytest.raises(ValueError, match="T must be >= 1"):
        get_gaussian_schedule("sqrt", 0)
    with pytest.raises(ValueError, match="every beta must be in"):
        GaussianSchedule("bad", 3, torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match="every beta must be in"):
        GaussianSchedule("bad", 2, torch.tensor([0.1, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        GaussianSchedule("bad", 2, torch.tensor([0.1, 0.2]))


def test_device_copies_are_cached_float64() -> None:
    s = get_gaussian_schedule("sqrt", 10)
    a = s.on("alpha_bar", torch.device("cpu"))
    assert a is s.on("alpha_bar", torch.device("cpu")) and a.dtype == torch.float64
    torch.testing.assert_close(a, s.alpha_bar)
