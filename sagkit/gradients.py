"""Gradients of a loss of the solve's output, ∂L(Φ(x))/∂(x, cond, θ), by interchangeable methods.

    loss, grad = sk.loss_grad(model, loss_fn, x, ts, method="symplectic", solver="ddim")

Φ is the n-step solve of :func:`sagkit.solve` on the grid ``ts``. Methods live in a registry
(:data:`METHODS`); each says which ``wrt`` it supports and whether it is exact for Φ:

- "backprop": autograd through the unrolled solve. Exact; saved activations grow linearly in n.
- "checkpoint": ``torch.utils.checkpoint`` around every step. Exact; keeps the n + 1 states and
  recomputes one step at a time in backward.
- "symplectic": the symplectic adjoint (Matsubara, Miyatake & Yaguchi 2021), as used by SAG
  (Pan et al. 2023). Exact up to rounding; keeps the n + 1 states, one step's graph at a time.
- "adjoint": the vanilla continuous adjoint of ``torchdiffeq.odeint_adjoint``. Approximate.

:func:`finite_difference` is the referee: a float64 central difference along a direction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from .solvers import ProbabilityFlow, check_grid, get_tableau, rho_of_t, rk_stages, rk_step, solve

__all__ = [
    "loss_grad",
    "METHODS",
    "GradientMethod",
    "register_method",
    "evaluate_loss",
    "finite_difference",
]

WRT = ("x", "cond", "params")


@dataclass(frozen=True)
class GradientMethod:
    """A gradient engine.

    ``fn(model, loss_fn, x, ts, solver, cond, wrt)`` returns ``(loss, grads)`` with ``grads`` a
    tuple in the order of ``wrt`` (a tuple of names from "x", "cond", "params"); the gradient
    for "params" is itself a tuple over ``trainable_parameters(model)``.
    """

    name: str
    fn: Callable
    wrt: tuple[str, ...]
    exact: bool
    description: str


METHODS: dict[str, GradientMethod] = {}


def register_method(method: GradientMethod) -> GradientMethod:
    """Add a gradient engine to the registry under ``method.name``."""
    METHODS[method.name] = method
    return method


def trainable_parameters(model) -> list[torch.Tensor]:
    """The model's parameters that require grad (those ``wrt="params"`` differentiates)."""
    params = (
        [p for p in model.parameters() if p.requires_grad] if hasattr(model, "parameters") else []
    )
    if not params:
        raise ValueError(
            'wrt="params" needs a model with parameters that require grad (call model.requires_grad_())'
        )
    return params


def evaluate_loss(loss_fn: Callable, x_out: torch.Tensor) -> torch.Tensor:
    """L = loss_fn(x_out) as a scalar: a (B,) result is summed. Rejects other shapes, NaN and inf."""
    value = loss_fn(x_out)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(value).__name__}")
    if value.ndim == 1 and value.shape[0] == x_out.shape[0]:
        value = value.sum()
    elif value.ndim != 0:
        raise ValueError(
            f"loss_fn must return a scalar or ({x_out.shape[0]},) values, got shape {tuple(value.shape)}"
        )
    if not bool(torch.isfinite(value.detach())):
        raise ValueError(f"loss_fn returned a non-finite value ({value.item()})")
    return value


def _normalise_wrt(wrt) -> tuple[tuple[str, ...], bool]:
    single = isinstance(wrt, str)
    names = (wrt,) if single else tuple(wrt)
    bad = [w for w in names if w not in WRT]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"wrt must be one of {WRT} or a tuple of distinct ones, got {wrt!r}")
    return names, single


def loss_grad(
    model,
    loss_fn: Callable,
    x: torch.Tensor,
    ts,
    method: str = "symplectic",
    solver: str = "ddim",
    cond: torch.Tensor | None = None,
    wrt: str | Sequence[str] = "x",
):
    """The loss L(Φ(x)) and its gradient, Φ the ``solver`` solve on ``ts``.

    Args:
        model: a model of the protocol.
        loss_fn: maps the solve's output (B, ...) to a scalar, or to (B,) values that are summed.
        x: (B, ...) the state at ``ts[0]``.
        ts: strictly decreasing grid (see :func:`sagkit.time_grid`).
        method: a name in :data:`METHODS`.
        solver: a name in :data:`sagkit.SOLVERS`.
        cond: conditioning passed to the model; needed for ``wrt="cond"``.
        wrt: "x", "cond", "params", or a tuple of them.
    Returns:
        ``(loss, grad)``: loss a detached 0-dim tensor; grad shaped like x (or cond), a tuple
        of tensors for "params", and a tuple of these when ``wrt`` is a tuple.
    """
    try:
        engine = METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown method {method!r}; known methods: {', '.join(METHODS)}"
        ) from None
    names, single = _normalise_wrt(wrt)
    unsupported = [w for w in names if w not in engine.wrt]
    if unsupported:
        raise ValueError(
            f"method {method!r} supports wrt in {engine.wrt}, not {tuple(unsupported)}"
        )
    if "cond" in names and cond is None:
        raise ValueError('wrt="cond" needs a cond tensor')
    get_tableau(solver)
    ts = check_grid(ts)
    loss, grads = engine.fn(model, loss_fn, x, ts, solver, cond, names)
    return loss.detach(), (grads[0] if single else tuple(grads))


def _leaves(model, x, cond, names):
    """Fresh leaves for the requested inputs: (x, cond, {name: tensor or list of params})."""
    x = x.detach().requires_grad_("x" in names)
    if cond is not None:
        cond = cond.detach().requires_grad_("cond" in names)
    targets = {"x": x, "cond": cond}
    if "params" in names:
        targets["params"] = trainable_parameters(model)
    return x, cond, targets


def _flat_targets(targets, names) -> list[torch.Tensor]:
    """The tensors whose gradients are wanted, flattened in the order of ``names``."""
    flat = []
    for w in names:
        flat.extend(targets[w] if w == "params" else [targets[w]])
    return flat


def _unflatten(flat, targets, names):
    """Inverse of :func:`_flat_targets` for a list of gradients."""
    out, i = [], 0
    for w in names:
        if w == "params":
            m = len(targets[w])
            out.append(tuple(flat[i : i + m]))
            i += m
        else:
            out.append(flat[i])
            i += 1
    return tuple(out)


def _grad(loss, targets, names):
    flat = _flat_targets(targets, names)
    got = torch.autograd.grad(loss, flat, allow_unused=True)
    got = [torch.zeros_like(f) if g is None else g for f, g in zip(flat, got, strict=True)]
    return _unflatten(got, targets, names)


def _backprop(model, loss_fn, x, ts, solver, cond, names):
    """Autograd through the unrolled solve: exact for Φ, memory linear in the number of steps."""
    x, cond, targets = _leaves(model, x, cond, names)
    with torch.enable_grad():
        loss = evaluate_loss(loss_fn, solve(model, x, ts, solver=solver, cond=cond))
        return loss, _grad(loss, targets, names)


register_method(
    GradientMethod(
        "backprop",
        _backprop,
        wrt=WRT,
        exact=True,
        description="autograd through every step; memory grows linearly with n",
    )
)


# --- shared pieces -------------------------------------------------------------------------


def _steps(schedule, ts) -> list[tuple[float, float, float]]:
    """(t_k, ρ_k, h_k = ρ_{k+1} − ρ_k) for k = 0..n−1: the very floats :func:`solve` steps with."""
    rhos = [rho_of_t(schedule, float(t)) for t in ts]
    return [(float(ts[k]), rhos[k], rhos[k + 1] - rhos[k]) for k in range(len(ts) - 1)]


# --- memory accounting, read by sagkit.profiling ---------------------------------------------
# Saved-tensor hooks see what autograd keeps for backward, but neither what an engine keeps
# outside any graph (the symplectic adjoint's states) nor what torch.utils.checkpoint
# recomputes in backward (it installs hooks of its own). The engines report those through the
# two functions below; sagkit.profiling pushes a ledger on _LEDGERS while it profiles, and
# without one both are free.
_LEDGERS: list = []


def _hold(tensor: torch.Tensor) -> torch.Tensor:
    """Report a tensor that an engine keeps outside autograd's saved tensors; return it."""
    for ledger in _LEDGERS:
        ledger.hold(tensor)
    return tensor


def _checkpoint_contexts():
    """``context_fn`` for torch.utils.checkpoint: lets an active ledger see the recomputation."""
    recompute = _LEDGERS[-1].recompute_context() if _LEDGERS else contextlib.nullcontext()
    return contextlib.nullcontext(), recompute


# --- checkpointing ---------------------------------------------------------------------------


def _checkpoint(model, loss_fn, x, ts, solver, cond, names):
    """``torch.utils.checkpoint`` (non-reentrant) around every step of the unrolled solve.

    The forward keeps each step's input y_k (n + 1 states in all); the backward recomputes one
    step at a time and backpropagates through it. Exact for Φ (the same operations as
    "backprop", in the same order); costs one extra forward.
    """
    tableau = get_tableau(solver)
    x, cond, targets = _leaves(model, x, cond, names)
    f = ProbabilityFlow(model, cond)
    with torch.enable_grad():
        y = f.to_y(x, ts[0])
        for t, rho, h in _steps(model.schedule, ts):
            y = _torch_checkpoint(
                rk_step,
                f,
                y,
                rho,
                h,
                tableau,
                t,
                use_reentrant=False,
                context_fn=_checkpoint_contexts,
            )
        loss = evaluate_loss(loss_fn, f.to_x(y, ts[-1]))
        return loss, _grad(loss, targets, names)


register_method(
    GradientMethod(
        "checkpoint",
        _checkpoint,
        wrt=WRT,
        exact=True,
        description="torch.utils.checkpoint around every step: keeps the states, recomputes steps",
    )
)


# --- symplectic adjoint ----------------------------------------------------------------------


def _stage_graphs(f, y, rho, h, tableau, t):
    """Recompute the stages of one step from its stored state y, each U_i a fresh leaf.

    Returns ``(U, k)``: lists of the s stage states U_i (leaves that require grad) and slopes
    k_i = f(U_i) with their graphs, which reach only U_i, cond and θ. The stage values are
    those of :func:`sagkit.solvers.rk_step` bit for bit (the same calls in the same order).
    """
    leaves, slopes = [], []

    def f_leaf(u, r, tt, c):
        u = u.detach().requires_grad_()
        with torch.enable_grad():
            k = f(u, r, tt, c)
        leaves.append(u)
        slopes.append(k)
        return k.detach()

    with torch.no_grad():
        rk_stages(f_leaf, y, rho, h, tableau, t)
    return leaves, slopes


def _symplectic(model, loss_fn, x, ts, solver, cond, names):
    """The symplectic adjoint method (Matsubara, Miyatake & Yaguchi 2021) of an explicit RK solve.

    As in Symplectic Adjoint Guidance (Pan et al. 2023), on the probability-flow ODE in
    y = x/α and ρ = σ/α, dy/dρ = f(y, ρ) = ε(α(ρ) y, t(ρ), z). Forward, under ``no_grad``,
    keep only the states y_0..y_n, each of x's shape (B, ...): y_0 = x/α_{t_0} and

        U_i = y_k + h Σ_{j<i} a_ij k_j,   k_i = f(U_i, ρ_k + c_i h),   y_{k+1} = y_k + h Σ_i b_i k_i.

    With x_out = α_{t_n} y_n the adjoint starts at λ_n = ∂L/∂y_n = α_{t_n} ∂L/∂x_out. Backward,
    for k = n−1..0, recompute the stages of step k from y_k (one step's graph alive at a time)
    and, for i = s..1, with μ_j = J(U_j)ᵀ Λ_j, J = ∂f/∂y (a vector–Jacobian product):

        Λ_i = λ_{k+1} + h Σ_{j>i} (b_j a_ji / b_i) μ_j,
        λ_k = λ_{k+1} + h Σ_i b_i μ_i,
        ∂L/∂z += h Σ_i b_i (∂f/∂z)(U_i)ᵀ Λ_i      (z the conditioning, or the parameters θ).

    This is the adjoint Runge–Kutta scheme with a'_ij = b_j − b_j a_ji / b_i paired with the
    forward tableau into a symplectic partitioned RK method, which conserves λᵀδy: λ_0 is the
    exact gradient of the discrete map up to rounding. Finally ∂L/∂x = λ_0 / α_{t_0}. A
    stage with b_i = 0 would need the special treatment of the paper; such tableaus are
    rejected. Cost: the forward's n·s network calls again, plus one vector–Jacobian product
    each; memory: n + 1 states plus one step's activations.
    """
    tableau = get_tableau(solver)
    if any(b == 0 for b in tableau.b):
        raise ValueError(
            f"method 'symplectic' needs every weight b_i nonzero; tableau {tableau.name!r} has b = {tableau.b}"
        )
    x, cond, targets = _leaves(model, x, cond, names)
    zs = _flat_targets(targets, [w for w in names if w != "x"])  # cond and/or θ
    f = ProbabilityFlow(model, cond)
    steps = _steps(model.schedule, ts)

    with torch.no_grad():  # forward: the states, no graphs
        y = f.to_y(x.detach(), ts[0])
        states = [_hold(y)]
        for t, rho, h in steps:
            y = rk_step(f, y, rho, h, tableau, t)
            states.append(_hold(y))

    with torch.enable_grad():  # the loss, and ∂L/∂x_out (plus any direct ∂L/∂z)
        x_out = f.to_x(states.pop(), ts[-1]).requires_grad_()
        loss = evaluate_loss(loss_fn, x_out)
        g_out, *direct = torch.autograd.grad(loss, [x_out, *zs], allow_unused=True)
    z_adj = [torch.zeros_like(z) if g is None else g for z, g in zip(zs, direct, strict=True)]
    lam = f.to_x(g_out, ts[-1])  # λ_n = α_{t_n} ∂L/∂x_out
    del x_out, g_out, direct

    b, a = tableau.b, tableau.a
    for t, rho, h in reversed(steps):
        leaves, slopes = _stage_graphs(f, states.pop(), rho, h, tableau, t)
        mu = [None] * tableau.stages
        for i in reversed(range(tableau.stages)):
            lam_i = lam
            for j in range(i + 1, tableau.stages):
                if a[j][i]:
                    lam_i = lam_i + (h * b[j] * a[j][i] / b[i]) * mu[j]
            vjp = torch.autograd.grad(slopes[i], [leaves[i], *zs], lam_i, allow_unused=True)
            mu[i] = vjp[0]
            for acc, g in zip(z_adj, vjp[1:], strict=True):
                if g is not None:
                    acc.add_(g, alpha=h * b[i])
            slopes[i] = None  # this stage's graph is spent
        for i in range(tableau.stages):
            lam = lam + (h * b[i]) * mu[i]
        del leaves, slopes, mu

    grads = [f.to_y(lam, ts[0])] if "x" in names else []  # ∂L/∂x = λ_0 / α_{t_0}
    grads.extend(z_adj)
    return loss.detach(), _unflatten(grads, targets, names)


register_method(
    GradientMethod(
        "symplectic",
        _symplectic,
        wrt=WRT,
        exact=True,
        description="symplectic adjoint: stores the n+1 states, one step's graph at a time",
    )
)


# --- vanilla continuous adjoint --------------------------------------------------------------

# torchdiffeq's fixed-grid methods that match sagkit's tableaus. Its "rk4" is the 3/8 rule
# (rk4_alt_step_func), not the classic RK4 of sagkit's "rk4": same order, different tableau.
_TORCHDIFFEQ_METHODS = {"ddim": "euler", "heun": "heun2", "rk4": "rk4"}


def _fixed_grid(rhos: torch.Tensor):
    """A torchdiffeq ``grid_constructor`` stepping exactly on the ρ grid ``rhos`` (decreasing).

    torchdiffeq negates decreasing time (forward ρ_0 → ρ_n, and again for the adjoint solve
    ρ_n → ρ_0), so the grid is returned in the sign and orientation of the ``t`` it is asked
    for, with its ends set to t's ends exactly (torchdiffeq checks that).
    """

    def construct(func, y0, t):
        grid = rhos.to(t) if float(t[0] + t[-1]) > 0 else -rhos.to(t)
        if bool(grid[0] > grid[-1]) != bool(t[0] > t[-1]):
            grid = grid.flip(0)
        grid = grid.clone()
        grid[0], grid[-1] = t[0], t[-1]
        return grid

    return construct


def _adjoint(model, loss_fn, x, ts, solver, cond, names):
    """The vanilla continuous adjoint: ``torchdiffeq.odeint_adjoint`` on the (y, ρ) ODE.

    The forward solves dy/dρ = f(y, ρ) with torchdiffeq's fixed-grid method matching ``solver``
    ("ddim" → "euler", "heun" → "heun2", "rk4" → "rk4", which in torchdiffeq is the 3/8 rule,
    not classic RK4) on the same ρ grid, passing only [ρ_0, ρ_n] as output times (the grid goes
    in through ``options["grid_constructor"]``), so that only y_0 and y_n are stored. The
    backward integrates the augmented system

        dy/dρ = f(y, ρ),   da/dρ = −(∂f/∂y)ᵀ a,   da_z/dρ = −(∂f/∂z)ᵀ a

    from ρ_n back to ρ_0 with the same method on the same grid, re-solving the state y
    backwards instead of using the forward's states. The result approximates the gradient of
    the exact ODE flow, not of the discrete solve Φ: its error against the exact discrete
    gradient falls with n (O(h) for Euler) but can be large at few steps. Not exact.
    ``wrt`` "cond" and "params" go in as ``adjoint_params``.
    """
    try:
        method = _TORCHDIFFEQ_METHODS[solver]
    except KeyError:
        raise ValueError(
            f"method 'adjoint' has no torchdiffeq counterpart for solver {solver!r}; it supports {', '.join(_TORCHDIFFEQ_METHODS)}"
        ) from None
    from torchdiffeq import odeint_adjoint

    x, cond, targets = _leaves(model, x, cond, names)
    f = ProbabilityFlow(model, cond)
    rhos = [rho_of_t(model.schedule, float(t)) for t in ts]
    t_at = {r: float(t) for r, t in zip(rhos, ts, strict=True)}  # exact times at grid points
    grid = torch.tensor(rhos, dtype=torch.float64, device=x.device)

    def rhs(rho, y):
        r = float(rho.detach())
        return f(y, r, t_at.get(r))

    adjoint_params = tuple(_flat_targets(targets, [w for w in names if w != "x"]))
    with torch.enable_grad():
        y = odeint_adjoint(
            rhs,
            f.to_y(x, ts[0]),
            grid[[0, -1]],
            method=method,
            options={"grid_constructor": _fixed_grid(grid)},
            adjoint_params=adjoint_params,
        )[-1]
        loss = evaluate_loss(loss_fn, f.to_x(y, ts[-1]))
        return loss, _grad(loss, targets, names)


register_method(
    GradientMethod(
        "adjoint",
        _adjoint,
        wrt=WRT,
        exact=False,
        description="vanilla continuous adjoint (torchdiffeq): re-solves the state backwards; approximate",
    )
)


# --- the referee -----------------------------------------------------------------------------


def _check_float64(name: str, tensors) -> None:
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float64:
            raise TypeError(
                f"finite_difference works in float64 only; {name} is {tensor.dtype} (convert with .double())"
            )


def finite_difference(
    model,
    loss_fn: Callable,
    x: torch.Tensor,
    ts,
    v: torch.Tensor,
    solver: str = "ddim",
    cond: torch.Tensor | None = None,
    delta: float = 1e-4,
    richardson: bool = True,
) -> float:
    """⟨∂L(Φ(x))/∂x, v⟩ by central differences in float64: the referee for the gradient engines.

        D(δ) = (L(Φ(x + δv)) − L(Φ(x − δv))) / 2δ = ⟨g, v⟩ + O(δ²),
        Richardson:  (4 D(δ/2) − D(δ)) / 3 = ⟨g, v⟩ + O(δ⁴),

    plus a rounding error of about ε_64 |L| / δ. Φ is the ``solver`` solve on ``ts`` (see
    :func:`loss_grad`); x and v are (B, ...) float64, and so must be the model's parameters,
    buffers and ``cond``. Returns a Python float.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise TypeError("x and v must be tensors")
    if v.shape != x.shape:
        raise ValueError(f"v must have x's shape {tuple(x.shape)}, got {tuple(v.shape)}")
    if not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")
    _check_float64("x", [x])
    _check_float64("v", [v])
    _check_float64("cond", [cond])
    if hasattr(model, "parameters"):
        _check_float64("a model parameter", model.parameters())
        _check_float64("a model buffer", model.buffers())
    get_tableau(solver)
    ts = check_grid(ts)
    x, v = x.detach(), v.detach()
    cond = None if cond is None else cond.detach()

    @torch.no_grad()
    def loss_at(step: float) -> float:
        return float(evaluate_loss(loss_fn, solve(model, x + step * v, ts, solver, cond)))

    def central(d: float) -> float:
        return (loss_at(d) - loss_at(-d)) / (2 * d)

    if not richardson:
        return central(delta)
    return (4 * central(delta / 2) - central(delta)) / 3
