"""Clean-image estimates at a noisy state, and distances between images.

- One-step (Tweedie): x̂0 = (x_t − σ_t ε(x_t, t)) / α_t (what FreeDoM, UGD and DPS use;
  :func:`sagkit.core.frames.tweedie_x0`).
- n-step: solve the probability-flow ODE from t to t_end in n steps (what SAG uses;
  Pan et al. 2023, "Towards Accurate Guided Diffusion Sampling through Symplectic
  Adjoint Method", §3.1). docs/maths.md §3.
"""

from __future__ import annotations

import torch

from .checks import check_inputs, check_time
from .schedules import time_grid
from .solvers import solve

__all__ = ["estimate_x0", "rms", "rms_distance"]


def estimate_x0(
    model,
    x_t: torch.Tensor,
    t: float,
    *,
    n: int = 1,
    solver: str = "ddim",
    t_end: float | None = None,
    spacing: str = "time",
    cond=None,
) -> torch.Tensor:
    """The n-step estimate of the clean image from x_t at time t, shape of x_t.

    n = 1 (ddim, t_end = 0) is the one-step Tweedie estimate (x_t − σ_t ε)/α_t, since
    a DDIM step to t = 0 lands on α_0 x̂0 + σ_0 ε = x̂0; n > 1 solves the ODE from t to
    ``t_end`` in n steps on a grid uniform in ``spacing`` ("time" or "lambda"). t_end defaults
    to 0 for spacing "time" and to ``schedule.t_min`` for "lambda" (λ is infinite at 0).
    """
    check_inputs(model, x_t, cond=cond, x_name="x_t")
    check_time(t, "t")
    if t_end is None:
        t_end = 0.0 if spacing == "time" else model.schedule.t_min
    if not float(t) > t_end:
        raise ValueError(
            f"t must be larger than t_end = {t_end} (spacing={spacing!r} ends there), got t = {t}"
        )
    ts = time_grid(model.schedule, float(t), t_end, n, spacing=spacing)
    return solve(model, x_t, ts, solver=solver, cond=cond)


def rms(v: torch.Tensor) -> torch.Tensor:
    """Root mean square per sample: sqrt(mean over all but the batch axis of v²), (B,)."""
    return v.flatten(1).pow(2).mean(1).sqrt()


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square distance per sample, RMS(a − b), shape (B,).

    (docs/maths.md §3.3)
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return rms(a - b)
