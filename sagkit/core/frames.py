"""The frames of the diffusion ODE: ρ = σ/α, τ = α/σ, the one-step (Tweedie) estimate, and the
coordinates in which every first-order exponential-integrator step is an Euler step.

Each small formula that the solvers, samplers and adjoints share lives here once
(docs/maths.md §2 and §3.1):

    ρ_t = σ_t/α_t = e^{−λ_t},   τ_t = α_t/σ_t = e^{λ_t},   x̂0(x_t) = (x_t − σ_t ε(x_t, t))/α_t.

A :class:`Frame` is a prediction F of the network, one class each: :class:`EpsFrame`,
:class:`DataFrame`, :class:`VelocityFrame`, with the formulas that depend on F as methods. Its
:class:`Coordinates` (κ, ν, c) write a first-order step from s to t < s as

    Y_t = Y_s + c (ν_t − ν_s) F(x_s, s) + sqrt(q(s, t)) ξ,   Y = x/κ,   ξ ~ N(0, I):

the frame's own ODE coordinates (q = 0), or, in an SDE frame, those of its :class:`NoiseField`
``frame.noise`` (:class:`EpsNoise`, :class:`DataNoise`):

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
probability-flow ODE is solved in (``schedule.ode``, a frame class); :func:`get_frame` parses a
public ``parameterisation=`` name into a frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from .schedules import Schedule

__all__ = [
    "rho_of_t",
    "tau_of_t",
    "tweedie_x0",
    "per_sample",
    "velocity_of",
    "Coordinates",
    "RhoCoordinates",
    "TauCoordinates",
    "VelocityCoordinates",
    "NoiseField",
    "EpsNoise",
    "DataNoise",
    "Frame",
    "EpsFrame",
    "DataFrame",
    "VelocityFrame",
    "FRAME_CLASSES",
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


def _alpha(sc: Schedule, t) -> float:
    return sc.alpha(float(t))


def _sigma(sc: Schedule, t) -> float:
    return sc.sigma(float(t))


def _t_of_rho(sc: Schedule, rho: float) -> float:
    return 0.0 if rho == 0 else sc.t_of_lam(-math.log(rho))


def _t_of_tau(sc: Schedule, tau: float) -> float:
    return 1.0 if tau == 0 else sc.t_of_lam(math.log(tau))


@dataclass(frozen=True)
class Coordinates:
    """Y = x/κ_t on the clock ν_t, in which a first-order step from s to t is

        Y_t = Y_s + c (ν_t − ν_s) F + sqrt(q(s, t)) ξ,

    with q = 0 here (an ODE step; a :class:`NoiseField` adds noise). ``kappa(schedule, t)`` and
    ``nu(schedule, t)`` return floats, ``t_of_nu(schedule, ν)`` inverts ν. ``needs_alpha``:
    κ or ν is infinite where α = 0 (t = 1 of a flow schedule).
    """

    c: ClassVar[float] = 1.0
    needs_alpha: ClassVar[bool] = False

    def kappa(self, schedule: Schedule, t) -> float:
        raise NotImplementedError

    def nu(self, schedule: Schedule, t) -> float:
        raise NotImplementedError

    def t_of_nu(self, schedule: Schedule, nu: float) -> float:
        raise NotImplementedError

    def var(self, schedule: Schedule, s, t) -> float:
        """q(s, t), the variance of the noise added in Y over a step from s to t: 0."""
        return 0.0


class RhoCoordinates(Coordinates):
    """κ = α, ν = ρ = σ/α: the ε frame's (DDIM / DPM-Solver-1)."""

    needs_alpha = True

    def kappa(self, schedule: Schedule, t) -> float:
        return _alpha(schedule, t)

    def nu(self, schedule: Schedule, t) -> float:
        return rho_of_t(schedule, t)

    def t_of_nu(self, schedule: Schedule, nu: float) -> float:
        return _t_of_rho(schedule, nu)


class TauCoordinates(Coordinates):
    """κ = σ, ν = τ = α/σ: the data frame's (DPM-Solver++-1)."""

    def kappa(self, schedule: Schedule, t) -> float:
        return _sigma(schedule, t)

    def nu(self, schedule: Schedule, t) -> float:
        return tau_of_t(schedule, t)

    def t_of_nu(self, schedule: Schedule, nu: float) -> float:
        return _t_of_tau(schedule, nu)


class VelocityCoordinates(Coordinates):
    """κ = α + σ, ν = σ/(α + σ): the velocity frame's, finite on all of [0, 1].

    (docs/maths.md §2.5)
    """

    def kappa(self, schedule: Schedule, t) -> float:
        return _alpha(schedule, t) + _sigma(schedule, t)

    def nu(self, schedule: Schedule, t) -> float:
        """ν_t = σ_t/(α_t + σ_t): 0 at t = 0, 1 where α = 0."""
        sigma = _sigma(schedule, t)
        return sigma / (_alpha(schedule, t) + sigma)

    def t_of_nu(self, schedule: Schedule, nu: float) -> float:
        """The inverse of ν = σ/(α + σ) = 1/(1 + e^λ): λ = log((1 − ν)/ν), ±∞ at the ends."""
        if nu <= 0:
            return 0.0
        if nu >= 1:
            return schedule.t_of_lam(-math.inf)
        return schedule.t_of_lam(math.log1p(-nu) - math.log(nu))


class NoiseField(Coordinates):
    """The noise of an SDE frame, in the coordinates its Euler–Maruyama step is exact in:
    :meth:`var` is q(s, t) > 0 for a step from s (noisier) to t. Both need α > 0 (ρ, or
    κ = σ²/α)."""

    needs_alpha = True

    def var(self, schedule: Schedule, s, t) -> float:
        raise NotImplementedError


class EpsNoise(NoiseField, RhoCoordinates):
    """SDE-DPM-Solver-1 (the SDE step of AdjointDEIS): κ = α, ν = ρ, c = 2, q = ρ_s² − ρ_t².

    (docs/maths.md §7.1)
    """

    c = 2.0

    def var(self, schedule: Schedule, s, t) -> float:
        return rho_of_t(schedule, s) ** 2 - rho_of_t(schedule, t) ** 2


class DataNoise(NoiseField):
    """SDE-DPM-Solver++-1 (DDPM's ancestral step): κ = σ²/α, ν = τ², c = 1, q = τ_t² − τ_s².

    (docs/maths.md §7.1)
    """

    def kappa(self, schedule: Schedule, t) -> float:
        return _sigma(schedule, t) ** 2 / _alpha(schedule, t)

    def nu(self, schedule: Schedule, t) -> float:
        return tau_of_t(schedule, t) ** 2

    def t_of_nu(self, schedule: Schedule, nu: float) -> float:
        return _t_of_tau(schedule, math.sqrt(nu))

    def var(self, schedule: Schedule, s, t) -> float:
        return tau_of_t(schedule, t) ** 2 - tau_of_t(schedule, s) ** 2


@dataclass(frozen=True)
class Frame:
    """A prediction F of the network (a subclass: :class:`EpsFrame`, :class:`DataFrame`,
    :class:`VelocityFrame`) and the coordinates in which a first-order step with it is an
    Euler step: the frame's own ODE :class:`Coordinates` (``ode_coordinates``), or those of its
    :class:`NoiseField` ``noise`` in an SDE frame (:func:`get_frame` with ``sde=True``).

    ``kappa(schedule, t)``, ``nu(schedule, t)``, ``t_of_nu(schedule, ν)``, ``c`` and
    ``noise_var(schedule, s, t)`` (0 for an ODE frame) are those of :attr:`coordinates`. Class
    attributes: ``parameterisation``, the public name ("eps", "data", "velocity");
    ``label``, how messages name F; ``sde_noise``, the noise field of its SDE frame, if any;
    ``needs_positive_end``, ν is infinite at t = 0.
    """

    noise: NoiseField | None = None

    parameterisation: ClassVar[str]
    label: ClassVar[str]
    ode_coordinates: ClassVar[Coordinates]
    sde_noise: ClassVar[NoiseField | None] = None
    needs_positive_end: ClassVar[bool] = False

    @property
    def coordinates(self) -> Coordinates:
        """The coordinates of a step: the noise field's in an SDE frame, else the ODE's."""
        return self.ode_coordinates if self.noise is None else self.noise

    @property
    def name(self) -> str:
        """The parameterisation; "eps-sde" and "data-sde" for the SDE frames."""
        return self.parameterisation if self.noise is None else f"{self.parameterisation}-sde"

    @property
    def sde(self) -> bool:
        return self.noise is not None

    @property
    def c(self) -> float:
        return self.coordinates.c

    def kappa(self, schedule: Schedule, t) -> float:
        return self.coordinates.kappa(schedule, t)

    def nu(self, schedule: Schedule, t) -> float:
        return self.coordinates.nu(schedule, t)

    def t_of_nu(self, schedule: Schedule, nu: float) -> float:
        return self.coordinates.t_of_nu(schedule, nu)

    def noise_var(self, schedule: Schedule, s, t) -> float:
        return self.coordinates.var(schedule, s, t)

    def check_times(self, ts: torch.Tensor, schedule: Schedule | None = None) -> None:
        """The data frames have τ = α/σ = ∞ at t = 0: they need a grid ending at t > 0. The
        ε frames (and the data SDE frame, κ = σ²/α) have ρ = σ/α = ∞ where α = 0 (t = 1 of a
        flow schedule): they need a grid starting below it."""
        if self.needs_positive_end and float(ts[-1]) <= 0:
            raise ValueError(
                f"parameterisation {self.parameterisation!r} needs ts[-1] > 0 (τ = α/σ is "
                f"infinite at t = 0); end the grid at schedule.t_min, got ts[-1] = {float(ts[-1])}"
            )
        needs_alpha = self.coordinates.needs_alpha
        if needs_alpha and schedule is not None and not schedule.alpha(float(ts[0])) > 0:
            raise ValueError(
                f"the {self.name!r} frame needs α > 0 at ts[0] (ρ = σ/α is infinite where α = 0, "
                f"at t = {float(ts[0])} of {schedule!r}); use parameterisation 'velocity' "
                "(the ODE of a flow schedule) or start the grid below that time"
            )

    def step_length(self, schedule: Schedule, t: float, s: float) -> float:
        """The step length a multistep ratio r = h_prev/h is measured in: h = λ_s − λ_t in the
        exponential-integrator frames (h = ν_s − ν_t in the velocity frame,
        :meth:`VelocityFrame.step_length`). Infinite where λ is (t = 0, or α = 0).

        (docs/maths.md §6.3)
        """
        return float(schedule.lam(float(s)) - schedule.lam(float(t)))

    def predict(self, model, x: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        """F(x, t) from a model of the protocol, shape of x."""
        raise NotImplementedError

    def predict_exact(self, model, x: torch.Tensor, t) -> torch.Tensor:
        """F(x, t) from a model that gives ε, x̂0 and v each in closed form (``model.eps``,
        ``model.x0``, ``model.velocity``: a Gaussian or tilted mixture), without forming one
        from another (so no division by α_t for the data frame), shape of x."""
        raise NotImplementedError

    def euler(self, schedule, x: torch.Tensor, s: float, t: float, pred: torch.Tensor):
        """The first-order step from s to t with slope F = ``pred``, without noise:
        x_t = κ_t (x_s/κ_s + c (ν_t − ν_s) F) (DDIM in the "eps" and "velocity" frames).

        (docs/maths.md §2.4)
        """
        y = x / self.kappa(schedule, s)
        return self.kappa(schedule, t) * (
            y + (self.c * (self.nu(schedule, t) - self.nu(schedule, s))) * pred
        )

    def _x0_weight(self, schedule: Schedule, t) -> float:
        """w_t, the weight of x̂0 in x = w_t x̂0 + σ_t F: the ODE's κ_t (α_t for ε, α_t + σ_t
        for the velocity)."""
        return self.ode_coordinates.kappa(schedule, t)

    def x0(self, schedule, x: torch.Tensor, t: float, pred: torch.Tensor) -> torch.Tensor:
        """The one-step estimate x̂0 from F = ``pred`` at (x, t): (x − σ_t F)/w_t, i.e.
        (x − σ_t ε)/α_t for "eps" and (x − σ_t v)/(α_t + σ_t) for "velocity" (F itself in
        the data frame, :meth:`DataFrame.x0`); shape of x.

        (docs/maths.md §2.5)
        """
        weight = self._x0_weight(schedule, t)
        return (x - schedule.sigma(float(t)) * pred) / weight

    def pred_of_x0(self, schedule, x: torch.Tensor, t: float, x0: torch.Tensor) -> torch.Tensor:
        """The F at x whose one-step estimate is ``x0`` (the inverse of :meth:`x0` in F):
        (x − w_t x0)/σ_t, i.e. (x − α_t x0)/σ_t for "eps", (x − (α_t + σ_t) x0)/σ_t for
        "velocity".

        (docs/maths.md §2.5)
        """
        weight = self._x0_weight(schedule, t)
        return (x - weight * x0) / schedule.sigma(float(t))

    def shift_x0(self, schedule, t: float, pred: torch.Tensor, delta: torch.Tensor):
        """The F at the same x whose one-step estimate is x̂0 + Δ: F − (w_t/σ_t) Δ, w_t the
        weight of x̂0 in x = w_t x̂0 + σ_t F (α_t for ε, α_t + σ_t for the velocity).

        (docs/maths.md §8.9)
        """
        weight = self._x0_weight(schedule, t)
        return pred - (weight / schedule.sigma(float(t))) * delta

    def eps_difference(self, schedule, t: float, difference: torch.Tensor) -> torch.Tensor:
        """A difference of two F's at the same x, in ε units: itself for "eps", (α_t/(α_t +
        σ_t)) Δv for "velocity" (ε = (x + α v)/(α + σ)), −(α_t/σ_t) Δx̂0 for "data".

        (docs/maths.md §8.3)
        """
        raise NotImplementedError


class EpsFrame(Frame):
    """F = ε(x, t), in y = x/α over ρ = σ/α: DDIM / DPM-Solver-1, the ODE of VP schedules;
    its SDE frame is SDE-DPM-Solver-1 (:class:`EpsNoise`)."""

    parameterisation = "eps"
    label = "ε"
    ode_coordinates = RhoCoordinates()
    sde_noise = EpsNoise()

    def predict(self, model, x: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        """ε(x, t)."""
        return model.eps(x, t, cond)

    def predict_exact(self, model, x: torch.Tensor, t) -> torch.Tensor:
        return model.eps(x, t)

    def eps_difference(self, schedule, t: float, difference: torch.Tensor) -> torch.Tensor:
        return difference


class DataFrame(Frame):
    """F = x̂0 = (x − σ_t ε)/α_t, in x/σ over τ = α/σ: DPM-Solver++-1; its SDE frame is
    SDE-DPM-Solver++-1 (:class:`DataNoise`). τ is infinite at t = 0."""

    parameterisation = "data"
    label = "x̂0"
    ode_coordinates = TauCoordinates()
    sde_noise = DataNoise()
    needs_positive_end = True

    def predict(self, model, x: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        """x̂0 = (x − σ_t ε)/α_t (:func:`tweedie_x0`)."""
        return tweedie_x0(model.schedule, x, t, model.eps(x, t, cond))

    def predict_exact(self, model, x: torch.Tensor, t) -> torch.Tensor:
        return model.x0(x, t)

    def x0(self, schedule, x: torch.Tensor, t: float, pred: torch.Tensor) -> torch.Tensor:
        """F itself."""
        return pred

    def pred_of_x0(self, schedule, x: torch.Tensor, t: float, x0: torch.Tensor) -> torch.Tensor:
        """``x0`` itself."""
        return x0

    def shift_x0(self, schedule, t: float, pred: torch.Tensor, delta: torch.Tensor):
        """F + Δ."""
        return pred + delta

    def eps_difference(self, schedule, t: float, difference: torch.Tensor) -> torch.Tensor:
        """−(α_t/σ_t) Δx̂0."""
        alpha, sigma = schedule.alpha(float(t)), schedule.sigma(float(t))
        return (-alpha / sigma) * difference


class VelocityFrame(Frame):
    """F = v = ε − x̂0, in x/(α + σ) over σ/(α + σ): the ODE of flow schedules, finite where
    α = 0 (docs/maths.md §2.5). It has no SDE frame."""

    parameterisation = "velocity"
    label = "velocity v"
    ode_coordinates = VelocityCoordinates()

    def step_length(self, schedule: Schedule, t: float, s: float) -> float:
        """h = ν_s − ν_t (Adams–Bashforth in ν).

        (docs/maths.md §6.3)
        """
        return self.nu(schedule, s) - self.nu(schedule, t)

    def predict(self, model, x: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        """v(x, t) (:func:`velocity_of`)."""
        return velocity_of(model, x, t, cond)

    def predict_exact(self, model, x: torch.Tensor, t) -> torch.Tensor:
        return model.velocity(x, t)

    def eps_difference(self, schedule, t: float, difference: torch.Tensor) -> torch.Tensor:
        """(α_t/(α_t + σ_t)) Δv, since ε = (x + α v)/(α + σ)."""
        alpha, sigma = schedule.alpha(float(t)), schedule.sigma(float(t))
        return (alpha / (alpha + sigma)) * difference


FRAME_CLASSES: dict[str, type[Frame]] = {
    cls.parameterisation: cls for cls in (EpsFrame, DataFrame, VelocityFrame)
}
"""The frame class of each public ``parameterisation=`` name."""

PARAMETERISATIONS = tuple(FRAME_CLASSES)


def get_frame(parameterisation: str | Frame | type[Frame] = "eps", *, sde: bool = False) -> Frame:
    """The :class:`Frame` for ``parameterisation`` and ODE/SDE: a public name ("eps", "data"
    or "velocity", parsed here), or a frame class or frame (its class is taken).

    (docs/maths.md §2.4)
    """
    cls = _frame_class(parameterisation)
    if not sde:
        return cls()
    if cls.sde_noise is None:
        raise ValueError(f"parameterisation {cls.parameterisation!r} has no SDE frame")
    return cls(cls.sde_noise)


def _frame_class(parameterisation) -> type[Frame]:
    if isinstance(parameterisation, Frame):
        return type(parameterisation)
    if isinstance(parameterisation, type) and issubclass(parameterisation, Frame):
        return parameterisation
    if not isinstance(parameterisation, str) or parameterisation not in FRAME_CLASSES:
        raise ValueError(
            f"unknown parameterisation {parameterisation!r}; use 'eps' (noise prediction, "
            f"as in the paper), 'data' (data prediction) or 'velocity' (flow matching)"
        )
    return FRAME_CLASSES[parameterisation]


FRAMES: dict[tuple[str, bool], Frame] = {
    (name, sde): get_frame(cls, sde=sde)
    for name, cls in FRAME_CLASSES.items()
    for sde in (False, True)
    if not sde or cls.sde_noise is not None
}
"""Every frame by (parameterisation, sde): the table of the module docstring."""


def ode_frame(schedule: Schedule) -> Frame:
    """The frame the probability-flow ODE of ``schedule`` is solved in, ``schedule.ode``:
    :class:`EpsFrame` for VP schedules, :class:`VelocityFrame` for flow schedules.

    (docs/maths.md §2.5)
    """
    return schedule.ode()
