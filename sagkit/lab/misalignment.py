"""Misalignment: how far the n-step estimates of x₀ along a sampling run sit from its output.

At time t the misalignment of the n-step estimate is ‖x̂0^{(n)}(x_t) − x_final‖ (RMS per
sample), x_final being what the sampler makes of x_t (docs/maths.md §3.3). It is the
quantity SAG's n-step estimate reduces; notebook 01 shows it.
"""

from __future__ import annotations

import torch

from ..core.checks import check_count, check_inputs, check_time
from ..core.estimates import estimate_x0, rms_distance
from ..core.schedules import nearest_index, time_grid
from ..core.solvers import solve

__all__ = ["misalignment"]


@torch.no_grad()
def misalignment(
    model,
    x_T: torch.Tensor,
    *,
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

    (docs/maths.md §3.3)
    """
    check_inputs(model, x_T, cond=cond, x_name="x_T")
    times, ns = tuple(times), tuple(ns)
    if not times or not ns:
        raise ValueError(f"times and ns must be non-empty, got times={times}, ns={ns}")
    check_time(times, "times")
    for n in ns:
        check_count(n, "ns entries")
    ts = time_grid(model.schedule, t_start, 0.0, check_count(steps, "steps"))
    wanted = [nearest_index(ts, t) for t in times]
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
