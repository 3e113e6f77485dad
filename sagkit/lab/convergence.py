"""The AdjointDEIS convergence study: each adjoint's error against the continuous gradient in M.

Notebook 05 and ``sagkit report`` run it; docs/maths.md §6.8 says what it measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from ..core.frames import VelocityFrame
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


@dataclass(frozen=True, eq=False)
class _Problem:
    """The gradient a study measures: ∂L/∂``wrt`` of L(Φ(x, cond)), Φ the ODE solve or, with
    ``sde``, the SDE sampler with fixed noise."""

    model: object
    loss_fn: object
    x: torch.Tensor
    cond: object = None
    wrt: str = "x"
    sde: bool = False


def _reference(
    problem: _Problem, reference, t_start: float, t_end: float, *, steps: int, seed: int
):
    """The gradient the errors are measured against, and a dict saying what it is (``kind``, and
    the error estimates of :func:`reference_gradient`): ``reference`` when given, the closed form
    for one Gaussian and wrt "x", else RK4 backprop on ``steps`` and 2 ``steps`` steps."""
    model, loss_fn, x = problem.model, problem.loss_fn, problem.x
    if reference is not None:
        return reference, {"kind": "given"}
    if isinstance(model, GaussianMixture) and model.means.shape[0] == 1 and problem.wrt == "x":
        ref = exact_gradient(model, loss_fn, x, t_start, t_end, sde=problem.sde)[1]
        if problem.sde:
            _check_constant_gradient(loss_fn, x, seed)
        return ref, {"kind": "closed form (one Gaussian)"}
    if problem.sde:
        raise ValueError(
            "the SDE study needs a closed-form reference: a one-Gaussian model, wrt='x'"
        )
    info = reference_gradient(
        model, loss_fn, x, t_start, t_end, cond=problem.cond, wrt=problem.wrt, steps=steps
    )
    ref = info.pop("grad")
    info.pop("loss")
    info["kind"] = f"RK4 backprop, {steps} and {2 * steps} steps, Richardson"
    return ref, info


def _adjointdeis(problem: _Problem, ts, noise, *, order: int, param: str, state_solver: str):
    """AdjointDEIS's gradient on the grid ``ts``: its states from ``state_solver``, or from the
    SDE sampler with ``noise``."""
    kw = {"sde": True, "noise": noise} if problem.sde else {"solver": state_solver}
    return adjointdeis_grad(
        problem.model,
        problem.loss_fn,
        problem.x,
        ts,
        order=order,
        parameterisation=param,
        cond=problem.cond,
        wrt=problem.wrt,
        **kw,
    )[1]


def _through_ddim(problem: _Problem, ts, noise, *, method: str):
    """The gradient of ``method`` (a name in :data:`sagkit.METHODS`) through DDIM on ``ts``."""
    model, loss_fn, x = problem.model, problem.loss_fn, problem.x
    return loss_grad(
        model, loss_fn, x, ts, method=method, solver="ddim", cond=problem.cond, wrt=problem.wrt
    )[1]


def _backprop_sde(problem: _Problem, ts, noise):
    """Backprop through the SDE sampler on ``ts`` with the fixed ``noise``."""
    leaf = problem.x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        sample = sde_sample(problem.model, leaf, ts, cond=problem.cond, noise=noise)[0]
        return torch.autograd.grad(evaluate_loss(problem.loss_fn, sample), leaf)[0]


def _methods(problem: _Problem, *, state_solver: str) -> dict:
    """The methods compared, by label: each maps (ts, noise) to the gradient."""
    model, sde = problem.model, problem.sde
    params = ("eps", "data") + (
        ("velocity",) if model.schedule.ode is VelocityFrame and not sde else ()
    )
    methods = {
        f"adjointdeis-{'1' if order == 1 else '2M'} ({param})": partial(
            _adjointdeis, problem, order=order, param=param, state_solver=state_solver
        )
        for order in (1, 2)
        for param in params
    }
    if sde:
        methods["backprop (sde sampler)"] = partial(_backprop_sde, problem)
    else:
        methods["backprop (ddim)"] = partial(_through_ddim, problem, method="backprop")
        methods["adjoint (vanilla)"] = partial(_through_ddim, problem, method="adjoint")
    return methods


def _sde_noises(x: torch.Tensor, steps, *, seed: int):
    """The SDE sampler's fixed noise for each M in ``steps``, (M, *x.shape), drawn in turn from
    one generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for m in steps:
        yield torch.randn((int(m), *x.shape), generator=gen, dtype=x.dtype)


def _relative_errors(methods: dict, ref: torch.Tensor, grids, noises, *, progress: bool) -> dict:
    """‖g − ref‖ / ‖ref‖ of each method on each grid, with that grid's noise: {label: [error]}."""
    errors = {label: [] for label in methods}
    runs = zip(grids, noises, strict=True)
    for ts, noise in tqdm(
        runs, total=len(grids), desc="convergence", disable=not progress, leave=False
    ):
        for label, run in methods.items():
            g = run(ts, noise)
            errors[label].append(float((g - ref).norm() / ref.norm()))
    return errors


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
    problem = _Problem(model, loss_fn, x, cond=cond, wrt=wrt, sde=sde)
    ref, info = _reference(problem, reference, t_start, t_end, steps=reference_steps, seed=seed)
    methods = _methods(problem, state_solver=state_solver)
    grids = [time_grid(model.schedule, t_start, t_end, int(m), spacing=spacing) for m in steps]
    noises = _sde_noises(x, steps, seed=seed) if sde else [None] * len(grids)
    errors = _relative_errors(methods, ref, grids, noises, progress=progress)
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
