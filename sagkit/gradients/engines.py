"""The built-in gradient engines through the solve: backprop, checkpoint, symplectic, adjoint.

- "backprop": autograd through the unrolled solve. Exact; saved activations grow linearly in n.
- "checkpoint": ``torch.utils.checkpoint`` around every step. Exact; keeps the n + 1 states and
  recomputes one step at a time in backward.
- "symplectic": the symplectic adjoint (Matsubara, Miyatake & Yaguchi 2021), as used by SAG
  (Pan et al. 2023). Exact up to rounding; keeps the n + 1 states, one step's graph at a time.
- "budgeted": backprop through the last steps while a memory budget (1 GiB of step graphs,
  :data:`DEFAULT_BUDGET_BYTES`) holds their graphs, the symplectic adjoint for the others.
  Exact; :func:`make_budgeted` makes engines with other budgets.
- "adjoint": the vanilla continuous adjoint of ``torchdiffeq.odeint_adjoint``. Approximate.

Each engine is a :class:`~sagkit.gradients.api.GradientMethod` in :data:`BUILTIN`; the
package registers them (docs/maths.md §5 has the formulas, §9 what each keeps in memory).
The formulas below are written in the (y, ρ) frame of VP schedules; for a flow schedule read
(y, ν) of the velocity frame, y = x/(α + σ), ν = σ/(α + σ), slope v (docs/maths.md §2.5): every
engine steps through :class:`~sagkit.core.solvers.ProbabilityFlow`, which takes the frame from
the schedule, so each is exact under both.
"""

from __future__ import annotations

import numbers

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..core.checks import check_count
from ..core.frames import ode_frame
from ..core.solvers import SOLVERS, ProbabilityFlow, rk_stages, rk_step, solve
from .api import WRT, GradientMethod, evaluate_loss, flat_targets, grad_of, make_leaves, unflatten
from .memory import checkpoint_contexts, hold, measure_saved

__all__ = ["BUILTIN", "TORCHDIFFEQ_METHODS", "DEFAULT_BUDGET_BYTES", "make_budgeted"]


def _backprop(model, loss_fn, x, ts, *, solver, cond, names):
    """Autograd through the unrolled solve: exact for Φ, memory linear in the number of steps.

    (docs/maths.md §5.2)
    """
    x, cond, targets = make_leaves(model, x, cond, names)
    with torch.enable_grad():
        loss = evaluate_loss(loss_fn, solve(model, x, ts, solver=solver, cond=cond))
        return loss, grad_of(loss, targets, names)


def _steps(schedule, ts) -> list[tuple[float, float, float]]:
    """(t_k, ν_k, h_k = ν_{k+1} − ν_k) for k = 0..n−1, ν the ODE's time variable (ρ for VP
    schedules): the very floats :func:`solve` steps with."""
    frame = ode_frame(schedule)
    nus = [frame.nu(schedule, float(t)) for t in ts]
    return [(float(ts[k]), nus[k], nus[k + 1] - nus[k]) for k in range(len(ts) - 1)]


def _checkpoint(model, loss_fn, x, ts, *, solver, cond, names):
    """``torch.utils.checkpoint`` (non-reentrant) around every step of the unrolled solve.

    The forward keeps each step's input y_k (n + 1 states in all); the backward recomputes one
    step at a time and backpropagates through it. Exact for Φ (the same operations as
    "backprop", in the same order); costs one extra forward.

    Why it is slower than "symplectic" though for DDIM both do the same arithmetic (n forward
    calls, n again with graphs, n vector–Jacobian products): ``torch.utils.checkpoint`` adds work
    per *operation*, not per flop. Its forward runs with autograd on, recording a graph node for
    every operation of every step (kept until the backward) and calling its Python pack hook for
    every tensor the operation would save; its backward starts the recomputation from inside the
    autograd engine and routes every recomputed tensor through Python pack/unpack hooks into a
    per-step table, checking its metadata against the forward's. The symplectic engine runs the
    forward under ``no_grad`` and rebuilds a step's graph by a plain call. On the digits UNet
    (float32, batch 3, one thread) a step measured 14.0 ms forward under checkpoint against
    11.0 ms under ``no_grad``, and 24.0 ms for the checkpointed backward against 21.1 ms for
    the symplectic step's graph forward and vector–Jacobian product: ≈ 1.8× backprop against
    ≈ 1.5×. ``preserve_rng_state=False`` and ``determinism_check="none"`` did not close the gap.
    Closing it means writing the recomputation by hand, which for DDIM is what "symplectic" (and
    "budgeted" with ``keep_steps=0``, which runs it) does; this engine stays the
    ``torch.utils.checkpoint`` baseline.

    (docs/maths.md §5.2, §9.3)
    """
    tableau = SOLVERS[solver]
    x, cond, targets = make_leaves(model, x, cond, names)
    f = ProbabilityFlow(model, cond)
    with torch.enable_grad():
        y = f.to_y(x, ts[0])
        for t, nu, h in _steps(model.schedule, ts):
            y = torch_checkpoint(
                rk_step,
                f,
                y,
                nu,
                h,
                tableau,
                t,
                use_reentrant=False,
                context_fn=checkpoint_contexts,
            )
        loss = evaluate_loss(loss_fn, f.to_x(y, ts[-1]))
        return loss, grad_of(loss, targets, names)


def _stage_graphs(f, y, nu, h, tableau, t):
    """Recompute the stages of one step from its stored state y, each U_i a fresh leaf.

    Returns ``(U, k)``: lists of the s stage states U_i (leaves that require grad) and slopes
    k_i = f(U_i) with their graphs, which reach only U_i, cond and θ. The stage values are
    those of :func:`sagkit.core.solvers.rk_step` bit for bit (the same calls in the same order).

    (docs/maths.md §5.3)
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
        rk_stages(f_leaf, y, nu, h, tableau, t)
    return leaves, slopes


def _adjoint_sweep(f, states, steps, tableau, lam, zs, z_adj):
    """The symplectic adjoint's backward over ``steps`` (the formulas of :func:`_symplectic`).

    ``states`` holds y_0..y_{m−1} for the m = len(steps) steps (popped as they are used),
    ``lam`` is λ_m; the (∂f/∂z)ᵀ terms are added into ``z_adj`` in place. Returns λ_0.

    (docs/maths.md §5.3)
    """
    b, a = tableau.b, tableau.a
    for t, nu, h in reversed(steps):
        leaves, slopes = _stage_graphs(f, states.pop(), nu, h, tableau, t)
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
    return lam


def _adjoint_setup(model, x, ts, solver, cond, names):
    """What the symplectic and budgeted engines start from: the tableau, fresh leaves, the
    tensors z (cond and/or θ) whose gradients accumulate, the flow f and the step list."""
    tableau = SOLVERS[solver]
    x, cond, targets = make_leaves(model, x, cond, names)
    zs = flat_targets(targets, [w for w in names if w != "x"])  # cond and/or θ
    return tableau, x, targets, zs, ProbabilityFlow(model, cond), _steps(model.schedule, ts)


def _symplectic(model, loss_fn, x, ts, *, solver, cond, names):
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
    not supported (declared in :data:`BUILTIN`). Cost: the forward's n·s network calls again,
    plus one vector–Jacobian product each; memory: n + 1 states plus one step's activations.

    (docs/maths.md §5.3)
    """
    tableau, x, targets, zs, f, steps = _adjoint_setup(model, x, ts, solver, cond, names)

    with torch.no_grad():  # forward: the states, no graphs
        y = f.to_y(x.detach(), ts[0])
        states = [hold(y)]
        for t, nu, h in steps:
            y = rk_step(f, y, nu, h, tableau, t)
            states.append(hold(y))

    with torch.enable_grad():  # the loss, and ∂L/∂x_out (plus any direct ∂L/∂z)
        x_out = f.to_x(states.pop(), ts[-1]).requires_grad_()
        loss = evaluate_loss(loss_fn, x_out)
        g_out, *direct = torch.autograd.grad(loss, [x_out, *zs], allow_unused=True)
    z_adj = [torch.zeros_like(z) if g is None else g for z, g in zip(zs, direct, strict=True)]
    lam = f.to_x(g_out, ts[-1])  # λ_n = α_{t_n} ∂L/∂x_out
    del x_out, g_out, direct

    lam = _adjoint_sweep(f, states, steps, tableau, lam, zs, z_adj)
    grads = [f.to_y(lam, ts[0])] if "x" in names else []  # ∂L/∂x = λ_0 / α_{t_0}
    grads.extend(z_adj)
    return loss.detach(), unflatten(grads, targets, names)


DEFAULT_BUDGET_BYTES = 1 << 30
"""The memory budget of the registered "budgeted" engine: 1 GiB of step graphs. Stable
Diffusion's UNet at 64×64 latents saves 1.6 GiB per step, so there it keeps no graph and runs
the symplectic adjoint; the digits UNet saves well under 1 MiB, so there it is backprop.
:func:`make_budgeted` makes engines with budgets of their own."""


def _kept_steps(n: int, step_bytes: int, budget: float) -> int:
    """How many of the n steps keep their graphs: as many as ``budget`` bytes hold, at most n.

    (docs/maths.md §5.7)
    """
    if step_bytes <= 0 or budget >= n * step_bytes:
        return n
    return max(0, int(budget // step_bytes))


def _budgeted(model, loss_fn, x, ts, *, solver, cond, names, keep_steps, budget_bytes):
    """Exact gradient that keeps step graphs while a memory budget allows, recomputes the rest.

    The last m of the n steps run under autograd and keep their graphs (backprop through them);
    the first n − m run under ``no_grad`` keeping only their inputs y_0..y_{n−m−1}, and their
    part of the backward is the symplectic adjoint's (:func:`_symplectic`), started from
    λ_{n−m} = ∂L/∂y_{n−m} that the backprop part returns:

        L → (backprop through steps n−m..n−1) → λ_{n−m}, g_z → (symplectic, steps n−m−1..0) → λ_0

    Both parts are exact for Φ, so the whole is (to rounding). m = n is backprop (n·s network
    calls and their graphs); m = 0 is the symplectic adjoint (2·n·s calls, one step's graph);
    in between, n·s + (n − m)·s calls and m steps' graphs plus n − m states. With
    ``keep_steps`` m is given; with a budget of B bytes it is min(n, ⌊B / A⌋), A the bytes
    one step's graph saves, measured on step 0, which runs under autograd for that (its graph
    is kept when m = n and dropped otherwise, so nothing is computed twice). The graphs kept
    are the last steps', whose backward comes first, so they are freed earliest.

    (docs/maths.md §5.7)
    """
    tableau, x, targets, zs, f, steps = _adjoint_setup(model, x, ts, solver, cond, names)
    n = len(steps)
    y = f.to_y(x.detach(), ts[0])
    states, k, graph = [hold(y)], 0, None  # graph: (leaf, output) of the kept steps so far
    if keep_steps is not None:
        m = min(int(keep_steps), n)
    elif budget_bytes <= 0:
        m = 0
    else:  # measure one step's graph on step 0
        exclude = [*model.parameters(), *model.buffers()] if hasattr(model, "parameters") else []
        leaf = y.requires_grad_()
        with torch.enable_grad(), measure_saved(exclude) as saved:
            out = rk_step(f, leaf, steps[0][1], steps[0][2], tableau, steps[0][0])
        m, k = _kept_steps(n, saved.nbytes, budget_bytes), 1
        if m == n:
            graph = (leaf, out)
        else:
            y = out.detach()
            states.append(hold(y))
        del out, leaf
    with torch.no_grad():  # the recomputed steps: inputs only
        while k < n - m:
            t, nu, h = steps[k]
            y = rk_step(f, y, nu, h, tableau, t)
            states.append(hold(y))
            k += 1
    with torch.enable_grad():  # the kept steps: graphs
        leaf, y = graph if graph is not None else (states[-1].requires_grad_(), states[-1])
        for t, nu, h in steps[k:]:
            y = rk_step(f, y, nu, h, tableau, t)
        loss = evaluate_loss(loss_fn, f.to_x(y, ts[-1]))
        lam, *direct = torch.autograd.grad(loss, [leaf, *zs], allow_unused=True)
    del y, leaf, graph
    states.pop()  # y_{n−m}: the backprop part's input
    z_adj = [torch.zeros_like(z) if g is None else g for z, g in zip(zs, direct, strict=True)]
    del direct
    lam = _adjoint_sweep(f, states, steps[: n - m], tableau, lam, zs, z_adj)
    grads = [f.to_y(lam, ts[0])] if "x" in names else []  # ∂L/∂x = λ_0 / α_{t_0}
    grads.extend(z_adj)
    return loss.detach(), unflatten(grads, targets, names)


def _symplectic_tableau(tableau) -> bool:
    """The solvers of the symplectic adjoint: every weight b_i nonzero (docs/maths.md §5.3)."""
    return all(b != 0 for b in tableau.b)


def make_budgeted(
    *, budget_bytes: float | None = None, keep_steps: int | None = None, name: str = "budgeted"
) -> GradientMethod:
    """A "budgeted" engine (:func:`_budgeted`) with its own budget: an engine object to pass as
    ``method=`` (or ``gradient=`` to guided sampling), or to register under ``name``.

    Give at most one of ``budget_bytes`` (bytes of step graphs to keep; ``math.inf`` keeps
    them all; default :data:`DEFAULT_BUDGET_BYTES`) and ``keep_steps`` (how many of the last
    steps keep their graphs). ``loss_grad`` has one signature for all engines, so a budget is
    a property of the engine:

        sk.loss_grad(model, loss_fn, x, ts, method=make_budgeted(keep_steps=1))

    (docs/maths.md §5.7)
    """
    if budget_bytes is not None and keep_steps is not None:
        raise ValueError("give budget_bytes or keep_steps, not both")
    if keep_steps is not None:
        keep_steps = check_count(keep_steps, "keep_steps", low=0)
        what = f"the last {keep_steps} steps'"
    else:
        if budget_bytes is None:
            budget_bytes = DEFAULT_BUDGET_BYTES
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Real):
            raise TypeError(
                f"budget_bytes must be a number of bytes >= 0 (math.inf for no limit), got {budget_bytes!r}"
            )
        if not budget_bytes >= 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes!r}")
        what = f"{budget_bytes:g} bytes of"

    def fn(model, loss_fn, x, ts, *, solver, cond, names):
        return _budgeted(
            model,
            loss_fn,
            x,
            ts,
            solver=solver,
            cond=cond,
            names=names,
            keep_steps=keep_steps,
            budget_bytes=budget_bytes,
        )

    return GradientMethod(
        name,
        fn,
        wrt=WRT,
        exact=True,
        description=f"keeps {what} step graphs, symplectic adjoint for the rest",
        solvers=_symplectic_tableau,
        solver_rule="tableaus whose weights b_i are all nonzero",
    )


# torchdiffeq's fixed-grid methods that match sagkit's tableaus. Its "rk4" is the 3/8 rule
# (rk4_alt_step_func), not the classic RK4 of sagkit's "rk4": same order, different tableau.
TORCHDIFFEQ_METHODS = {"ddim": "euler", "heun": "heun2", "rk4": "rk4"}


def _fixed_grid(nus: torch.Tensor):
    """A torchdiffeq ``grid_constructor`` stepping exactly on the ν grid ``nus`` (decreasing).

    torchdiffeq negates decreasing time (forward ρ_0 → ρ_n, and again for the adjoint solve
    ρ_n → ρ_0), so the grid is returned in the sign and orientation of the ``t`` it is asked
    for, with its ends set to t's ends exactly (torchdiffeq checks that).
    """

    def construct(func, y0, t):
        grid = nus.to(t) if float(t[0] + t[-1]) > 0 else -nus.to(t)
        if bool(grid[0] > grid[-1]) != bool(t[0] > t[-1]):
            grid = grid.flip(0)
        grid = grid.clone()
        grid[0], grid[-1] = t[0], t[-1]
        return grid

    return construct


def _adjoint(model, loss_fn, x, ts, *, solver, cond, names):
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

    (docs/maths.md §5.4)
    """
    method = TORCHDIFFEQ_METHODS[solver]
    from torchdiffeq import odeint_adjoint

    x, cond, targets = make_leaves(model, x, cond, names)
    f = ProbabilityFlow(model, cond)
    nus = [f.nu(t) for t in ts]
    t_at = {r: float(t) for r, t in zip(nus, ts, strict=True)}  # exact times at grid points
    grid = torch.tensor(nus, dtype=torch.float64, device=x.device)

    def rhs(nu, y):
        r = float(nu.detach())
        return f(y, r, t_at.get(r))

    adjoint_params = tuple(flat_targets(targets, [w for w in names if w != "x"]))
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
        return loss, grad_of(loss, targets, names)


BUILTIN = (
    GradientMethod(
        "backprop",
        _backprop,
        wrt=WRT,
        exact=True,
        description="autograd through every step; memory grows linearly with n",
    ),
    GradientMethod(
        "checkpoint",
        _checkpoint,
        wrt=WRT,
        exact=True,
        description="torch.utils.checkpoint around every step: keeps the states, recomputes steps",
    ),
    GradientMethod(
        "symplectic",
        _symplectic,
        wrt=WRT,
        exact=True,
        description="symplectic adjoint: stores the n+1 states, one step's graph at a time",
        solvers=_symplectic_tableau,
        solver_rule="tableaus whose weights b_i are all nonzero",
    ),
    make_budgeted(),
    GradientMethod(
        "adjoint",
        _adjoint,
        wrt=WRT,
        exact=False,
        description="vanilla continuous adjoint (torchdiffeq): re-solves the state backwards; approximate",
        solvers=lambda tableau: tableau.name in TORCHDIFFEQ_METHODS,
        solver_rule="the tableaus with a torchdiffeq counterpart",
    ),
)
"""The engines of this module, registered by :mod:`sagkit.gradients`."""
