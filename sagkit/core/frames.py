"""The frames of the diffusion ODE: ρ = σ/α, τ = α/σ, the one-step (Tweedie) estimate, and the
coordinates in which every first-order exponential-integrator step is an Euler step.

Each small formula that the solvers, samplers and adjoints share lives here once
(docs/maths.md §2 and §3.1):

    ρ_t = σ_t/α_t = e^{−λ_t},   τ_t = α_t/σ_t = e^{λ_t},   x̂0(x_t) = (x_t − σ_t ε(x_t, t))/α_t.

A :class:`Frame` (κ, ν, F, c, q) writes a first-order step from s to t < s as

    Y_t = Y_s + c (ν_t − ν_s) F(x_s, s) + sqrt(q(s, t)) ξ,   Y = x/κ,   ξ ~ N(0, I):

=========  ========  ============  ==============  ===  =====================
frame      κ_t       ν_t           F               c    noise variance q(s, t)
=========  ========  ============  ==============  ===  =====================
eps        α         ρ             ε(x, t)         1    0
data       σ         τ             x̂0(x, t)        1    0
velocity   α + σ     σ/(α + σ)     v = ε − x̂0      1    0
eps-sde    α         ρ             ε(x, t)         2    ρ_s² − ρ_t²
data-sde   σ²/α      τ²            x̂0(x, t)        1    τ_t² − τ_s²
=========  ========  ============  ==============  ===  =====================

"eps" is DDIM / DPM-Solver-1, "data" DPM-Solver++-1, "eps-sde" SDE-DPM-Solver-1 (the SDE
step of AdjointDEIS), "data-sde" SDE-DPM-Solver++-1 (DDPM's ancestral step); Lu et al. 2022,
2023 (docs/maths.md §2.4 and §7.1). The AdjointDEIS adjoints are integrated in the same frames.
"velocity" is the frame of flow matching: for the rectified flow (α = 1 − σ) it is x over σ
with the network's velocity as slope, and its Euler step is the DDIM step of any schedule; it
stays finite where α = 0 (docs/maths.md §2.5). :func:`ode_frame` is the frame a schedule's
probability-flow ODE is solved in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .schedules import Schedule

__all__ = [
    "rho_of_t",
    "tau_of_t",
    "tweedie_x0",
    "per_sample",
    "velocity_of",
    "Frame",
    "FRAMES",
    "PARAMETERISATIONS",
    "get_frame",
    "ode_frame",
]


def rho_of_t(schedule: Schedule, t) -> float:
    """ρ_t = σ_t/α_t = e^{−λ_t}, the time variable of the ODE in y = x/α; 0 at t = 0.

    (docs/maths.md §2.1)
    """
    return schedule.sigma(float(t)) / schedule.alpha(float(t))


def tau_of_t(schedule: Schedule, t) -> float:
    """τ_t = α_t/σ_t = e^{λ_t} = 1/ρ_t, the time variable of the data-prediction frames."""
    return schedule.alpha(float(t)) / schedule.sigma(float(t))


def tweedie_x0(schedule: Schedule, x: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
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


def velocity_of(model, x: torch.Tensor, t, cond=None) -> torch.Tensor:
    """v(x, t) = ε − x̂0, shape of x: ``model.velocity`` where the model has one (a
    flow-matching network, or the mixture: finite where α = 0), else from ε as
    ε − (x − σ_t ε)/α_t.

    (docs/maths.md §2.5)
    """
    velocity = getattr(model, "velocity", None)
    if velocity is not None:
        return velocity(x, t, cond)
    eps = model.eps(x, t, cond)
    return eps - tweedie_x0(model.schedule, x, t, eps)


PARAMETERISATIONS = ("eps", "data", "velocity")


@dataclass(frozen=True)
class Frame:
    """Coordinates in which a first-order exponential-integrator step is an Euler step.

    ``kappa(schedule, t)`` and ``nu(schedule, t)`` return floats, ``t_of_nu(schedule, ν)``
    inverts ν; ``noise_var(schedule, s, t)`` the variance of the noise added in Y over a step
    from s (noisier) to t, or ``None`` for an ODE frame. ``prediction`` is "eps" (F = ε),
    "data" (F = x̂0) or "velocity" (F = v = ε − x̂0).
    """

    name: str
    prediction: str
    c: float
    kappa: Callable
    nu: Callable
    t_of_nu: Callable
    noise_var: Callable | None = None

    @property
    def sde(self) -> bool:
        return self.noise_var is not None

    def check_times(self, ts: torch.Tensor, schedule: Schedule | None = None) -> None:
        """The data frames have τ = α/σ = ∞ at t = 0: they need a grid ending at t > 0. The
        ε frames (and the data SDE frame, κ = σ²/α) have ρ = σ/α = ∞ where α = 0 (t = 1 of a
        flow schedule): they need a grid starting below it."""
        if self.prediction == "data" and float(ts[-1]) <= 0:
            raise ValueError(
                f"parameterisation 'data' needs ts[-1] > 0 (τ = α/σ is infinite at t = 0); "
                f"end the grid at schedule.t_min, got ts[-1] = {float(ts[-1])}"
            )
        needs_alpha = self.prediction == "eps" or self.sde
        if needs_alpha and schedule is not None and not schedule.alpha(float(ts[0])) > 0:
            raise ValueError(
                f"the {self.name!r} frame needs α > 0 at ts[0] (ρ = σ/α is infinite where α = 0, "
                f"at t = {float(ts[0])} of {schedule!r}); use parameterisation 'velocity' "
                "(the ODE of a flow schedule) or start the grid below that time"
            )

    def step_length(self, schedule: Schedule, t: float, s: float) -> float:
        """The step length a multistep ratio r = h_prev/h is measured in: h = λ_s − λ_t in the
        exponential-integrator frames, h = ν_s − ν_t in the velocity frame (Adams–Bashforth
        in ν). Infinite where λ is (t = 0, or α = 0).

        (docs/maths.md §6.3)
        """
        if self.prediction == "velocity":
            return self.nu(schedule, s) - self.nu(schedule, t)
        return float(schedule.lam(float(s)) - schedule.lam(float(t)))

    def predict(self, model, x: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        """F(x, t): ε(x, t) for "eps" frames, x̂0 = (x − σ_t ε)/α_t for "data" frames, the
        velocity v(x, t) (:func:`velocity_of`) for the "velocity" frame."""
        if self.prediction == "velocity":
            return velocity_of(model, x, t, cond)
        eps = model.eps(x, t, cond)
        if self.prediction == "eps":
            return eps
        return tweedie_x0(model.schedule, x, t, eps)

    def euler(self, schedule, x: torch.Tensor, s: float, t: float, pred: torch.Tensor):
        """The first-order step from s to t with slope F = ``pred``, without noise:
        x_t = κ_t (x_s/κ_s + c (ν_t − ν_s) F) (DDIM in the "eps" and "velocity" frames).

        (docs/maths.md §2.4)
        """
        y = x / self.kappa(schedule, s)
        return self.kappa(schedule, t) * (
            y + (self.c * (self.nu(schedule, t) - self.nu(schedule, s))) * pred
        )

    def x0(self, schedule, x: torch.Tensor, t: float, pred: torch.Tensor) -> torch.Tensor:
        """The one-step estimate x̂0 from F = ``pred`` at (x, t): (x − σ_t ε)/α_t for "eps",
        (x − σ_t v)/(α_t + σ_t) for "velocity", F itself for "data"; shape of x.

        (docs/maths.md §2.5)
        """
        if self.prediction == "data":
            return pred
        weight = _x0_weight(self.prediction, schedule, t)
        return (x - schedule.sigma(float(t)) * pred) / weight

    def pred_of_x0(self, schedule, x: torch.Tensor, t: float, x0: torch.Tensor) -> torch.Tensor:
        """The F at x whose one-step estimate is ``x0`` (the inverse of :meth:`x0` in F):
        (x − α_t x0)/σ_t for "eps", (x − (α_t + σ_t) x0)/σ_t for "velocity".

        (docs/maths.md §2.5)
        """
        if self.prediction == "data":
            return x0
        weight = _x0_weight(self.prediction, schedule, t)
        return (x - weight * x0) / schedule.sigma(float(t))

    def shift_x0(self, schedule, t: float, pred: torch.Tensor, delta: torch.Tensor):
        """The F at the same x whose one-step estimate is x̂0 + Δ: F − (w_t/σ_t) Δ, w_t the
        weight of x̂0 in x = w_t x̂0 + σ_t F (α_t for ε, α_t + σ_t for the velocity).

        (docs/maths.md §8.9)
        """
        if self.prediction == "data":
            return pred + delta
        weight = _x0_weight(self.prediction, schedule, t)
        return pred - (weight / schedule.sigma(float(t))) * delta

    def eps_difference(self, schedule, t: float, difference: torch.Tensor) -> torch.Tensor:
        """A difference of two F's at the same x, in ε units: itself for "eps", (α_t/(α_t +
        σ_t)) Δv for "velocity" (ε = (x + α v)/(α + σ)), −(α_t/σ_t) Δx̂0 for "data".

        (docs/maths.md §8.3)
        """
        if self.prediction == "eps":
            return difference
        alpha, sigma = schedule.alpha(float(t)), schedule.sigma(float(t))
        if self.prediction == "velocity":
            return (alpha / (alpha + sigma)) * difference
        return (-alpha / sigma) * difference


def _x0_weight(prediction: str, sc: Schedule, t) -> float:
    """The weight of x̂0 in x = w x̂0 + σ_t F: α_t for ε, α_t + σ_t for the velocity."""
    alpha = sc.alpha(float(t))
    return alpha if prediction == "eps" else alpha + sc.sigma(float(t))


def _alpha(sc: Schedule, t) -> float:
    return sc.alpha(float(t))


def _sigma(sc: Schedule, t) -> float:
    return sc.sigma(float(t))


def _t_of_rho(sc: Schedule, rho: float) -> float:
    return 0.0 if rho == 0 else sc.t_of_lam(-math.log(rho))


def _t_of_tau(sc: Schedule, tau: float) -> float:
    return 1.0 if tau == 0 else sc.t_of_lam(math.log(tau))


def _velocity_nu(sc: Schedule, t) -> float:
    """ν_t = σ_t/(α_t + σ_t): 0 at t = 0, 1 where α = 0."""
    sigma = _sigma(sc, t)
    return sigma / (_alpha(sc, t) + sigma)


def _t_of_velocity_nu(sc: Schedule, nu: float) -> float:
    """The inverse of ν = σ/(α + σ) = 1/(1 + e^λ): λ = log((1 − ν)/ν), ±∞ at the ends."""
    if nu <= 0:
        return 0.0
    if nu >= 1:
        return sc.t_of_lam(-math.inf)
    return sc.t_of_lam(math.log1p(-nu) - math.log(nu))


FRAMES: dict[tuple[str, bool], Frame] = {
    ("eps", False): Frame("eps", "eps", 1.0, _alpha, rho_of_t, _t_of_rho),
    ("data", False): Frame("data", "data", 1.0, _sigma, tau_of_t, _t_of_tau),
    ("velocity", False): Frame(
        "velocity",
        "velocity",
        1.0,
        lambda sc, t: _alpha(sc, t) + _sigma(sc, t),
        _velocity_nu,
        _t_of_velocity_nu,
    ),
    ("eps", True): Frame(
        "eps-sde",
        "eps",
        2.0,
        _alpha,
        rho_of_t,
        _t_of_rho,
        lambda sc, s, t: rho_of_t(sc, s) ** 2 - rho_of_t(sc, t) ** 2,
    ),
    ("data", True): Frame(
        "data-sde",
        "data",
        1.0,
        lambda sc, t: _sigma(sc, t) ** 2 / _alpha(sc, t),
        lambda sc, t: tau_of_t(sc, t) ** 2,
        lambda sc, nu: _t_of_tau(sc, math.sqrt(nu)),
        lambda sc, s, t: tau_of_t(sc, t) ** 2 - tau_of_t(sc, s) ** 2,
    ),
}


def get_frame(parameterisation: str = "eps", *, sde: bool = False) -> Frame:
    """The :class:`Frame` for ``parameterisation`` ("eps", "data" or "velocity") and ODE/SDE.

    (docs/maths.md §2.4)
    """
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(
            f"unknown parameterisation {parameterisation!r}; use 'eps' (noise prediction, "
            f"as in the paper), 'data' (data prediction) or 'velocity' (flow matching)"
        )
    if (parameterisation, bool(sde)) not in FRAMES:
        raise ValueError(f"parameterisation {parameterisation!r} has no SDE frame")
    return FRAMES[(parameterisation, bool(sde))]


def ode_frame(schedule: Schedule) -> Frame:
    """The frame the probability-flow ODE of ``schedule`` is solved in: "eps" for VP
    schedules, "velocity" for flow schedules (``schedule.ode``).

    (docs/maths.md §2.5)
    """
    return FRAMES[(schedule.ode, False)]
