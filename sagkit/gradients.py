"""Gradients of a loss of the solve's output, ∂L(Φ(x))/∂(x, cond, θ), by interchangeable methods.

    loss, grad = sk.loss_grad(model, loss_fn, x, ts, method="symplectic", solver="ddim")

Φ is the n-step solve of :func:`sagkit.solve` on the grid ``ts``. Methods live in a registry
(:data:`METHODS`); each says which ``wrt`` it supports and whether it is exact for Φ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .solvers import check_grid, get_tableau, solve

__all__ = ["loss_grad", "METHODS", "GradientMethod", "register_method", "evaluate_loss"]

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


def _grad(loss, targets, names):
    flat, spans = [], []
    for w in names:
        items = list(targets[w]) if w == "params" else [targets[w]]
        spans.append((w, len(flat), len(flat) + len(items)))
        flat.extend(items)
    got = torch.autograd.grad(loss, flat, allow_unused=True)
    got = [torch.zeros_like(f) if g is None else g for f, g in zip(flat, got, strict=True)]
    return tuple(tuple(got[a:b]) if w == "params" else got[a] for w, a, b in spans)


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
