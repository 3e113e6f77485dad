"""Figures for the notebooks and the report: image grids, log–log curves, estimate panels.

Plain functions returning matplotlib Figures; the notebooks' widgets wrap them.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from ..core.estimates import estimate_x0, rms_distance
from ..core.schedules import nearest_index, time_grid
from ..core.solvers import solve

__all__ = ["image_grid", "misalignment_curves", "estimate_figure"]


def _to_image(x: torch.Tensor):
    """(C, H, W) in [-1, 1] → a (H, W) or (H, W, C) array in [0, 1] for imshow."""
    x = x.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def image_grid(rows, *, row_labels=None, col_labels=None, scale: float = 1.2):
    """A grid of images: ``rows`` is a list of lists of (C, H, W) tensors in [-1, 1]."""
    nr, nc = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(nr, nc, figsize=(scale * nc, scale * nr), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(nc):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(_to_image(row[j]), cmap="gray", vmin=0, vmax=1)
            else:
                ax.axis("off")
            if i == 0 and col_labels is not None:
                ax.set_title(col_labels[j], fontsize=9)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=9)
    fig.tight_layout()
    return fig


def misalignment_curves(result: dict):
    """Two panels from :func:`sagkit.misalignment`: RMS against t per n, and against n per t."""
    rms, times, ns = result["rms"], result["times"], result["ns"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for j, n in enumerate(ns):
        left.plot(times, rms[:, j], "o-", label=f"n = {n}" + (" (one-step)" if n == 1 else ""))
    left.set(xlabel="t", ylabel="RMS distance to the final sample", title="misalignment against t")
    left.legend()
    for i, t in enumerate(times):
        right.loglog(ns, rms[i], "o-", label=f"t = {t:.2f}")
    right.set_xticks(ns, [str(n) for n in ns], minor=False)
    right.minorticks_off()
    right.set(xlabel="n (estimate steps)", ylabel="RMS distance", title="misalignment against n")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


@torch.no_grad()
def estimate_figure(
    model, x_T: torch.Tensor, t: float, n: int, *, steps: int = 100, solver: str = "ddim"
):
    """x_t, its n-step estimate and the final sample of one sampling run, with the RMS gap.

    The sampler runs ``steps`` steps from t = 1 to 0 from x_T (1, ...); x_t is its state at the
    grid time nearest ``t``. Returns ``(figure, gap)``, gap the RMS distance (also in the title).
    """
    ts = time_grid(model.schedule, 1.0, 0.0, steps)
    k = nearest_index(ts, t)
    k = min(max(k, 1), steps - 1)
    x_t = solve(model, x_T, ts[: k + 1], solver=solver)
    t_k = float(ts[k])
    est = estimate_x0(model, x_t, t_k, n=n, solver=solver)
    final = solve(model, x_t, ts[k:], solver=solver)
    gap = float(rms_distance(est, final)[0])
    fig = image_grid(
        [[x_t[0], est[0], final[0]]], col_labels=[f"x_t, t={t_k:.2f}", f"{n}-step x̂0", "final"]
    )
    fig.suptitle(f"RMS(estimate − final) = {gap:.3f}", fontsize=10)
    fig.tight_layout()
    return fig, gap
