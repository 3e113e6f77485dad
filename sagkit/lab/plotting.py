"""Figures for the notebooks and the report: image grids, log–log curves, estimate panels.

Plain functions returning matplotlib Figures; the notebooks' widgets wrap them.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from ..core.estimates import estimate_x0, rms_distance
from ..core.schedules import nearest_index, time_grid
from ..core.solvers import solve

__all__ = [
    "image_grid",
    "misalignment_curves",
    "estimate_figure",
    "agreeing_groups",
    "method_curves",
    "MIB",
]

MIB = 2**20
"""Bytes in a mebibyte: the memory figures' unit."""


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


def _by_method(rows: list[dict], key: str) -> dict[str, dict[int, float]]:
    """{method: {n: value}} from rows with keys n, method and ``key`` (rows without it skipped)."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get(key) is not None:
            out.setdefault(r["method"], {})[int(r["n"])] = float(r[key])
    return out


def agreeing_groups(rows: list[dict], key: str, *, rtol: float = 0.0, atol: float = 0.0):
    """Methods whose ``key`` agrees at every n, in groups: a list of lists of method names.

    Two methods share a group when |a − b| ≤ atol + rtol·max(|a|, |b|) at every n both have
    (and they have the same n's); each method joins the first group whose first member it
    agrees with. The groups keep the order of first appearance in ``rows``.
    """
    values = _by_method(rows, key)
    groups: list[list[str]] = []
    for method, curve in values.items():
        for group in groups:
            ref = values[group[0]]
            if ref.keys() == curve.keys() and all(
                abs(curve[n] - ref[n]) <= atol + rtol * max(abs(curve[n]), abs(ref[n])) for n in ref
            ):
                group.append(method)
                break
        else:
            groups.append([method])
    return groups


def method_curves(
    ax,
    rows: list[dict],
    key: str,
    *,
    groups=None,
    floor: float | None = None,
    unit: float = 1.0,
    sep: str = " = ",
    styles: dict | None = None,
):
    """Log–log curves of ``key`` against n, one line per group of methods.

    Args:
        ax: the matplotlib Axes to draw on.
        rows: dicts with keys n, method and ``key`` (e.g. from
            :func:`sagkit.lab.bench.gradient_accuracy`).
        groups: lists of method names drawn as one line (the largest value of the group at
            each n), labelled with their names joined by ``sep`` ("a = b = c"; pass " ≈ " for
            groups that agree only approximately); default: every method alone. Methods in no
            group are not drawn.
        floor: values below it are drawn at it (log axes cannot show 0).
        unit: values are divided by it (e.g. :data:`MIB` to draw bytes in MiB).
        styles: {label: matplotlib keyword arguments} overriding a line's default style (for
            example crosses on top for a curve that nearly coincides with another).
    Returns:
        {label: (ns, values)}, what was drawn.
    """
    values = _by_method(rows, key)
    groups = [[m] for m in values] if groups is None else groups
    drawn = {}
    for group in groups:
        members = [m for m in group if m in values]
        if not members:
            continue
        ns = sorted(set.intersection(*(set(values[m]) for m in members)))
        ys = [max(values[m][n] for m in members) / unit for n in ns]
        if floor is not None:
            ys = [max(y, floor) for y in ys]
        label = sep.join(members)
        style = {"marker": "o" if len(members) > 1 else "s", "alpha": 0.85}
        style["linestyle"] = "-" if len(members) > 1 else "--"
        ax.loglog(ns, ys, label=label, **(style | (styles or {}).get(label, {})))
        drawn[label] = (ns, ys)
    all_ns = sorted({n for curve in values.values() for n in curve})
    ax.set_xticks(all_ns, [str(n) for n in all_ns])
    ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)
    return drawn
