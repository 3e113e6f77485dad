"""AdjointDEIS: exponential-integrator solvers for the adjoint of a diffusion ODE or SDE.

Blasingame & Liu 2024, "AdjointDEIS: Efficient Gradients for Diffusion Models". For a loss L of
the sample, the adjoint states a_x(t) = ∂L/∂x_t, a_z(t) = ∂L/∂z (conditioning) and
a_θ(t) = ∂L/∂θ (weights) obey, integrated from the clean end t back to the noisier end s
(t < s, h = λ_s − λ_t < 0, λ = log(α/σ)),

    a_x(s) = (α_t/α_s) a_x(t) + (1/α_s) ∫_{λ_t}^{λ_s} α_λ² e^{−λ} a_x(λ)ᵀ ∂ε/∂x dλ,
    a_z(s) = a_z(t) + ∫_{λ_t}^{λ_s} α_λ e^{−λ} a_x(λ)ᵀ ∂ε/∂z dλ           (a_θ likewise),

starting from a_x = ∂L/∂x_{t_end}, a_z = a_θ = 0. Freezing V = α² a_xᵀ ∂ε/∂x (and α a_xᵀ ∂ε/∂z)
at (x_t, t) gives AdjointDEIS-1; the multistep extrapolation from the previous point r gives
AdjointDEIS-2M (see :func:`adjoint_step`). The SDE adjoint (noise path fixed) doubles every
ε term. A data-prediction variant (not in the paper) freezes W = σ² a_xᵀ ∂x̂0/∂x instead.

All four variants are one Euler-type update in the frames of :mod:`sagkit.sde`: with the
scaled adjoint u = κ_t a_x,

    u(s)   = u(t)   + c (ν_t − ν_s) D_x,        V_x = κ_t uᵀ ∂F(x_t, t)/∂x_t,
    a_z(s) = a_z(t) + c (ν_t − ν_s) D_z,        V_z = uᵀ ∂F(x_t, t)/∂z,

D = V (order 1) or D = (1 + 1/(2r)) V(t) − 1/(2r) V(r), r = h_prev/h (order 2). In the "eps"
frame (κ = α, ν = ρ = σ/α, F = ε, c = 1) this is the paper's
a_x(s) = (α_t/α_s) a_x(t) + σ_s(e^h − 1)(α_t²/α_s²) a_x(t)ᵀ ∂ε(x_t)/∂x_t, since
ρ_t − ρ_s = (σ_s/α_s)(e^h − 1). In the "data" frame (κ = σ, ν = τ = α/σ, F = x̂0) it is
a_x(s) = (σ_t/σ_s) a_x(t) + (α_t/(σ_t σ_s))(1 − e^h) W.

Usage::

    loss, g = sk.loss_grad(model, loss_fn, x_T, ts, method="adjointdeis-2")
    loss, (gx, gz) = adjointdeis_grad(model, loss_fn, x_T, ts, order=2, cond=z, wrt=("x", "cond"))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .gradients import (
    METHODS,
    GradientMethod,
    _normalise_wrt,
    evaluate_loss,
    loss_grad,
    register_method,
    trainable_parameters,
)
from .models import GaussianMixture
from .schedules import time_grid
from .sde import Frame, get_frame, sde_sample
from .solvers import check_grid, get_tableau, solve

__all__ = [
    "adjointdeis_grad",
    "adjoint_step",
    "exact_gradient",
    "reference_gradient",
    "convergence_study",
    "format_table",
    "plot_convergence",
]


def _vjp(model, frame: Frame, x, t: float, cond, u, names, params):
    """F(x_t, t) and V = (κ_t uᵀ ∂F/∂x, [uᵀ ∂F/∂z], [uᵀ ∂F/∂θ ...]) from one network call.

    Shapes: x, u (B, ...); cond as given; params as the model's trainable parameters.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        cg = None if cond is None else cond.detach().requires_grad_("cond" in names)
        f = frame.predict(model, xg, t, cg)
        inputs = [xg, *([cg] if "cond" in names else []), *params]
        got = torch.autograd.grad(f, inputs, grad_outputs=u, allow_unused=True)
    got = [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, got, strict=True)]
    got[0] = frame.kappa(model.schedule, t) * got[0]
    return f.detach(), got


def adjoint_step(frame: Frame, schedule, t: float, s: float, acc, V, prev=None):
    """One AdjointDEIS step from t to s > t (Blasingame & Liu 2024, the -1 and -2M updates).

    acc: the adjoint states (u = κ_t a_x, a_z, a_θ...); V: their increments' integrands at
    (x_t, t) (from :func:`_vjp`); prev: ``(V(r), h_prev)`` of the previous step for
    AdjointDEIS-2M, or ``None`` for AdjointDEIS-1. With h = λ_s − λ_t and r = h_prev/h,

        D = V                                         (order 1)
        D = (1 + 1/(2r)) V(t) − (1/(2r)) V(r)         (order 2, multistep)
        acc ← acc + c (ν_t − ν_s) D.

    Returns the new states, a list like ``acc``.
    """
    D = V
    if prev is not None:
        V_r, h_prev = prev
        h = schedule.lam(float(s)) - schedule.lam(float(t))
        if math.isfinite(h_prev) and math.isfinite(h):
            w = 0.5 * h / h_prev  # 1/(2 r)
            D = [(1 + w) * v - w * v_r for v, v_r in zip(V, V_r, strict=True)]
    coef = frame.c * (frame.nu(schedule, t) - frame.nu(schedule, s))
    return [a + coef * d for a, d in zip(acc, D, strict=True)]


def _forward(model, x, ts, solver, cond, frame: Frame, noise, keep: bool):
    """The sample and (when ``keep``) the states at every grid point, without a graph."""
    states = [None] * len(ts)

    def store(i, t, x_i):
        states[i] = x_i.detach()

    callback = store if keep else None
    with torch.no_grad():
        if frame.sde:
            x_end, _ = sde_sample(
                model,
                x,
                ts,
                cond,
                noise=noise,
                parameterisation=frame.prediction,
                callback=callback,
            )
        else:
            x_end = solve(model, x, ts, solver=solver, cond=cond, callback=callback)
    return x_end.detach(), states


def adjointdeis_grad(
    model,
    loss_fn,
    x: torch.Tensor,
    ts,
    order: int = 1,
    parameterisation: str = "eps",
    states: str = "stored",
    sde: bool = False,
    noise: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    wrt: str | Sequence[str] = "x",
    solver: str = "ddim",
    progress: bool = False,
):
    """L(x_end) and its gradient by AdjointDEIS-1 or -2M (Blasingame & Liu 2024).

    Args:
        model: a model of the protocol.
        loss_fn: maps the sample (B, ...) to a scalar or to (B,) values that are summed.
        x: (B, ...) the state at ``ts[0]``.
        ts: strictly decreasing grid; the adjoint uses the same grid backwards.
        order: 1 (AdjointDEIS-1) or 2 (AdjointDEIS-2M; its first step is -1).
        parameterisation: "eps" (the paper: V = α² a_xᵀ ∂ε/∂x) or "data" (W = σ² a_xᵀ ∂x̂0/∂x;
            needs ts[-1] > 0).
        states: "stored" (the forward solve's states, as the authors do) or "resolved" (the
            state is re-solved backwards alongside the adjoint with the same update on F,
            i.e. DDIM / DPM-Solver-2M inversion; ODE only, less accurate).
        sde: the forward pass is :func:`sagkit.sde.sde_sample` with ``noise`` and the adjoint is
            the SDE one (ε terms doubled).
        noise: (M, B, ...) the forward noise; required when ``sde``.
        cond: conditioning; needed for ``wrt="cond"``.
        wrt: "x", "cond", "params" or a tuple of them (as :func:`sagkit.loss_grad`).
        solver: the ODE solver of the forward pass (its states are the ones stored), e.g.
            "ddim", or "rk4" for accurate states.
    Returns:
        ``(loss, grad)`` as :func:`sagkit.loss_grad`: a_x(ts[0]) shaped like x, a_z like cond,
        a tuple over ``trainable_parameters(model)`` for "params".
    Cost: M forward evaluations plus M evaluations with one vector–Jacobian product each;
    memory: the M + 1 states and one evaluation's graph.
    """
    frame = get_frame(parameterisation, sde)
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (AdjointDEIS-1) or 2 (AdjointDEIS-2M), got {order!r}")
    if states not in ("stored", "resolved"):
        raise ValueError(f"states must be 'stored' or 'resolved', got {states!r}")
    if sde and noise is None:
        raise ValueError(
            "the SDE adjoint needs the forward pass's noise realisation: pass noise= "
            "(from sagkit.sde_sample, or sagkit.encode / recover_noise for a given image)"
        )
    if sde and states == "resolved":
        raise ValueError(
            "states='resolved' is for the ODE only; the SDE adjoint needs stored states"
        )
    names, single = _normalise_wrt(wrt)
    if "cond" in names and cond is None:
        raise ValueError('wrt="cond" needs a cond tensor')
    ts = check_grid(ts)
    get_tableau(solver)
    frame.check_times(ts)
    params = trainable_parameters(model) if "params" in names else []

    x_end, traj = _forward(model, x, ts, solver, cond, frame, noise, keep=states == "stored")
    with torch.enable_grad():
        leaf = x_end.clone().requires_grad_(True)
        loss = evaluate_loss(loss_fn, leaf)
        (a_x,) = torch.autograd.grad(loss, leaf)

    sc = model.schedule
    acc = [frame.kappa(sc, ts[-1]) * a_x]
    acc += [torch.zeros_like(cond)] if "cond" in names else []
    acc += [torch.zeros_like(p) for p in params]
    x_t, prev, prev_f, prev_h = x_end, None, None, None
    resolve = states == "resolved"
    n = len(ts) - 1
    for k in tqdm(range(n, 0, -1), desc="adjointdeis", disable=not progress, leave=False):
        t, s = float(ts[k]), float(ts[k - 1])
        if not resolve:
            x_t = traj[k]
        f, V = _vjp(model, frame, x_t, t, cond, acc[0], names, params)
        if resolve:
            # the state rides along as one more component: −Y (Y = x/κ) with integrand F, so
            # that the same update gives Y_s = Y_t + c(ν_s − ν_t) D_F (DDIM / 2M inversion)
            acc, V = [*acc, -x_t / frame.kappa(sc, t)], [*V, f]
        step_prev = None
        if order == 2 and prev is not None:
            step_prev = ([*prev, prev_f] if resolve else prev, prev_h)
        acc = adjoint_step(frame, sc, t, s, acc, V, step_prev)
        if resolve:
            x_t = -frame.kappa(sc, s) * acc.pop()
            V.pop()
        prev, prev_f, prev_h = V, f, sc.lam(s) - sc.lam(t)

    grads = {"x": acc[0] / frame.kappa(sc, ts[0])}
    if "cond" in names:
        grads["cond"] = acc[1]
    if "params" in names:
        grads["params"] = tuple(acc[-len(params) :])
    out = tuple(grads[w] for w in names)
    return loss.detach(), out[0] if single else out


def _register():
    """adjointdeis-1, adjointdeis-2 (eps, stored states) and their -data variants."""
    for order in (1, 2):
        for param in ("eps", "data"):
            name = f"adjointdeis-{order}" + ("" if param == "eps" else "-data")

            def fn(model, loss_fn, x, ts, solver, cond, wrt, order=order, param=param):
                loss, g = adjointdeis_grad(
                    model, loss_fn, x, ts, order, param, cond=cond, wrt=wrt, solver=solver
                )
                return loss, g

            register_method(
                GradientMethod(
                    name,
                    fn,
                    wrt=("x", "cond", "params"),
                    exact=False,
                    description=f"AdjointDEIS-{'1' if order == 1 else '2M'} ({param} prediction, "
                    "stored states): the continuous adjoint by an exponential integrator",
                )
            )


_register()


# --- ground truth and the convergence study ----------------------------------------------


def exact_gradient(model: GaussianMixture, loss_fn, x, t_start: float, t_end: float, sde=False):
    """∂L(x_end)/∂x_T of the exact flow for a one-component :class:`GaussianMixture`.

    ODE: x_e = α_e μ + sqrt(v_e/v_T)(x_T − α_T μ), so ∂x_e/∂x_T = sqrt(v_e/v_T) I with
    v = α² s² + σ². SDE (any fixed noise path; ∂ε/∂x = σ/v does not depend on x):
    ∂x_e/∂x_T = (v_e α_T)/(v_T α_e) I. The loss gradient is taken at the ODE end point, which
    for the SDE is exact only when ∂L/∂x_e does not depend on x_e (a linear loss).
    Returns ``(loss, grad)`` (B, ...).
    """
    if not isinstance(model, GaussianMixture) or model.means.shape[0] != 1:
        raise ValueError("exact_gradient needs a one-component GaussianMixture")
    sc = model.schedule
    a_T, a_e = sc.alpha(float(t_start)), sc.alpha(float(t_end))
    v_T, v_e = (a**2 * model.std**2 + 1 - a**2 for a in (a_T, a_e))
    mu = model.means[0].detach().to(x)
    x_e = (a_e * mu + math.sqrt(v_e / v_T) * (x - a_T * mu)).detach().requires_grad_(True)
    with torch.enable_grad():
        loss = evaluate_loss(loss_fn, x_e)
        (g,) = torch.autograd.grad(loss, x_e)
    jac = (v_e * a_T) / (v_T * a_e) if sde else math.sqrt(v_e / v_T)
    return loss.detach(), jac * g


def reference_gradient(
    model,
    loss_fn,
    x,
    t_start: float,
    t_end: float,
    cond=None,
    wrt: str = "x",
    steps: int = 1024,
    fd_delta: float = 1e-4,
    seed: int = 0,
):
    """The continuous gradient by a very fine solve, extrapolated, and checked by finite differences.

    Backprop through RK4 on a grid uniform in λ (uniform in t when t_end = 0) with ``steps`` and
    2·``steps`` steps, then Richardson for order 4: g = g₂ + (g₂ − g₁)/15. The relative size of
    (g₂ − g₁)/15 is the error estimate; a central difference (float64, ``fd_delta``) of the fine
    loss along a random direction v is compared with ⟨g, v⟩.

    Returns a dict: ``grad``, ``loss``, ``extrapolation_error`` and ``fd_error`` (relative).
    """
    spacing = "lambda" if t_end > 0 else "time"
    grads = []
    for n in (steps, 2 * steps):
        ts = time_grid(model.schedule, t_start, t_end, n, spacing)
        loss, g = loss_grad(model, loss_fn, x, ts, "backprop", "rk4", cond, wrt)
        grads.append(g)
    g = grads[1] + (grads[1] - grads[0]) / 15
    extrap = float((grads[1] - grads[0]).norm() / 15 / g.norm())
    target = x if wrt == "x" else cond
    v = torch.randn(target.shape, generator=torch.Generator().manual_seed(seed), dtype=target.dtype)
    ts = time_grid(model.schedule, t_start, t_end, 2 * steps, spacing)

    def at(delta):
        xx, cc = (x + delta * v, cond) if wrt == "x" else (x, cond + delta * v)
        with torch.no_grad():
            return float(evaluate_loss(loss_fn, solve(model, xx, ts, "rk4", cc)))

    fd = (at(fd_delta) - at(-fd_delta)) / (2 * fd_delta)
    directional = float((g * v).sum())
    return {
        "grad": g,
        "loss": loss,
        "extrapolation_error": extrap,
        "fd_error": abs(fd - directional) / abs(directional),
    }


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


def _fit_slope(steps, errors, last: int) -> float:
    """−d log(error)/d log(M), least squares over the last ``last`` points."""
    m = torch.tensor([math.log(s) for s in steps[-last:]], dtype=torch.float64)
    e = torch.tensor([math.log(max(err, 1e-300)) for err in errors[-last:]], dtype=torch.float64)
    m, e = m - m.mean(), e - e.mean()
    return float(-(m * e).sum() / (m * m).sum())


def convergence_study(
    model,
    loss_fn,
    x: torch.Tensor,
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

    Methods: AdjointDEIS-1 and -2M in both parameterisations (states from ``state_solver`` on
    the same grid, "rk4" by default so that the error measured is the adjoint's own, not the
    forward solver's), backprop through DDIM (its own states), and the vanilla continuous
    adjoint (method "adjoint" of :data:`sagkit.METHODS`) when it is registered. With ``sde``
    the forward pass is the SDE sampler with fixed noise (one Gaussian and a linear loss only:
    the reference is closed form), and the baseline is backprop through that sampler. The
    default M reach 320 because 80 → 160 is not yet asymptotic for AdjointDEIS-1 at t_start = 1.

    Reference: :func:`exact_gradient` for a one-component Gaussian mixture and wrt "x", else
    :func:`reference_gradient` with ``reference_steps`` (or pass ``reference``, a tensor).

    Returns a dict: ``steps``, ``errors`` {label: [relative error per M]}, ``slopes`` {label:
    −d log err / d log M fitted on the last ``fit_last`` M}, ``reference`` (a dict with
    ``kind`` and its error estimates), ``states`` (how the adjoint's states were made).
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
        info = reference_gradient(model, loss_fn, x, t_start, t_end, cond, wrt, reference_steps)
        ref = info.pop("grad")
        info.pop("loss")
        info["kind"] = (
            f"RK4 backprop, {reference_steps} and {2 * reference_steps} steps, Richardson"
        )

    def deis(order, param):
        def run(ts, noise):
            kw = {"sde": True, "noise": noise} if sde else {"solver": state_solver}
            return adjointdeis_grad(model, loss_fn, x, ts, order, param, cond=cond, wrt=wrt, **kw)[
                1
            ]

        return run

    def backprop(ts, noise):
        if not sde:
            return loss_grad(model, loss_fn, x, ts, "backprop", "ddim", cond, wrt)[1]
        leaf = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = evaluate_loss(loss_fn, sde_sample(model, leaf, ts, cond, noise=noise)[0])
            return torch.autograd.grad(loss, leaf)[0]

    methods = {}
    for order in (1, 2):
        for param in ("eps", "data"):
            methods[f"adjointdeis-{'1' if order == 1 else '2M'} ({param})"] = deis(order, param)
    methods["backprop (sde sampler)" if sde else "backprop (ddim)"] = backprop
    if "adjoint" in METHODS and not sde:
        methods["adjoint (vanilla)"] = lambda ts, noise: loss_grad(
            model, loss_fn, x, ts, "adjoint", "ddim", cond, wrt
        )[1]

    errors = {label: [] for label in methods}
    gen = torch.Generator().manual_seed(seed)
    for m in tqdm(steps, desc="convergence", disable=not progress, leave=False):
        ts = time_grid(model.schedule, t_start, t_end, int(m), spacing)
        noise = torch.randn((int(m), *x.shape), generator=gen, dtype=x.dtype) if sde else None
        for label, run in methods.items():
            g = run(ts, noise)
            errors[label].append(float((g - ref).norm() / ref.norm()))
    slopes = {label: _fit_slope(list(steps), e, fit_last) for label, e in errors.items()}
    states = "SDE sampler (stored noise)" if sde else f"{state_solver} on the same grid"
    return {
        "steps": list(steps),
        "errors": errors,
        "slopes": slopes,
        "reference": info,
        "states": states,
    }


def format_table(study: dict) -> str:
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


def plot_convergence(study: dict, ax=None, title: str | None = None):
    """Log–log plot of :func:`convergence_study`: relative error against M, fitted slopes in the
    legend, with reference lines of slope 1 and 2; errors above 10 are off the top. Returns the
    matplotlib Figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4.5))
    steps = study["steps"]
    for label, errs in study["errors"].items():
        style = "--" if "eps" in label else ("-" if "data" in label else ":")
        ax.loglog(
            steps, errs, "o" + style, ms=4, label=f"{label}  (slope {study['slopes'][label]:.2f})"
        )
    m = torch.tensor(steps, dtype=torch.float64)
    anchor = min(min(e[-1] for e in study["errors"].values()), 1.0)
    for p in (1, 2):
        ax.loglog(steps, (anchor * (m[-1] / m) ** p).tolist(), color="0.7", lw=0.8)
        start = anchor * (steps[-1] / steps[0]) ** p
        ax.annotate(f"$O(M^{{-{p}}})$", (steps[0], start), color="0.5", fontsize=8)
    ax.set(xlabel="M (steps)", ylabel="relative error of the gradient", title=title or "")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_ylim(top=min(ax.get_ylim()[1], 10.0))  # an unstable method at few steps: off the top
    ax.legend(fontsize=7)
    return ax.figure
