"""Variance-preserving noise schedules on continuous time t ∈ [0, 1].

    x_t = α_t x_0 + σ_t ε,    α_t² + σ_t² = 1,    λ_t = log(α_t / σ_t)  (half log-SNR).

A schedule is defined by log α_t and its inverse; σ, λ and the inverse t(λ) follow from it.
Every method takes a Python float or a tensor and returns the same kind.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .checks import check_count, check_name, check_time

__all__ = ["VPSchedule", "time_grid", "nearest_index", "check_time"]


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


class VPSchedule:
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

    def __repr__(self) -> str:
        return f"VPSchedule.{self.name}"

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


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, xp increasing; linear beyond the ends."""
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1]).contiguous(), right=False)
    idx = idx.clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


def time_grid(
    schedule: VPSchedule, t_start: float, t_end: float, n: int, *, spacing: str = "time"
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
