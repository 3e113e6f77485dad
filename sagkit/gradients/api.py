"""The gradient-engine interface: a registry of engines and :func:`loss_grad`, which runs one.

    loss, grad = sk.loss_grad(model, loss_fn, x, ts, method="symplectic", solver="ddim")

Φ is the n-step solve of :func:`sagkit.solve` on the grid ``ts``; L = loss_fn(Φ(x)). An engine
is a :class:`GradientMethod` in :data:`METHODS`: its function, the ``wrt`` it supports, the
solvers and grids it accepts, and whether it is exact for Φ (docs/maths.md §5). The helpers
below (:func:`make_leaves`, :func:`grad_of`, ...) are the shared plumbing of the engines in
:mod:`sagkit.gradients.engines` and :mod:`sagkit.gradients.adjointdeis`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.checks import check_gradients, check_inputs, require
from ..core.registry import Registry
from ..core.solvers import SOLVERS, Tableau, check_grid

__all__ = [
    "WRT",
    "GradientMethod",
    "METHODS",
    "register_method",
    "resolve_engine",
    "loss_grad",
    "run_engine",
    "evaluate_loss",
    "trainable_parameters",
    "normalise_wrt",
    "make_leaves",
    "flat_targets",
    "unflatten",
    "grad_of",
    "any_tableau",
]

WRT = ("x", "cond", "params")


def any_tableau(tableau: Tableau) -> bool:
    """The solver declaration of an engine that works with every explicit tableau."""
    return True


@dataclass(frozen=True)
class GradientMethod:
    """A gradient engine and what it supports.

    Attributes:
        name: its key in :data:`METHODS`.
        fn: ``fn(model, loss_fn, x, ts, *, solver, cond, names)`` returning ``(loss, grads)``,
            ``grads`` a tuple in the order of ``names`` (names from :data:`WRT`; "params" gives
            a tuple over :func:`trainable_parameters`). ``ts`` is already checked.
        wrt: the names from :data:`WRT` it can differentiate with respect to.
        exact: whether it is the gradient of the discrete solve Φ (to rounding).
        description: one line for tables.
        solvers: a predicate on :class:`~sagkit.core.solvers.Tableau`: the solvers it accepts.
        solver_rule: that predicate in words, for error messages.
        needs_positive_end: whether the grid must end at t > 0.
    """

    name: str
    fn: Callable
    wrt: tuple[str, ...]
    exact: bool
    description: str
    solvers: Callable[[Tableau], bool] = any_tableau
    solver_rule: str = "every solver"
    needs_positive_end: bool = False

    def refusal(self, solver: str, ts=None) -> str | None:
        """Why this engine cannot run ``solver`` on the grid ``ts``, or ``None`` when it can.

        An unknown ``solver`` raises the registry's error.
        """
        tableau = SOLVERS[solver]
        if not self.solvers(tableau):
            supported = ", ".join(n for n, t in SOLVERS.items() if self.solvers(t))
            return (
                f"method {self.name!r} supports {self.solver_rule} ({supported}), "
                f"not solver {solver!r}"
            )
        if self.needs_positive_end and ts is not None and float(ts[-1]) <= 0:
            return f"method {self.name!r} needs a grid that ends at t > 0, got ts[-1] = 0"
        return None

    def supports(self, solver: str, ts=None) -> bool:
        """Whether :meth:`refusal` finds nothing against ``solver`` and ``ts``."""
        return self.refusal(solver, ts) is None


METHODS: Registry[GradientMethod] = Registry("method")
"""The gradient engines by name; :func:`register_method` adds one."""


def register_method(method: GradientMethod, *, replace: bool = False) -> GradientMethod:
    """Add a gradient engine under ``method.name``; a taken name needs ``replace=True``."""
    return METHODS.register(method.name, method, replace=replace)


def resolve_engine(method) -> GradientMethod:
    """The engine ``method`` names (a key of :data:`METHODS`), or ``method`` itself when it is a
    :class:`GradientMethod` (an engine configured by its caller, e.g. a memory budget)."""
    if isinstance(method, GradientMethod):
        return method
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a name in sagkit.METHODS or a GradientMethod, got {type(method).__name__}"
        )
    return METHODS[method]


def loss_grad(
    model,
    loss_fn: Callable,
    x: torch.Tensor,
    ts,
    *,
    method: str | GradientMethod = "symplectic",
    solver: str = "ddim",
    cond: torch.Tensor | None = None,
    wrt: str | Sequence[str] = "x",
):
    """The loss L(Φ(x)) and its gradient, Φ the ``solver`` solve on ``ts`` (docs/maths.md §5).

    Args:
        model: a model of the protocol.
        loss_fn: maps the solve's output (B, ...) to a scalar, or to (B,) values that are summed.
        x: (B, ...) the state at ``ts[0]``.
        ts: strictly decreasing grid (see :func:`sagkit.time_grid`).
        method: a name in :data:`METHODS`, or a :class:`GradientMethod` (e.g.
            ``make_budgeted(budget_bytes=2**28)``).
        solver: a name in :data:`sagkit.SOLVERS` that ``method`` supports.
        cond: conditioning passed to the model; needed for ``wrt="cond"``.
        wrt: "x", "cond", "params", or a tuple of them.
    Returns:
        ``(loss, grad)``: loss a detached 0-dim tensor; grad shaped like x (or cond), a tuple
        of tensors for "params", and a tuple of these when ``wrt`` is a tuple.

    (docs/maths.md §5.1)
    """
    check_inputs(model, x, cond=cond)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    engine = resolve_engine(method)
    names, single = normalise_wrt(wrt)
    unsupported = [w for w in names if w not in engine.wrt]
    if unsupported:
        raise ValueError(
            f"method {engine.name!r} supports wrt in {engine.wrt}, not {tuple(unsupported)}"
        )
    if "cond" in names and cond is None:
        raise ValueError('wrt="cond" needs a cond tensor')
    ts = check_grid(ts)
    reason = engine.refusal(solver, ts)
    if reason is not None:
        raise ValueError(reason)
    loss, grads = run_engine(engine, model, loss_fn, x, ts, solver=solver, cond=cond, names=names)
    check_gradients(grads, names, method=engine.name)
    return loss, (grads[0] if single else tuple(grads))


def run_engine(
    engine: GradientMethod, model, loss_fn, x, ts, *, solver="ddim", cond=None, names=("x",)
):
    """:func:`loss_grad` without its checks, for callers that checked their inputs once (the
    guided sampler calls it at every guided step): ``engine`` a :class:`GradientMethod`, ``ts``
    a float64 grid, ``names`` a tuple from :data:`WRT`. Returns ``(loss, grads)``, the loss
    detached and ``grads`` a tuple in the order of ``names``."""
    loss, grads = engine.fn(model, loss_fn, x, ts, solver=solver, cond=cond, names=names)
    return loss.detach(), grads


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
    """L = loss_fn(x_out) as a scalar: a (B,) result is summed. Rejects other shapes, and NaN or
    inf in x_out (the solve went non-finite) or, else, in L (the loss did)."""
    value = loss_fn(x_out)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(value).__name__}")
    if value.ndim == 1 and value.shape[0] == x_out.shape[0]:
        value = value.sum()
    elif value.ndim != 0:
        raise ValueError(
            f"loss_fn must return a scalar or ({x_out.shape[0]},) values, got shape {tuple(value.shape)}"
        )
    require(
        torch.isfinite(x_out.detach()).all(),
        lambda: "the solve's output holds NaN or inf (the model's ε went non-finite in the solve)",
    )
    require(
        torch.isfinite(value.detach()),
        lambda: f"loss_fn returned a non-finite value ({value.item()}) on a finite input",
    )
    if torch.is_grad_enabled() and x_out.requires_grad and not value.requires_grad:
        raise ValueError(
            "loss_fn's value does not depend on its input through differentiable operations "
            "(no gradient path: a .detach(), .item(), numpy or an integer operation inside "
            "loss_fn?), so it has no gradient"
        )
    return value


def normalise_wrt(wrt) -> tuple[tuple[str, ...], bool]:
    """``wrt`` as a tuple of distinct names from :data:`WRT`, and whether it was a single name."""
    single = isinstance(wrt, str)
    names = (wrt,) if single else tuple(wrt)
    bad = [w for w in names if w not in WRT]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"wrt must be one of {WRT} or a tuple of distinct ones, got {wrt!r}")
    return names, single


def make_leaves(model, x, cond, names):
    """Fresh leaves for the requested inputs: (x, cond, {name: tensor or list of params})."""
    x = x.detach().requires_grad_("x" in names)
    if cond is not None:
        cond = cond.detach().requires_grad_("cond" in names)
    targets = {"x": x, "cond": cond}
    if "params" in names:
        targets["params"] = trainable_parameters(model)
    return x, cond, targets


def flat_targets(targets, names) -> list[torch.Tensor]:
    """The tensors whose gradients are wanted, flattened in the order of ``names``."""
    flat = []
    for w in names:
        flat.extend(targets[w] if w == "params" else [targets[w]])
    return flat


def unflatten(flat, targets, names):
    """Inverse of :func:`flat_targets` for a list of gradients."""
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


def grad_of(loss, targets, names):
    """∂loss/∂(targets in the order of ``names``), zeros where the loss does not depend on one."""
    flat = flat_targets(targets, names)
    got = torch.autograd.grad(loss, flat, allow_unused=True)
    got = [torch.zeros_like(f) if g is None else g for f, g in zip(flat, got, strict=True)]
    return unflatten(got, targets, names)
