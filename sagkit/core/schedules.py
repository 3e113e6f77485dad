"""Noise schedules on continuous time t ∈ [0, 1]: variance-preserving and rectified flow.

    x_t = α_t x_0 + σ_t ε,    λ_t = log(α_t / σ_t)  (half log-SNR).

- :class:`VPSchedule`: α_t² + σ_t² = 1 (DDPM, Stable Diffusion 1–2, the digits models);
  defined by log α_t and its inverse.
- :class:`FlowSchedule`: α_t = 1 − σ_t, the rectified flow of Stable Diffusion 3 and FLUX,
  with their time shift σ_t = s t / (1 + (s − 1) t).

Both are a :class:`Schedule`: α, σ, λ and the inverse t(λ), and ``ode``, the frame class their
probability-flow ODE is solved in (:func:`sagkit.core.frames.ode_frame`). Every method takes
a Python float or a tensor and returns the same kind (docs/maths.md §1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .checks import check_count, check_name, check_time
from .frames import EpsFrame, VelocityFrame

__all__ = [
    "Schedule",
    "VPSchedule",
    "FlowSchedule",
    "is_flow_scheduler",
    "time_grid",
    "nearest_index",
    "check_time",
]


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _as_float64(x):
    return x.double() if _is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)


def _like(value: torch.Tensor, template):
    """Return ``value`` as a float when ``template`` was a float, else as a tensor in its dtype."""
    if _is_tensor(template):
        dtype = template.dtype if template.is_floating_point() else torch.float64
        return value.to(dtype)
    return float(value)


class Schedule:
    """The protocol of a noise schedule: α_t, σ_t, λ_t = log(α_t/σ_t) and the inverse t(λ).

    A subclass implements :meth:`log_alpha`, :meth:`alpha`, :meth:`sigma`, :meth:`lam` and
    :meth:`t_of_lam` (floats in, floats out; tensors in, tensors of the input's dtype out,
    computed in float64). λ decreases strictly in t, so t(λ) is well defined.

    Attributes:
        name: short description, shown in ``repr``.
        t_min: the smallest time at which a sampler should stop (λ is finite there).
        num_train_timesteps: N for a discrete (diffusers) schedule, else ``None``.
        ode: the frame class of the probability-flow ODE (docs/maths.md §2.5):
            :class:`~sagkit.core.frames.EpsFrame` (y = x/α over ρ = σ/α, slope ε) where α > 0
            on [0, 1], :class:`~sagkit.core.frames.VelocityFrame` (x/(α + σ) over σ/(α + σ),
            slope v = ε − x̂0) where α reaches 0 at t = 1.
    """

    ode = EpsFrame
    name = "schedule"
    t_min = 1e-3
    num_train_timesteps = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    def log_alpha(self, t):
        raise NotImplementedError

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def lam(self, t):
        raise NotImplementedError

    def t_of_lam(self, lam):
        raise NotImplementedError


class VPSchedule(Schedule):
    """A variance-preserving schedule given by ``log α_t`` and its inverse.

    Use the constructors :meth:`linear`, :meth:`cosine` and :meth:`from_diffusers`.
    Internally everything is computed in float64; results come back in the input's dtype.

    Attributes:
        name: short description, shown in ``repr``.
        t_min: the smallest time at which a sampler should stop (λ is finite there).
        num_train_timesteps: N for a discrete (diffusers) schedule, else ``None``. A network
            trained on integer timesteps is called at the float timestep ``t·N − 1``.
    """

    def __init__(
        self, log_alpha, t_of_log_alpha, name: str, t_min: float = 1e-3, num_train_timesteps=None
    ):
        self._log_alpha = log_alpha
        self._t_of_log_alpha = t_of_log_alpha
        self.name = name
        self.t_min = float(t_min)
        self.num_train_timesteps = num_train_timesteps

    # --- constructors -------------------------------------------------------------------
    @classmethod
    def linear(cls, *, beta_min: float = 0.1, beta_max: float = 20.0) -> VPSchedule:
        """Linear VP-SDE (Song et al. 2021): log α_t = −¼ t² (β_max − β_min) − ½ t β_min.

        (docs/maths.md §1.2)
        """
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        a, b = 0.25 * (beta_max - beta_min), 0.5 * beta_min

        def log_alpha(t):
            return -a * t**2 - b * t

        def t_of_log_alpha(la):
            # a t² + b t = c with c = −log α ≥ 0; the root 2c / (b + sqrt(b² + 4ac)) is stable.
            c = -la
            return 2 * c / (b + torch.sqrt(b**2 + 4 * a * c))

        return cls(log_alpha, t_of_log_alpha, f"linear(beta_min={beta_min}, beta_max={beta_max})")

    @classmethod
    def cosine(cls, *, s: float = 0.008, t_max: float = 0.9946) -> VPSchedule:
        """Cosine schedule (Nichol & Dhariwal 2021) on τ = t · t_max.

        log α_t = log cos(π/2 · (τ + s)/(1 + s)) − log cos(π/2 · s/(1 + s)). α vanishes at
        τ = 1, so continuous time 1 is mapped to τ = t_max = 0.9946 (as in DPM-Solver) to
        keep λ finite.

        (docs/maths.md §1.2)
        """
        log_c0 = math.log(math.cos(math.pi / 2 * s / (1 + s)))

        def log_alpha(t):
            return torch.log(torch.cos(math.pi / 2 * (t * t_max + s) / (1 + s))) - log_c0

        def t_of_log_alpha(la):
            return ((1 + s) * 2 / math.pi * torch.arccos(torch.exp(la + log_c0)) - s) / t_max

        return cls(log_alpha, t_of_log_alpha, f"cosine(s={s})")

    @classmethod
    def from_diffusers(cls, scheduler) -> VPSchedule:
        """The schedule of a diffusers scheduler, from its discrete ``alphas_cumprod``.

        With N entries, α_n = sqrt(alphas_cumprod[n]) at t_n = (n + 1)/N (the DPM-Solver
        'discrete' convention), plus α = 1 at t = 0; log α is interpolated piecewise
        linearly in t, so the inverse is piecewise linear too.

        (docs/maths.md §1.3)
        """
        acp = getattr(scheduler, "alphas_cumprod", None)
        if acp is None:
            raise TypeError(
                f"{type(scheduler).__name__} has no alphas_cumprod; pass a diffusers scheduler"
            )
        acp = torch.as_tensor(np.asarray(acp, dtype=np.float64))
        n = acp.numel()
        ts = torch.arange(n + 1, dtype=torch.float64) / n
        las = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(acp)])
        if not bool((las[1:] < las[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")

        def log_alpha(t):
            return _interp(t, ts, las)

        def t_of_log_alpha(la):
            return _interp(-la, -las, ts)

        return cls(
            log_alpha,
            t_of_log_alpha,
            f"from_diffusers(N={n})",
            t_min=1.0 / n,
            num_train_timesteps=n,
        )

    # --- the schedule -------------------------------------------------------------------
    def log_alpha(self, t):
        """log α_t."""
        return _like(self._log_alpha(_as_float64(t)), t)

    def alpha(self, t):
        """α_t = sqrt(ᾱ_t), the signal scale."""
        return _like(torch.exp(self._log_alpha(_as_float64(t))), t)

    def sigma(self, t):
        """σ_t = sqrt(1 − α_t²), the noise scale.

        (docs/maths.md §1.1)
        """
        la = self._log_alpha(_as_float64(t))
        return _like(torch.sqrt(-torch.expm1(2 * la)), t)

    def lam(self, t):
        """λ_t = log(α_t / σ_t) = log α_t − ½ log(1 − α_t²).

        (docs/maths.md §1.1)
        """
        la = self._log_alpha(_as_float64(t))
        return _like(la - 0.5 * torch.log(-torch.expm1(2 * la)), t)

    def t_of_lam(self, lam):
        """Inverse of :meth:`lam`: from λ, log α = −½ log(1 + e^{−2λ}) = −½ softplus(−2λ).

        (docs/maths.md §1.1)
        """
        la = -0.5 * torch.nn.functional.softplus(-2 * _as_float64(lam))
        return _like(self._t_of_log_alpha(la), lam)


class FlowSchedule(Schedule):
    """The rectified flow x_t = (1 − σ_t) x_0 + σ_t ε with the time shift of SD3 and FLUX.

        σ_t = s t / (1 + (s − 1) t),   α_t = 1 − σ_t,   λ_t = log((1 − σ_t)/σ_t),

    and t(λ): σ = 1/(1 + e^λ), t = σ / (s − (s − 1) σ). s = 1 is the plain rectified flow
    (σ_t = t); s > 1 spends more of a uniform time grid at high noise (SD3 uses s = 3). α
    vanishes at t = 1 (λ = −∞), where x_1 = ε: the ODE is solved in the "velocity" frame,
    which stays finite there (docs/maths.md §1.5, §2.5).

    Attributes:
        shift: s.
        num_train_timesteps: N of a diffusers scheduler: the network is called with the
            timestep σ_t · N (diffusers' convention for flow matching), else ``None``.
    """

    ode = VelocityFrame

    def __init__(self, *, shift: float = 1.0, num_train_timesteps=None, t_min: float = 1e-3):
        if not 0 < shift < math.inf:  # an infinite shift makes σ NaN (∞/∞) at every t
            raise ValueError(f"shift must be a positive finite number, got {shift}")
        self.shift = float(shift)
        self.name = f"rectified(shift={self.shift:g})"
        self.num_train_timesteps = num_train_timesteps
        self.t_min = float(t_min)

    @classmethod
    def rectified(cls, *, shift: float = 1.0) -> FlowSchedule:
        """The rectified flow with time shift ``shift`` (1: σ_t = t)."""
        return cls(shift=shift)

    @classmethod
    def from_diffusers(cls, scheduler) -> FlowSchedule:
        """The schedule of a diffusers flow-matching scheduler
        (``FlowMatchEulerDiscreteScheduler``): its ``shift`` and N = ``num_train_timesteps``.

        With dynamic shifting (FLUX) the shift is chosen per image size at sampling time;
        the schedule keeps s = 1 and a sampler's times follow its own σ's (t = t(σ)), so
        the model is the same function of σ either way.

        (docs/maths.md §1.5)
        """
        if not is_flow_scheduler(scheduler):
            raise TypeError(
                f"{type(scheduler).__name__} is not a flow-matching scheduler (it needs a shift "
                "in its config and no alphas_cumprod); pass a FlowMatchEulerDiscreteScheduler"
            )
        config = scheduler.config
        n = int(config["num_train_timesteps"])
        shift = 1.0 if config.get("use_dynamic_shifting") else float(config["shift"])
        return cls(shift=shift, num_train_timesteps=n, t_min=1.0 / n)

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """σ_t = s t / (1 + (s − 1) t), float64."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def t_of_sigma(self, sigma):
        """The inverse of σ_t: t = σ / (s − (s − 1) σ).

        (docs/maths.md §1.5)
        """
        sg = _as_float64(sigma)
        return _like(sg / (self.shift - (self.shift - 1) * sg), sigma)

    def log_alpha(self, t):
        """log α_t = log(1 − σ_t)."""
        return _like(torch.log1p(-self.sigma_of_t(_as_float64(t))), t)

    def alpha(self, t):
        """α_t = 1 − σ_t."""
        return _like(1 - self.sigma_of_t(_as_float64(t)), t)

    def sigma(self, t):
        """σ_t = s t / (1 + (s − 1) t).

        (docs/maths.md §1.5)
        """
        return _like(self.sigma_of_t(_as_float64(t)), t)

    def lam(self, t):
        """λ_t = log(α_t/σ_t) = log((1 − t)/(s t)): −∞ at t = 1, +∞ at t = 0.

        (docs/maths.md §1.5)
        """
        tt = _as_float64(t)
        return _like(torch.log1p(-tt) - torch.log(self.shift * tt), t)

    def t_of_lam(self, lam):
        """The inverse of :meth:`lam`: σ = 1/(1 + e^λ), then t = t(σ); ±∞ map to 0 and 1.

        (docs/maths.md §1.5)
        """
        sigma = torch.sigmoid(-_as_float64(lam))
        return _like(sigma / (self.shift - (self.shift - 1) * sigma), lam)


def is_flow_scheduler(scheduler) -> bool:
    """Whether a diffusers scheduler is a flow-matching one: a ``shift`` in its config and no
    ``alphas_cumprod`` (a VP scheduler built from a flow config keeps the ``shift`` key but has
    ``alphas_cumprod``)."""
    config = getattr(scheduler, "config", None) or {}
    return "shift" in config and getattr(scheduler, "alphas_cumprod", None) is None


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, xp increasing; linear beyond the ends."""
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1]).contiguous(), right=False)
    idx = idx.clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


def time_grid(
    schedule: Schedule, t_start: float, t_end: float, n: int, *, spacing: str = "time"
) -> torch.Tensor:
    """n + 1 strictly decreasing times from t_start to t_end (float64, shape (n + 1,)).

    spacing "time": uniform in t. spacing "lambda": uniform in the half log-SNR λ, which
    needs t_end > 0 (λ is infinite at t = 0).

    (docs/maths.md §1.4)
    """
    check_time(t_start, "t_start")
    check_time(t_end, "t_end", allow_zero=True)
    n = check_count(n, "n")
    check_name(spacing, "spacing", ("time", "lambda"))
    if not t_end < t_start:
        raise ValueError(
            f"t_end must be smaller than t_start, got t_start={t_start}, t_end={t_end}"
        )
    if spacing == "time":
        return torch.linspace(float(t_start), float(t_end), n + 1, dtype=torch.float64)
    if spacing == "lambda":
        if t_end <= 0:
            raise ValueError("spacing='lambda' needs t_end > 0 (λ is infinite at t = 0)")
        if not math.isfinite(schedule.lam(float(t_start))):
            raise ValueError(
                f"spacing='lambda' needs a finite λ at t_start = {t_start} ({schedule!r} has "
                "α = 0 there); start below it or use spacing='time'"
            )
        lams = torch.linspace(
            schedule.lam(float(t_start)), schedule.lam(float(t_end)), n + 1, dtype=torch.float64
        )
        ts = schedule.t_of_lam(lams)
        ts[0], ts[-1] = float(t_start), float(t_end)  # exact ends, free of round trip
        return ts
    raise ValueError(f"spacing must be 'time' or 'lambda', got {spacing!r}")


def nearest_index(ts: torch.Tensor, t: float) -> int:
    """The index of the grid time in ``ts`` nearest to ``t`` (the first one on a tie)."""
    return int(torch.argmin((torch.as_tensor(ts) - float(t)).abs()))
