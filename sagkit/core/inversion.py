"""DDIM inversion: the noise x_T from which DDIM re-samples a given image.

A DDIM step from s to t < s is, in y = x/α and ρ = σ/α (Song et al. 2021, "Denoising
Diffusion Implicit Models", eq. 14),

    y_t = y_s + (ρ_t − ρ_s) ε(α_s y_s, s),

so its inverse solves the implicit equation y_s = y_t + (ρ_s − ρ_t) ε(α_s y_s, s) for y_s.
Naive inversion (Dhariwal & Nichol 2021; Mokady et al. 2023) replaces ε(x_s, s) by ε(x_t, t);
``fixed_point_iters`` > 0 then iterates the equation, which converges to the exact inverse of
the DDIM map when (ρ_s − ρ_t) α_s ‖∂ε/∂x‖ < 1 (Pan et al. 2023, "Effective Real Image Editing
with Accelerated Iterative Diffusion Inversion"). Encoding real images by DDIM inversion is
how the diffusion-morph pipeline of AdjointDEIS's experiments (Blasingame & Liu 2024) starts.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .checks import check_count, check_grid, check_inputs, show_progress
from .estimates import rms_distance
from .frames import ode_frame
from .solvers import solve

__all__ = ["invert", "inversion_error"]


@torch.no_grad()
def invert(
    model,
    x0: torch.Tensor,
    ts,
    *,
    cond=None,
    fixed_point_iters: int = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """DDIM inversion of ``x0`` (the state at ``ts[-1]``) to the state at ``ts[0]``.

    Args:
        model: a model of the protocol.
        x0: (B, ...) images, taken as the state at ``ts[-1]`` (the end of the sampling grid).
        ts: the sampling grid, strictly decreasing, e.g. ``time_grid(schedule, 1, t_min, 50)``.
        cond: conditioning passed to the model.
        fixed_point_iters: iterations of y_s ← y_t + (ρ_s − ρ_t) ε(α_s y_s, s) per step after
            the naive guess ε(x_t, t); 0 is plain DDIM inversion.
        progress: show a progress bar; ``None``: from 1000 steps on.
    Returns:
        (B, ...) x_T with ``solve(model, x_T, ts, "ddim", cond) ≈ x0``.

    (docs/maths.md §7.4)
    """
    check_inputs(model, x0, cond=cond, x_name="x0")
    check_count(fixed_point_iters, "fixed_point_iters", low=0)
    ts = check_grid(ts)
    progress = show_progress(progress, len(ts) - 1)
    frame = ode_frame(model.schedule)  # the DDIM step is Euler in the ODE's frame
    sc = model.schedule
    x = x0
    for k in tqdm(range(len(ts) - 1, 0, -1), desc="invert", disable=not progress, leave=False):
        t, s = float(ts[k]), float(ts[k - 1])
        x_s = frame.euler(sc, x, t, s, frame.predict(model, x, t, cond))
        for _ in range(fixed_point_iters):
            x_s = frame.euler(sc, x, t, s, frame.predict(model, x_s, s, cond))
        x = x_s
    return x


@torch.no_grad()
def inversion_error(model, x0, ts, *, cond=None, iters=(0, 1, 2, 5)) -> dict:
    """Round-trip RMS ‖solve(invert(x0)) − x0‖ (per-sample RMS, averaged) for each number of
    fixed-point iterations in ``iters``. Returns {iters: rms}.

    (docs/maths.md §7.4)
    """
    return {
        n: float(
            rms_distance(
                solve(
                    model,
                    invert(model, x0, ts, cond=cond, fixed_point_iters=n),
                    ts,
                    solver="ddim",
                    cond=cond,
                ),
                x0,
            ).mean()
        )
        for n in iters
    }
