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

All four variants are one Euler-type update in the frames of :mod:`sagkit.core.frames`: with the
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
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core.checks import check_gradients, check_inputs, show_progress
from ..core.frames import DataFrame, EpsFrame, Frame, get_frame, ode_frame
from ..core.sde import sde_sample
from ..core.solvers import SOLVERS, check_grid, solve
from .api import GradientMethod, evaluate_loss, normalise_wrt, trainable_parameters
from .memory import hold

__all__ = ["adjointdeis_grad", "adjoint_step", "BUILTIN"]


def _vjp(model, frame: Frame, x, t: float, *, cond, u, names, params):
    """F(x_t, t) and V = (κ_t uᵀ ∂F/∂x, [uᵀ ∂F/∂z], [uᵀ ∂F/∂θ ...]) from one network call.

    Shapes: x, u (B, ...); cond as given; params as the model's trainable parameters.

    (docs/maths.md §6.2)
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


def adjoint_step(frame: Frame, schedule, t: float, s: float, acc, V, *, prev=None):
    """One AdjointDEIS step from t to s > t (Blasingame & Liu 2024, the -1 and -2M updates).

    acc: the adjoint states (u = κ_t a_x, a_z, a_θ...); V: their increments' integrands at
    (x_t, t) (from :func:`_vjp`); prev: ``(V(r), h_prev)`` of the previous step for
    AdjointDEIS-2M, or ``None`` for AdjointDEIS-1. With h the frame's step length
    (:meth:`~sagkit.core.frames.Frame.step_length`: λ_s − λ_t, or ν_s − ν_t in the velocity
    frame) and r = h_prev/h,

        D = V                                         (order 1)
        D = (1 + 1/(2r)) V(t) − (1/(2r)) V(r)         (order 2, multistep)
        acc ← acc + c (ν_t − ν_s) D.

    Returns the new states, a list like ``acc``.

    (docs/maths.md §6.2, §6.3, §6.4, §6.5, §6.7)
    """
    D = V
    if prev is not None:
        V_r, h_prev = prev
        h = frame.step_length(schedule, t, s)
        if math.isfinite(h_prev) and math.isfinite(h):
            w = 0.5 * h / h_prev  # 1/(2 r)
            D = [(1 + w) * v - w * v_r for v, v_r in zip(V, V_r, strict=True)]
    coef = frame.c * (frame.nu(schedule, t) - frame.nu(schedule, s))
    return [a + coef * d for a, d in zip(acc, D, strict=True)]


@dataclass(frozen=True)
class _Plan:
    """The checked inputs of one :func:`adjointdeis_grad` call."""

    model: object
    frame: Frame
    ts: torch.Tensor
    cond: torch.Tensor | None
    names: tuple[str, ...]
    single: bool
    params: list
    order: int
    resolve: bool
    progress: bool


def _frame_of(model, parameterisation, sde: bool) -> Frame:
    """The adjoint's frame: ``parameterisation`` (a name or a frame), by default the frame the
    schedule's ODE is solved in (ε for the SDE)."""
    if parameterisation is None:
        parameterisation = EpsFrame if sde else ode_frame(model.schedule)
    return get_frame(parameterisation, sde=sde)


def _check_options(order: int, states: str, sde: bool, noise) -> None:
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


def _checked_plan(
    model, x, ts, order, parameterisation, states, sde, noise, cond, wrt, solver, progress
) -> _Plan:
    """The arguments of :func:`adjointdeis_grad` checked (in this order) into a :class:`_Plan`."""
    check_inputs(model, x, cond=cond)
    frame = _frame_of(model, parameterisation, sde)
    _check_options(order, states, sde, noise)
    names, single = normalise_wrt(wrt)
    if "cond" in names and cond is None:
        raise ValueError('wrt="cond" needs a cond tensor')
    ts = check_grid(ts)
    progress = show_progress(progress, len(ts) - 1)
    SOLVERS[solver]
    frame.check_times(ts, model.schedule)
    params = trainable_parameters(model) if "params" in names else []
    resolve = states == "resolved"
    return _Plan(model, frame, ts, cond, names, single, params, order, resolve, progress)


def _forward(plan: _Plan, x, *, solver, noise):
    """The sample and (with stored states) the states at every grid point, without a graph."""
    states = [None] * len(plan.ts)

    def store(i, t, x_i):
        states[i] = hold(x_i.detach())  # kept outside autograd: reported to the profiler

    callback = None if plan.resolve else store
    with torch.no_grad():
        if plan.frame.sde:
            x_end, _ = sde_sample(
                plan.model,
                x,
                plan.ts,
                cond=plan.cond,
                noise=noise,
                parameterisation=plan.frame,
                callback=callback,
            )
        else:
            x_end = solve(plan.model, x, plan.ts, solver=solver, cond=plan.cond, callback=callback)
    return x_end.detach(), states


def _loss_and_adjoint(loss_fn, x_end: torch.Tensor):
    """L(x_end) and a_x = ∂L/∂x_end."""
    with torch.enable_grad():
        leaf = x_end.clone().requires_grad_(True)
        loss = evaluate_loss(loss_fn, leaf)
        (a_x,) = torch.autograd.grad(loss, leaf)
    return loss, a_x


def _backward(plan: _Plan, a_x: torch.Tensor, x_end: torch.Tensor, traj) -> list:
    """The adjoint states (u = κ a_x, [a_z], [a_θ ...]) at ts[0], integrated from a_x at
    ts[-1] by :func:`adjoint_step` along the stored states ``traj``, or re-solving the state
    alongside (``plan.resolve``)."""
    model, frame, ts, sc, resolve = (
        plan.model,
        plan.frame,
        plan.ts,
        plan.model.schedule,
        plan.resolve,
    )
    acc = [frame.kappa(sc, ts[-1]) * a_x]
    acc += [torch.zeros_like(plan.cond)] if "cond" in plan.names else []
    acc += [torch.zeros_like(p) for p in plan.params]
    x_t, prev, prev_f, prev_h = x_end, None, None, None
    n = len(ts) - 1
    for k in tqdm(range(n, 0, -1), desc="adjointdeis", disable=not plan.progress, leave=False):
        t, s = float(ts[k]), float(ts[k - 1])
        if not resolve:
            x_t = traj[k]
        f, V = _vjp(
            model, frame, x_t, t, cond=plan.cond, u=acc[0], names=plan.names, params=plan.params
        )
        if resolve:
            # the state rides along as one more component: −Y (Y = x/κ) with integrand F, so
            # that the same update gives Y_s = Y_t + c(ν_s − ν_t) D_F (DDIM / 2M inversion)
            acc, V = [*acc, -x_t / frame.kappa(sc, t)], [*V, f]
        step_prev = None
        if plan.order == 2 and prev is not None:
            step_prev = ([*prev, prev_f] if resolve else prev, prev_h)
        acc = adjoint_step(frame, sc, t, s, acc, V, prev=step_prev)
        if resolve:
            x_t = -frame.kappa(sc, s) * acc.pop()
            V.pop()
        prev, prev_f, prev_h = V, f, frame.step_length(sc, t, s)
    return acc


def _gradients(plan: _Plan, acc: list):
    """The requested gradients from the adjoint states at ts[0], checked: a_x = u/κ_{ts[0]},
    a_z, a_θ; one tensor for a single ``wrt``, else a tuple in ``wrt``'s order."""
    names, params = plan.names, plan.params
    grads = {"x": acc[0] / plan.frame.kappa(plan.model.schedule, plan.ts[0])}
    if "cond" in names:
        grads["cond"] = acc[1]
    if "params" in names:
        grads["params"] = tuple(acc[-len(params) :])
    out = tuple(grads[w] for w in names)
    check_gradients(out, names, method=f"adjointdeis-{plan.order}")
    return out[0] if plan.single else out


def adjointdeis_grad(
    model,
    loss_fn,
    x: torch.Tensor,
    ts,
    *,
    order: int = 1,
    parameterisation: str | Frame | type[Frame] | None = None,
    states: str = "stored",
    sde: bool = False,
    noise: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    wrt: str | Sequence[str] = "x",
    solver: str = "ddim",
    progress: bool | None = None,
):
    """L(x_end) and its gradient by AdjointDEIS-1 or -2M (Blasingame & Liu 2024).

    Args:
        model: a model of the protocol.
        loss_fn: maps the sample (B, ...) to a scalar or to (B,) values that are summed.
        x: (B, ...) the state at ``ts[0]``.
        ts: strictly decreasing grid; the adjoint uses the same grid backwards.
        order: 1 (AdjointDEIS-1) or 2 (AdjointDEIS-2M; its first step is -1).
        parameterisation: "eps" (the paper: V = α² a_xᵀ ∂ε/∂x), "data" (W = σ² a_xᵀ ∂x̂0/∂x;
            needs ts[-1] > 0) or "velocity" (V = (α + σ)² a_xᵀ ∂v/∂x; the ODE of a flow
            schedule, finite at t = 1 where α = 0). ``None`` (default): the frame the
            schedule's ODE is solved in, "eps" for VP schedules and "velocity" for flow ones
            (:func:`~sagkit.core.frames.ode_frame`; "eps" for the SDE). A frame class or a
            frame stands for its parameterisation (:func:`~sagkit.core.frames.get_frame`).
        states: "stored" (the forward solve's states, as the authors do) or "resolved" (the
            state is re-solved backwards alongside the adjoint with the same update on F,
            i.e. DDIM / DPM-Solver-2M inversion; ODE only, less accurate).
        sde: the forward pass is :func:`sagkit.sde_sample` with ``noise`` and the adjoint is
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

    (docs/maths.md §6.1)
    """
    plan = _checked_plan(
        model, x, ts, order, parameterisation, states, sde, noise, cond, wrt, solver, progress
    )
    x_end, traj = _forward(plan, x, solver=solver, noise=noise)
    loss, a_x = _loss_and_adjoint(loss_fn, x_end)
    acc = _backward(plan, a_x, x_end, traj)
    return loss.detach(), _gradients(plan, acc)


def _engine(order: int, frame: type[Frame] | None) -> GradientMethod:
    """AdjointDEIS-1 or -2M in one frame class (``None``: the schedule's own, ε for VP
    schedules and the velocity for flow schedules), with stored states, as a gradient engine."""
    shown = "the ODE frame" if frame is None else frame.parameterisation
    name = f"adjointdeis-{order}" + ("" if frame is None else f"-{frame.parameterisation}")

    def fn(model, loss_fn, x, ts, *, solver, cond, names):
        return adjointdeis_grad(
            model,
            loss_fn,
            x,
            ts,
            order=order,
            parameterisation=frame,
            cond=cond,
            wrt=names,
            solver=solver,
        )

    return GradientMethod(
        name,
        fn,
        wrt=("x", "cond", "params"),
        exact=False,
        description=f"AdjointDEIS-{'1' if order == 1 else '2M'} "
        f"({shown}'s prediction, stored states): the continuous "
        "adjoint by an exponential integrator",
        needs_positive_end=frame is not None and frame.needs_positive_end,  # τ = ∞ at t = 0
    )


BUILTIN = tuple(_engine(order, frame) for order in (1, 2) for frame in (None, DataFrame))
"""adjointdeis-1, adjointdeis-2 (eps, stored states) and their -data variants, registered by
:mod:`sagkit.gradients`."""
