"""The AdjointDEIS convergence study: each adjoint's error against the continuous gradient in M.

Notebook 05 and ``sagkit report`` run it; docs/maths.md §6.8 says what it measures.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..core.models import GaussianMixture
from ..core.schedules import time_grid
from ..core.sde import sde_sample
from ..gradients.adjointdeis import adjointdeis_grad
from ..gradients.api import evaluate_loss, loss_grad
from ..gradients.reference import exact_gradient, reference_gradient

__all__ = ["convergence_study", "convergence_table", "plot_convergence", "fit_slope"]


def _check_constant_gradient(loss_fn, x, seed):
    """The SDE reference needs ∂L/∂x_end independent of x_end: compare it at two random points."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(2):
        leaf = torch.randn(x.shape, generator=gen, dtype=x.dtype).requires_grad_(True)
        with torch.enable_grad():
            grads.append(torch.autograd.grad(evaluate_loss(loss_fn, leaf), leaf)[0])
    if not torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-9):
        raise ValueError(
            "the SDE study needs a loss with a constant gradient (linear in the sample): its "
            "closed-form reference cannot know where each SDE run ends"
        )


def fit_slope(steps, errors, *, last: int) -> float:
    """The observed order −d log(error)/d log(M): a least-squares line through the last ``last``
    points of (log M, log error); steps and errors are sequences of the same length."""
    m = torch.tensor([math.log(s) for s in steps[-last:]], dtype=torch.float64)
    e = torch.tensor([math.log(max(err, 1e-300)) for err in errors[-last:]], dtype=torch.float64)
    m, e = m - m.mean(), e - e.mean()
    return float(-(m * e).sum() / (m * m).sum())


def convergence_study(
    model,
    loss_fn,
    x: torch.Tensor,
    *,
    cond=None,
    steps=(5, 10, 20, 40, 80, 160, 320),
    t_start: float = 1.0,
    t_end: float = 1e-3,
    spacing: str = "lambda",
    wrt: str = "x",
    state_solver: str = "rk4",
    sde: bool = False,
    reference=None,
    reference_steps: int = 1024,
    fit_last: int = 3,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Relative error against the continuous gradient, for each method and number of steps M.

    Methods: AdjointDEIS-1 and -2M in both parameterisations (and the velocity frame's, for a
    flow schedule's ODE) (states from ``state_solver`` on
    the same grid, "rk4" by default so that the error measured is the adjoint's own, not the
    forward solver's), backprop through DDIM (its own states), and the vanilla continuous
    adjoint (method "adjoint" of :data:`sagkit.METHODS`). With ``sde``
    the forward pass is the SDE sampler with fixed noise (one Gaussian and a linear loss only:
    the reference is closed form), and the baseline is backprop through that sampler. The
    default M reach 320 because 80 → 160 is not yet asymptotic for AdjointDEIS-1 at t_start = 1.

    Reference: :func:`exact_gradient` for a one-component Gaussian mixture and wrt "x", else
    :func:`reference_gradient` with ``reference_steps`` (or pass ``reference``, a tensor).

    Returns a dict: ``steps``, ``errors`` {label: [relative error per M]}, ``slopes`` {label:
    −d log err / d log M fitted on the last ``fit_last`` M}, ``reference`` (a dict with
    ``kind`` and its error estimates), ``states`` (how the adjoint's states were made).

    (docs/maths.md §6.8)
    """
    one_gaussian = isinstance(model, GaussianMixture) and model.means.shape[0] == 1
    info = {}
    if reference is not None:
        ref, info["kind"] = reference, "given"
    elif one_gaussian and wrt == "x":
        ref = exact_gradient(model, loss_fn, x, t_start, t_end, sde=sde)[1]
        info["kind"] = "closed form (one Gaussian)"
        if sde:
            _check_constant_gradient(loss_fn, x, seed)
    elif sde:
        raise ValueError(
            "the SDE study needs a closed-form reference: a one-Gaussian model, wrt='x'"
        )
    else:
        info = reference_gradient(
            model, loss_fn, x, t_start, t_end, cond=cond, wrt=wrt, steps=reference_steps
        )
        ref = info.pop("grad")
        info.pop("loss")
        info["kind"] = (
            f"RK4 backprop, {reference_steps} and {2 * reference_steps} steps, Richardson"
        )

    def deis(order, param):
        def run(ts, noise):
            kw = {"sde": True, "noise": noise} if sde else {"solver": state_solver}
            return adjointdeis_grad(
                model, loss_fn, x, ts, order=order, parameterisation=param, cond=cond, wrt=wrt, **kw
            )[1]

        return run

    def backprop(ts, noise):
        if not sde:
            return loss_grad(
                model, loss_fn, x, ts, method="backprop", solver="ddim", cond=cond, wrt=wrt
            )[1]
        leaf = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = evaluate_loss(loss_fn, sde_sample(model, leaf, ts, cond=cond, noise=noise)[0])
            return torch.autograd.grad(loss, leaf)[0]

    methods = {}
    params = ("eps", "data") + (
        ("velocity",) if model.schedule.ode == "velocity" and not sde else ()
    )
    for order in (1, 2):
        for param in params:
            methods[f"adjointdeis-{'1' if order == 1 else '2M'} ({param})"] = deis(order, param)
    methods["backprop (sde sampler)" if sde else "backprop (ddim)"] = backprop
    if not sde:
        methods["adjoint (vanilla)"] = lambda ts, noise: loss_grad(
            model, loss_fn, x, ts, method="adjoint", solver="ddim", cond=cond, wrt=wrt
        )[1]

    errors = {label: [] for label in methods}
    gen = torch.Generator().manual_seed(seed)
    for m in tqdm(steps, desc="convergence", disable=not progress, leave=False):
        ts = time_grid(model.schedule, t_start, t_end, int(m), spacing=spacing)
        noise = torch.randn((int(m), *x.shape), generator=gen, dtype=x.dtype) if sde else None
        for label, run in methods.items():
            g = run(ts, noise)
            errors[label].append(float((g - ref).norm() / ref.norm()))
    slopes = {label: fit_slope(list(steps), e, last=fit_last) for label, e in errors.items()}
    states = "SDE sampler (stored noise)" if sde else f"{state_solver} on the same grid"
    return {
        "steps": list(steps),
        "errors": errors,
        "slopes": slopes,
        "reference": info,
        "states": states,
    }


def convergence_table(study: dict) -> str:
    """The errors of :func:`convergence_study` as a fixed-width text table, slopes last."""
    labels = list(study["errors"])
    width = max(len(lab) for lab in labels) + 2
    lines = [f"{'M':>5}  " + "".join(f"{lab:>{width}}" for lab in labels)]
    for i, m in enumerate(study["steps"]):
        lines.append(
            f"{m:>5}  " + "".join(f"{study['errors'][lab][i]:>{width}.3e}" for lab in labels)
        )
    lines.append(
        f"{'slope':>5}  " + "".join(f"{study['slopes'][lab]:>{width}.2f}" for lab in labels)
    )
    return "\n".join(lines)


def plot_convergence(study: dict, *, ax=None, title: str | None = None):
    """Log–log plot of :func:`convergence_study`: relative error against M, fitted slopes in the
    legend, with grey guide lines of slope −1 and −2 (labelled in the legend); errors above 10
    are off the top. The vanilla adjoint is drawn as crosses on top: it is AdjointDEIS-1 (ε)
    with re-solved states (docs/maths.md §5.4, §6.6), so where the states' error does not matter
    the two curves meet and neither hides the other. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4.5))
    steps = study["steps"]
    for label, errs in study["errors"].items():
        legend = f"{label}  (slope {study['slopes'][label]:.2f})"
        if "vanilla" in label:
            ax.loglog(steps, errs, "x", ms=8, mew=1.5, color="k", zorder=5, label=legend)
            continue
        style = "--" if "eps" in label else ("-" if "data" in label else ":")
        ax.loglog(steps, errs, "o" + style, ms=4, label=legend)
    m = torch.tensor(steps, dtype=torch.float64)
    anchor = min(min(e[-1] for e in study["errors"].values()), 1.0) / 3  # below every curve
    for p, style in ((1, ":"), (2, "-.")):
        guide = (anchor * (m[-1] / m) ** p).tolist()
        ax.loglog(steps, guide, style, color="0.6", lw=1, label=f"guide: error ∝ M^-{p}")
    ax.set(xlabel="M (steps)", ylabel="relative error of the gradient", title=title or "")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_ylim(top=min(ax.get_ylim()[1], 10.0))  # an unstable method at few steps: off the top
    ax.legend(fontsize=7)
    return ax.figure
