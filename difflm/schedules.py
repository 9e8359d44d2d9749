"""Noise schedules of absorbing-state (masked) diffusion, as in MDLM (Sahoo et al., 2024).

A schedule maps time t in [0, 1] to the *total noise* sigma(t) (the integral of the
rate) and to the rate dsigma(t) = d sigma / dt. A token is masked at time t with
probability ``move_chance(t) = 1 - exp(-sigma(t))``, and the continuous-time NELBO
weights the masked-token cross-entropy by ``dsigma(t) / expm1(sigma(t))``
(= 1/t exactly for loglinear).

Everything is plain tensor maths on python-float constants, so a schedule works on
any device and dtype and keeps the dtype of ``t``. The formulas follow
kuleshov-group/mdlm ``noise_schedule.py``; ``sqrt`` is this project's addition.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor


class NoiseSchedule(ABC):
    """sigma(t) (total noise) and dsigma(t) (its time derivative), t in [0, 1]."""

    name: str = ""

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = float(eps)

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Total noise at time t; increasing in t."""

    @abstractmethod
    def dsigma(self, t: Tensor) -> Tensor:
        """Rate d sigma / dt at time t."""

    def move_chance(self, t: Tensor) -> Tensor:
        """Probability that a token is masked at time t: 1 - exp(-sigma(t)) (expm1 keeps small t exact)."""
        return -torch.expm1(-self.sigma(t))

    def nelbo_weight(self, t: Tensor) -> Tensor:
        """Weight of the masked-token cross-entropy in the continuous-time NELBO: dsigma / expm1(sigma)."""
        return self.dsigma(t) / torch.expm1(self.sigma(t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps})"


class LogLinear(NoiseSchedule):
    """Masked share grows linearly in t: move_chance(t) = (1 - eps) t. MDLM's default; weight = 1/t."""

    name = "loglinear"

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def dsigma(self, t: Tensor) -> Tensor:
        return (1 - self.eps) / (1 - (1 - self.eps) * t)


class Linear(NoiseSchedule):
    """sigma linear in t from sigma_min to sigma_max (eps unused). move_chance(1) = 1 - e^-10."""

    name = "linear"

    def __init__(self, eps: float = 1e-3, sigma_min: float = 0.0, sigma_max: float = 10.0) -> None:
        super().__init__(eps)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min + t * (self.sigma_max - self.sigma_min)

    def dsigma(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self.sigma_max - self.sigma_min)


class Cosine(NoiseSchedule):
    """Unmasked share eps + (1 - eps) cos(pi t / 2): slow masking early, fast late."""

    name = "cosine"

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.log(self.eps + (1 - self.eps) * torch.cos(t * (math.pi / 2)))

    def dsigma(self, t: Tensor) -> Tensor:
        cos = (1 - self.eps) * torch.cos(t * (math.pi / 2))
        sin = (1 - self.eps) * torch.sin(t * (math.pi / 2))
        return (math.pi / 2) * sin / (cos + self.eps)


class CosineSqr(NoiseSchedule):
    """Unmasked share eps + (1 - eps) cos^2(pi t / 2)."""

    name = "cosinesqr"

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.log(self.eps + (1 - self.eps) * torch.cos(t * (math.pi / 2)) ** 2)

    def dsigma(self, t: Tensor) -> Tensor:
        cos2 = (1 - self.eps) * torch.cos(t * (math.pi / 2)) ** 2
        sin = (1 - self.eps) * torch.sin(t * math.pi)  # d/dt cos^2(pi t/2) = -(pi/2) sin(pi t)
        return (math.pi / 2) * sin / (cos2 + self.eps)


class Geometric(NoiseSchedule):
    """sigma = sigma_min^(1-t) sigma_max^t. Endpoints: sigma(0) = 1e-3, move_chance(1) = 1 - eps.

    MDLM's default sigma_max = 1 masks only 1 - 1/e = 63% of tokens at t = 1: the all-mask
    prior then does not match q(x_1 | x_0), the NELBO misses an (infinite) prior term and
    looks far better than it is, so a sweep would crown it unfairly. Here sigma_max defaults
    to -log(eps), the same terminal masking as loglinear/cosine/sqrt.
    """

    name = "geometric"

    def __init__(self, eps: float = 1e-3, sigma_min: float = 1e-3, sigma_max: float | None = None) -> None:
        super().__init__(eps)
        sigma_max = -math.log(eps) if sigma_max is None else sigma_max
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_min, self._log_max = math.log(self.sigma_min), math.log(self.sigma_max)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.exp((1 - t) * self._log_min + t * self._log_max)

    def dsigma(self, t: Tensor) -> Tensor:
        return self.sigma(t) * (self._log_max - self._log_min)


class Sqrt(NoiseSchedule):
    """move_chance(t) = (1 - eps) sqrt(t): masks fast early. dsigma is infinite at t = 0 (sample t >= sampling_eps)."""

    name = "sqrt"

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.log1p(-(1 - self.eps) * torch.sqrt(t))

    def dsigma(self, t: Tensor) -> Tensor:
        root = torch.sqrt(t)
        return (1 - self.eps) / (2 * root * (1 - (1 - self.eps) * root))


_SCHEDULES: dict[str, Callable[[float], NoiseSchedule]] = {
    cls.name: cls for cls in (LogLinear, Linear, Cosine, CosineSqr, Geometric, Sqrt)
}

#: names accepted by the mdlm family, default first
MDLM_SCHEDULES: tuple[str, ...] = tuple(_SCHEDULES)


def get_schedule(name: str, eps: float = 1e-3) -> NoiseSchedule:
    """Schedule ``name`` with epsilon ``eps``; KeyError listing the valid names otherwise."""
    try:
        factory = _SCHEDULES[name]
    except KeyError:
        raise KeyError(f"unknown noise schedule {name!r}; choose one of {', '.join(_SCHEDULES)}") from None
    return factory(eps)


def sample_times(
    n: int,
    *,
    sampling_eps: float,
    antithetic: bool,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training times t ~ U[sampling_eps, 1], (n,), drawn on ``device`` from ``generator``.

    Antithetic: t_i = (u + i/n) mod 1 from a single u, so the batch covers [0, 1) evenly and the
    loss variance across steps drops (MDLM's low-discrepancy sampler). Shared by the masked families."""
    if antithetic:
        u = torch.rand(1, generator=generator, device=device, dtype=dtype)  # (1,)
        u = (u + torch.arange(n, device=device, dtype=dtype) / n) % 1  # (n,)
    else:
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)  # (n,)
    return (1 - sampling_eps) * u + sampling_eps  # (n,)


def move_chance(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """1 - exp(-sigma(t)): the masking probability at time t (same as ``schedule.move_chance(t)``)."""
    return schedule.move_chance(t)
