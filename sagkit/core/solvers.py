"""Explicit Runge–Kutta solvers for the probability-flow ODE, in a registry.

In y = x/α and ρ = σ/α = e^{−λ} the probability-flow ODE of a noise-prediction model is

    dy/dρ = f(y, ρ) = ε(α_{t(ρ)} y, t(ρ)),      t(ρ) = t(λ = −log ρ).

(Lu et al. 2022, DPM-Solver, eq. 3.4; Song et al. 2021, DDIM, eq. 14.) Explicit Euler in
(y, ρ) is exactly DDIM with η = 0; Heun and classic RK4 on the same ODE are 2nd and 4th
order. A flow schedule (α = 0 at t = 1, ρ = ∞) is solved in the "velocity" frame instead,
y = x/(α + σ) over ν = σ/(α + σ) with slope v = ε − x̂0, where Euler is again DDIM
(:func:`sagkit.core.frames.ode_frame`; docs/maths.md §2.5). A new explicit tableau is one
entry of :data:`SOLVERS`; the gradient engines (:mod:`sagkit.gradients`) declare which entries
they support.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .checks import check_grid, check_inputs, show_progress
from .frames import ode_frame
from .registry import Registry

__all__ = [
    "Tableau",
    "SOLVERS",
    "register_solver",
    "solve",
    "check_grid",
    "ProbabilityFlow",
    "rk_stages",
    "rk_step",
]


@dataclass(frozen=True)
class Tableau:
    """An explicit Butcher tableau: stages U_i = u + h Σ_{j<i} a_ij k_j, k_i = f(U_i, ρ + c_i h),
    step u' = u + h Σ_i b_i k_i. ``a`` is strictly lower triangular, given as its rows."""

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int

    def __post_init__(self):
        s = len(self.b)
        if (
            len(self.c) != s
            or len(self.a) != s
            or any(len(row) != i for i, row in enumerate(self.a))
        ):
            raise ValueError(
                f"tableau {self.name!r}: a must be strictly lower triangular with {s} rows"
            )
        if not math.isclose(sum(self.b), 1.0):
            raise ValueError(f"tableau {self.name!r}: weights b must sum to 1")

    @property
    def stages(self) -> int:
        return len(self.b)


SOLVERS: Registry[Tableau] = Registry("solver")
"""The explicit tableaus by name; :func:`register_solver` adds one."""


def register_solver(tableau: Tableau, *, replace: bool = False) -> Tableau:
    """Add an explicit tableau under ``tableau.name``; a taken name needs ``replace=True``."""
    return SOLVERS.register(tableau.name, tableau, replace=replace)


register_solver(Tableau("ddim", a=((),), b=(1.0,), c=(0.0,), order=1))  # Euler in (y, ρ)
register_solver(Tableau("heun", a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0), order=2))
register_solver(
    Tableau(
        "rk4",
        a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
        c=(0.0, 0.5, 0.5, 1.0),
        order=4,
    )
)


class ProbabilityFlow:
    """The right-hand side f(y, ν) = F(κ_{t(ν)} y, t(ν), cond) of the ODE in the schedule's
    frame (:func:`~sagkit.core.frames.ode_frame`): (y, ν) = (x/α, ρ) and F = ε for VP
    schedules, (x/(α + σ), σ/(α + σ)) and F = v for flow schedules.

    Args:
        model: a model of the protocol.
        cond: conditioning passed to the model.
    ``nfe`` counts network calls.

    (docs/maths.md §2.1, §2.5)
    """

    def __init__(self, model, cond=None):
        self.model = model
        self.schedule = model.schedule
        self.frame = ode_frame(model.schedule)
        self.cond = cond
        self.nfe = 0

    def nu(self, t: float) -> float:
        """The ODE's time variable ν_t (ρ_t for VP schedules)."""
        return self.frame.nu(self.schedule, float(t))

    def __call__(
        self, y: torch.Tensor, nu: float, t: float | None = None, cond=None
    ) -> torch.Tensor:
        """f(y, ν); pass ``t`` when it is known exactly (grid points), and ``cond`` to override."""
        self.nfe += 1
        t = self.frame.t_of_nu(self.schedule, nu) if t is None else t
        x = self.frame.kappa(self.schedule, t) * y
        return self.frame.predict(self.model, x, t, self.cond if cond is None else cond)

    def to_y(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """y = x / κ_t (x / α_t for VP schedules)."""
        return x / self.frame.kappa(self.schedule, float(t))

    def to_x(self, y: torch.Tensor, t: float) -> torch.Tensor:
        """x = κ_t y."""
        return self.frame.kappa(self.schedule, float(t)) * y


def rk_stages(
    f: Callable, y: torch.Tensor, nu: float, h: float, tableau: Tableau, t: float, *, cond=None
):
    """The stage states U_i and slopes k_i of one explicit RK step from (y, ν) with step h.

    ``t`` is the time at ν (the grid point), used for stages with c_i = 0.
    Returns two lists of length ``tableau.stages``.

    (docs/maths.md §2.3)
    """
    states, slopes = [], []
    for i in range(tableau.stages):
        u = y
        for a_ij, k_j in zip(tableau.a[i], slopes, strict=True):
            if a_ij:
                u = u + (h * a_ij) * k_j
        states.append(u)
        c = tableau.c[i]
        slopes.append(f(u, nu + c * h, t if c == 0 else None, cond))
    return states, slopes


def rk_step(
    f: Callable, y: torch.Tensor, nu: float, h: float, tableau: Tableau, t: float, *, cond=None
):
    """One explicit RK step: y + h Σ_i b_i k_i.

    (docs/maths.md §2.2, §2.3)
    """
    _, slopes = rk_stages(f, y, nu, h, tableau, t, cond=cond)
    out = y
    for b_i, k_i in zip(tableau.b, slopes, strict=True):
        if b_i:
            out = out + (h * b_i) * k_i
    return out


def solve(
    model,
    x: torch.Tensor,
    ts,
    *,
    solver: str = "ddim",
    cond=None,
    callback=None,
    progress: bool | None = None,
):
    """Solve the probability-flow ODE from ``ts[0]`` to ``ts[-1]``; return the state at ``ts[-1]``.

    Args:
        model: a model of the protocol.
        x: (B, ...) state at ``ts[0]``.
        ts: strictly decreasing times, ``ts[0]`` in (0, 1] and ``ts[-1]`` in [0, 1]
            (see :func:`sagkit.time_grid`). n = len(ts) − 1 steps.
        solver: a name in :data:`SOLVERS` ("ddim", "heun", "rk4").
        cond: conditioning passed to the model.
        callback: called as ``callback(i, t_i, x_i)`` at every grid point, i = 0..n.
        progress: show a progress bar; ``None``: from 1000 steps on
            (:data:`sagkit.core.checks.PROGRESS_STEPS`).
    Returns:
        (B, ...) state at ``ts[-1]``, x's dtype. With t_end = 0 and ddim this is α_0 x̂0 = x̂0.

    (docs/maths.md §2.3)
    """
    check_inputs(model, x, cond=cond)
    tableau = SOLVERS[solver]
    ts = check_grid(ts)
    progress = show_progress(progress, len(ts) - 1)
    f = ProbabilityFlow(model, cond)
    y = f.to_y(x, ts[0])
    if callback is not None:
        callback(0, float(ts[0]), x)
    for k in tqdm(range(len(ts) - 1), desc=f"solve {solver}", disable=not progress, leave=False):
        t, s = float(ts[k]), float(ts[k + 1])
        nu = f.nu(t)
        y = rk_step(f, y, nu, f.nu(s) - nu, tableau, t)
        if callback is not None:
            callback(k + 1, s, f.to_x(y, s))
    return f.to_x(y, ts[-1])
