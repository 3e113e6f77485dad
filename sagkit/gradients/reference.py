"""Reference gradients, the referees of the engines: finite differences and the continuous gradient.

- :func:`finite_difference`: ⟨∂L(Φ(x))/∂x, v⟩ of the discrete solve by float64 central
  differences (with Richardson extrapolation), the referee of the exact engines.
- :func:`exact_gradient`: the gradient of the exact ODE (or SDE) flow of one Gaussian, in
  closed form; :func:`reference_gradient`: the same for any model by a very fine solve,
  extrapolated. These are the referees of the continuous adjoints (docs/maths.md §5.6).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..core.checks import check_inputs, check_tensor
from ..core.models import GaussianMixture
from ..core.schedules import time_grid
from ..core.solvers import SOLVERS, check_grid, solve
from .api import evaluate_loss, loss_grad

__all__ = ["central_difference", "finite_difference", "exact_gradient", "reference_gradient"]


def central_difference(fn: Callable[[float], float], delta: float, *, richardson: bool = True):
    """The derivative at 0 of a scalar function of a step, by central differences.

    D(δ) = (fn(δ) − fn(−δ)) / 2δ = fn'(0) + O(δ²),
    Richardson:  (4 D(δ/2) − D(δ)) / 3 = fn'(0) + O(δ⁴).
    """

    def central(d: float) -> float:
        return (fn(d) - fn(-d)) / (2 * d)

    if not richardson:
        return central(delta)
    return (4 * central(delta / 2) - central(delta)) / 3


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
    *,
    solver: str = "ddim",
    cond: torch.Tensor | None = None,
    delta: float = 1e-4,
    richardson: bool = True,
) -> float:
    """⟨∂L(Φ(x))/∂x, v⟩ by central differences in float64: the referee for the gradient engines.

        D(δ) = (L(Φ(x + δv)) − L(Φ(x − δv))) / 2δ = ⟨g, v⟩ + O(δ²),
        Richardson:  (4 D(δ/2) − D(δ)) / 3 = ⟨g, v⟩ + O(δ⁴),

    plus a rounding error of about ε_64 |L| / δ (docs/maths.md §5.5). Φ is the ``solver`` solve on ``ts`` (see
    :func:`loss_grad`); x and v are (B, ...) float64, and so must be the model's parameters,
    buffers and ``cond``. Returns a Python float.
    """
    check_inputs(model, x, cond=cond)
    check_tensor(v, "v")
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
    SOLVERS[solver]
    ts = check_grid(ts)
    x, v = x.detach(), v.detach()
    cond = None if cond is None else cond.detach()

    @torch.no_grad()
    def loss_at(step: float) -> float:
        return float(
            evaluate_loss(loss_fn, solve(model, x + step * v, ts, solver=solver, cond=cond))
        )

    return central_difference(loss_at, delta, richardson=richardson)


def exact_gradient(
    model: GaussianMixture, loss_fn, x, t_start: float, t_end: float, *, sde: bool = False
):
    """∂L(x_end)/∂x_T of the exact flow for a one-component :class:`GaussianMixture`.

    ODE: x_e = α_e μ + sqrt(v_e/v_T)(x_T − α_T μ), so ∂x_e/∂x_T = sqrt(v_e/v_T) I with
    v = α² s² + σ². SDE (any fixed noise path; ∂ε/∂x = σ/v does not depend on x):
    ∂x_e/∂x_T = (v_e α_T)/(v_T α_e) I. The loss gradient is taken at the ODE end point, which
    for the SDE is exact only when ∂L/∂x_e does not depend on x_e (a linear loss).
    Returns ``(loss, grad)`` (B, ...).

    (docs/maths.md §4.3)
    """
    if not isinstance(model, GaussianMixture) or model.means.shape[0] != 1:
        raise ValueError("exact_gradient needs a one-component GaussianMixture")
    sc = model.schedule
    a_T, a_e = sc.alpha(float(t_start)), sc.alpha(float(t_end))
    s_T, s_e = sc.sigma(float(t_start)), sc.sigma(float(t_end))
    v_T, v_e = (a**2 * model.std**2 + s**2 for a, s in ((a_T, s_T), (a_e, s_e)))
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
    *,
    cond=None,
    wrt: str = "x",
    steps: int = 1024,
    fd_delta: float = 1e-4,
    seed: int = 0,
):
    """The continuous gradient by a very fine solve, extrapolated, and checked by finite differences.

    Backprop through RK4 on a grid uniform in λ (uniform in t when t_end = 0) with ``steps`` and
    2·``steps`` steps, then Richardson for order 4: g = g₂ + (g₂ − g₁)/15. The relative size of
    (g₂ − g₁)/15 is the error estimate; a plain central difference (float64, ``fd_delta``) of the fine
    loss along a random direction v is compared with ⟨g, v⟩.

    Returns a dict: ``grad``, ``loss``, ``extrapolation_error`` and ``fd_error`` (relative).

    (docs/maths.md §5.6)
    """
    spacing = "lambda" if t_end > 0 else "time"
    grads = []
    for n in (steps, 2 * steps):
        ts = time_grid(model.schedule, t_start, t_end, n, spacing=spacing)
        loss, g = loss_grad(
            model, loss_fn, x, ts, method="backprop", solver="rk4", cond=cond, wrt=wrt
        )
        grads.append(g)
    g = grads[1] + (grads[1] - grads[0]) / 15
    extrap = float((grads[1] - grads[0]).norm() / 15 / g.norm())
    target = x if wrt == "x" else cond
    v = torch.randn(target.shape, generator=torch.Generator().manual_seed(seed), dtype=target.dtype)
    ts = time_grid(model.schedule, t_start, t_end, 2 * steps, spacing=spacing)

    def at(delta):
        xx, cc = (x + delta * v, cond) if wrt == "x" else (x, cond + delta * v)
        with torch.no_grad():
            return float(evaluate_loss(loss_fn, solve(model, xx, ts, solver="rk4", cond=cc)))

    fd = central_difference(at, fd_delta, richardson=False)
    directional = float((g * v).sum())
    return {
        "grad": g,
        "loss": loss,
        "extrapolation_error": extrap,
        "fd_error": abs(fd - directional) / abs(directional),
    }
