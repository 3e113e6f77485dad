"""The frames of the diffusion ODE: ρ = σ/α, τ = α/σ, the one-step (Tweedie) estimate, and the
coordinates in which every first-order exponential-integrator step is an Euler step.

Each small formula that the solvers, samplers and adjoints share lives here once
(docs/maths.md §2 and §3.1):

    ρ_t = σ_t/α_t = e^{−λ_t},   τ_t = α_t/σ_t = e^{λ_t},   x̂0(x_t) = (x_t − σ_t ε(x_t, t))/α_t.

A :class:`Frame` (κ, ν, F, c, q) writes a first-order step from s to t < s as

    Y_t = Y_s + c (ν_t − ν_s) F(x_s, s) + sqrt(q(s, t)) ξ,   Y = x/κ,   ξ ~ N(0, I):

=========  ========  =========  ==============  ===  =====================
frame      κ_t       ν_t        F               c    noise variance q(s, t)
=========  ========  =========  ==============  ===  =====================
eps        α         ρ          ε(x, t)         1    0
data       σ         τ          x̂0(x, t)        1    0
eps-sde    α         ρ          ε(x, t)         2    ρ_s² − ρ_t²
data-sde   σ²/α      τ²         x̂0(x, t)        1    τ_t² − τ_s²
=========  ========  =========  ==============  ===  =====================

"eps" is DDIM / DPM-Solver-1, "data" DPM-Solver++-1, "eps-sde" SDE-DPM-Solver-1 (the SDE
step of AdjointDEIS), "data-sde" SDE-DPM-Solver++-1 (DDPM's ancestral step); Lu et al. 2022,
2023 (docs/maths.md §2.4 and §7.1). The AdjointDEIS adjoints are integrated in the same frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .schedules import VPSchedule

__all__ = [
    "rho_of_t",
    "tau_of_t",
    "tweedie_x0",
    "per_sample",
    "Frame",
    "FRAMES",
    "PARAMETERISATIONS",
    "get_frame",
]


def rho_of_t(schedule: VPSchedule, t) -> float:
    """ρ_t = σ_t/α_t = e^{−λ_t}, the time variable of the ODE in y = x/α; 0 at t = 0.

    (docs/maths.md §2.1)
    """
    return schedule.sigma(float(t)) / schedule.alpha(float(t))


def tau_of_t(schedule: VPSchedule, t) -> float:
    """τ_t = α_t/σ_t = e^{λ_t} = 1/ρ_t, the time variable of the data-prediction frames."""
    return schedule.alpha(float(t)) / schedule.sigma(float(t))


def tweedie_x0(schedule: VPSchedule, x: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
    """The one-step (Tweedie) estimate x̂0 = (x_t − σ_t ε)/α_t.

    x and eps: (B, ...); t: a float, or a (B,) tensor of per-sample times.
    """
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        alpha, sigma = per_sample(schedule.alpha(t), x), per_sample(schedule.sigma(t), x)
        return (x - sigma * eps) / alpha
    return (x - schedule.sigma(float(t)) * eps) / schedule.alpha(float(t))


def per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) vector shaped (B, 1, ..., 1) to broadcast against x (B, ...), in x's dtype."""
    return v.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


PARAMETERISATIONS = ("eps", "data")


@dataclass(frozen=True)
class Frame:
    """Coordinates in which a first-order exponential-integrator step is an Euler step.

    ``kappa(schedule, t)`` and ``nu(schedule, t)`` return floats; ``noise_var(schedule, s, t)``
    the variance of the noise added in Y over a step from s (noisier) to t, or ``None`` for an
    ODE frame. ``prediction`` is "eps" (F = ε) or "data" (F = x̂0).
    """

    name: str
    prediction: str
    c: float
    kappa: Callable
    nu: Callable
    noise_var: Callable | None = None

    @property
    def sde(self) -> bool:
        return self.noise_var is not None

    def check_times(self, ts: torch.Tensor) -> None:
        """The data frames have τ = α/σ = ∞ at t = 0: they need a grid ending at t > 0."""
        if self.prediction == "data" and float(ts[-1]) <= 0:
            raise ValueError(
                f"parameterisation 'data' needs ts[-1] > 0 (τ = α/σ is infinite at t = 0); "
                f"end the grid at schedule.t_min, got ts[-1] = {float(ts[-1])}"
            )

    def predict(self, model, x: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        """F(x, t): ε(x, t) for "eps" frames, x̂0 = (x − σ_t ε)/α_t for "data" frames."""
        eps = model.eps(x, t, cond)
        if self.prediction == "eps":
            return eps
        return tweedie_x0(model.schedule, x, t, eps)


def _alpha(sc: VPSchedule, t) -> float:
    return sc.alpha(float(t))


def _sigma(sc: VPSchedule, t) -> float:
    return sc.sigma(float(t))


FRAMES: dict[tuple[str, bool], Frame] = {
    ("eps", False): Frame("eps", "eps", 1.0, _alpha, rho_of_t),
    ("data", False): Frame("data", "data", 1.0, _sigma, tau_of_t),
    ("eps", True): Frame(
        "eps-sde",
        "eps",
        2.0,
        _alpha,
        rho_of_t,
        lambda sc, s, t: rho_of_t(sc, s) ** 2 - rho_of_t(sc, t) ** 2,
    ),
    ("data", True): Frame(
        "data-sde",
        "data",
        1.0,
        lambda sc, t: _sigma(sc, t) ** 2 / _alpha(sc, t),
        lambda sc, t: tau_of_t(sc, t) ** 2,
        lambda sc, s, t: tau_of_t(sc, t) ** 2 - tau_of_t(sc, s) ** 2,
    ),
}


def get_frame(parameterisation: str = "eps", *, sde: bool = False) -> Frame:
    """The :class:`Frame` for ``parameterisation`` ("eps" or "data") and ODE/SDE.

    (docs/maths.md §2.4)
    """
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(
            f"unknown parameterisation {parameterisation!r}; use 'eps' (noise prediction, "
            f"as in the paper) or 'data' (data prediction)"
        )
    return FRAMES[(parameterisation, bool(sde))]
