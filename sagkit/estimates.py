"""Clean-image estimates at a noisy state, and how far they sit from the sampler's output.

- One-step (Tweedie): x̂0 = (x_t − σ_t ε(x_t, t)) / α_t (what FreeDoM, UGD and DPS use).
- n-step: solve the probability-flow ODE from t to t_end in n steps (what SAG uses;
  Pan et al. 2023, "Towards Accurate Guided Diffusion Sampling through Symplectic
  Adjoint Method", §3.1).
- Misalignment at t: ‖x̂0^{(n)}(x_t) − x_final‖, x_final being what the sampler makes of x_t.
"""

from __future__ import annotations

import torch

from .schedules import check_time, time_grid
from .solvers import solve

__all__ = ["estimate_x0", "rms_distance", "misalignment"]


def estimate_x0(
    model,
    x_t: torch.Tensor,
    t: float,
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
    check_time(t, "t")
    if t_end is None:
        t_end = 0.0 if spacing == "time" else model.schedule.t_min
    ts = time_grid(model.schedule, float(t), t_end, n, spacing)
    return solve(model, x_t, ts, solver=solver, cond=cond)


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square distance per sample: sqrt(mean over pixels of (a − b)²), shape (B,)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).flatten(1).pow(2).mean(1).sqrt()


@torch.no_grad()
def misalignment(
    model,
    x_T: torch.Tensor,
    times=(0.9, 0.7, 0.5, 0.3, 0.1),
    ns=(1, 2, 4, 8),
    steps: int = 100,
    solver: str = "ddim",
    t_start: float = 1.0,
    cond=None,
    progress: bool = False,
) -> dict:
    """Distance between n-step estimates along a sampling run and the run's final sample.

    The sampler runs ``steps`` ``solver`` steps uniform in t from ``t_start`` to 0, starting at
    x_T (B, ...). At the grid point nearest each t in ``times``, every n in ``ns`` gives an
    estimate ``estimate_x0(model, x_t, t, n, solver)``, compared with the final sample.

    Returns a dict with ``times`` (the grid times used), ``ns``, ``rms`` (a float64 tensor of
    shape (len(times), len(ns)): mean over the batch of the per-sample RMS distance),
    ``final`` (B, ...), ``states`` {t: x_t} and ``estimates`` {(t, n): x̂0}.
    """
    ts = time_grid(model.schedule, t_start, 0.0, steps)
    wanted = [int(torch.argmin((ts - float(t)).abs())) for t in times]
    states = {}

    def keep(i, t, x):
        if i in wanted:
            states[t] = x.clone()

    final = solve(model, x_T, ts, solver=solver, cond=cond, callback=keep, progress=progress)
    used = [float(ts[i]) for i in wanted]
    rms = torch.zeros(len(used), len(ns), dtype=torch.float64)
    estimates = {}
    for i, t in enumerate(used):
        for j, n in enumerate(ns):
            est = estimate_x0(model, states[t], t, n=n, solver=solver, cond=cond)
            estimates[(t, n)] = est
            rms[i, j] = rms_distance(est, final).mean().double()
    return {
        "times": used,
        "ns": list(ns),
        "rms": rms,
        "final": final,
        "states": states,
        "estimates": estimates,
    }
