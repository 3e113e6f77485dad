"""One guided step, top to bottom: what happens at step k of :func:`sagkit.guided_sample`.

Step k moves x from t = t_k to s = t_{k+1} (docs/maths.md §8.1). It is taken ``counts[k]``
times (time travel); each take runs, in this order:

1. evaluate   F = F(x_t), the network's prediction in the schedule's frame (ε, or the
              velocity of a flow), and the one-step estimate x̂0 = (x_t − σ_t ε)/α_t (§2.5).
              A gradient method also takes L(x̂0) of its n-step estimate and
              g = ∂ Σ_b L_b/∂x_t on the grid of :func:`estimate_times` (§8.2), sharing F(x_t)
              with the base step (§8.8);
2. shift      F ← ``method.shift_pred``: backward guidance's F of x̂0 + Δ (§8.9);
3. base step  x_s = Base(x_t, F): sagkit's DDIM or a diffusers scheduler (guidance/base.py);
4. correct    x_s ← ``method.correct``: x_s − ρ_t g, with the method's step rule ρ_t (§8.3);
5. re-noise   before a repeat, the base sampler rewound and x_t = renoise(x_s) (§8.5).

Outside the guidance window (§8.6) the step is :class:`~sagkit.guidance.methods.Unguided`'s:
evaluate and base step only. :class:`GuidanceRun` is the bound run the step reads: the method,
the engine, the step constant and the repeat counts resolved once by
:meth:`~sagkit.guidance.config.GuidanceConfig.bind`. Nothing here checks an argument; values
are checked deferred (:func:`~sagkit.core.checks.require`), named by the step's label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..core.checks import labelled, require
from ..core.frames import ode_frame
from ..gradients.api import GradientMethod
from .base import FirstCall
from .methods import GuidanceMethod, Unguided, estimate_loss_grad, estimate_times, per_sample_loss
from .travel import renoise

if TYPE_CHECKING:
    from .config import GuidanceConfig

__all__ = ["GuidedStep", "GuidanceRun", "take_step"]

UNGUIDED = Unguided()


@dataclass(frozen=True)
class GuidedStep:
    """Take k as a method sees it: ``x_t`` (B, ...) entering it at time ``t``; ``pred`` (B, ...)
    F(x_t) without a graph (under CFG the guided one); ``x0`` its one-step estimate;
    ``cfg_difference`` Δ = ε_c − ε_u under CFG in ε units, else ``None``; ``gradient``
    ``(L (B,), g (B, ...))`` of the method's estimate where it took one, else ``None``."""

    k: int
    t: float
    x_t: torch.Tensor
    pred: torch.Tensor
    x0: torch.Tensor
    cfg_difference: torch.Tensor | None
    gradient: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class GuidanceRun:
    """One guided run, bound (:meth:`~sagkit.guidance.config.GuidanceConfig.bind`): ``model``
    of every call (CFG around the user's model when ``cfg``), ``base`` sampler, ``loss_fn``
    (B, ...) → (B,), ``cond`` (B, ...) or ``None``, the checked ``config``; and what it
    resolves to, once: ``method``, ``engine``, ``scale`` (c or ζ), and per step whether it is
    ``guided`` and its take ``counts``."""

    model: object
    cfg: bool
    base: object
    loss_fn: Callable
    cond: torch.Tensor | None
    config: GuidanceConfig
    method: GuidanceMethod
    engine: GradientMethod
    scale: float
    guided: tuple[bool, ...]
    counts: tuple[int, ...]

    @property
    def schedule(self):
        return self.model.schedule

    @property
    def frame(self):
        """The frame of the schedule's ODE, in which F is predicted (:func:`ode_frame`)."""
        return ode_frame(self.model.schedule)

    def x0(self, x_t: torch.Tensor, t: float, pred: torch.Tensor) -> torch.Tensor:
        """The one-step estimate from F at (x_t, t); shape of x_t. (docs/maths.md §2.5)"""
        return self.frame.x0(self.schedule, x_t, t, pred)

    def pred_of_x0(self, x_t: torch.Tensor, t: float, x0: torch.Tensor) -> torch.Tensor:
        """The F at x_t whose one-step estimate is ``x0``. (docs/maths.md §2.5)"""
        return self.frame.pred_of_x0(self.schedule, x_t, t, x0)

    def evaluate(self, k: int, x_t: torch.Tensor) -> GuidedStep:
        """The base step's own network call at x_t (no gradient)."""
        t, network = self.base.times[k], FirstCall(self.model, self.cfg, self.base.times[k])
        with torch.no_grad():
            self.base.predict(network, x_t, k, self.cond)
            pred, difference = network.first
            return GuidedStep(k, t, x_t, pred, self.x0(x_t, t, pred), difference)

    def evaluate_with_gradient(self, k: int, x_t: torch.Tensor, n: int) -> GuidedStep:
        """The network at x_t and the gradient of the n-step estimate there, sharing F(x_t):
        every solver's first stage is at the step's start, so the engine's first call,
        detached, is the base step's F (§8.8). ``reuse_eps`` off: the base step calls the
        network itself, for comparison."""
        t, times = self.base.times[k], self.base.times
        grid = estimate_times(times, k, n, grid=self.config.estimate_grid, schedule=self.schedule)
        model = FirstCall(self.model, self.cfg, t)
        loss, g = estimate_loss_grad(self.engine, model, self.loss_fn, x_t, grid, cond=self.cond)
        require(torch.isfinite(g).all(), lambda: "the guidance gradient holds NaN or inf")
        if not self.config.reuse_eps:
            return replace(self.evaluate(k, x_t), gradient=(loss, g))
        pred, difference = model.first
        with torch.no_grad():
            x0 = self.x0(x_t, t, pred)
        return GuidedStep(k, t, x_t, pred, x0, difference, (loss, g))


def take_step(run: GuidanceRun, k: int, x: torch.Tensor, *, generator=None, losses=None):
    """Step k from x (B, ...) to the state at t_{k+1}, all its takes; ``losses``: a list that
    receives L of the first take's one-step estimate, (B,)."""
    t, s = run.base.times[k], run.base.times[k + 1]
    method = run.method if run.guided[k] else UNGUIDED
    saved = run.base.save() if run.counts[k] > 1 else None
    x_t = x
    for r in range(run.counts[k]):
        with labelled(
            f"step {k} of {len(run.counts)} (t = {t:.4g}" + (f", repeat {r})" if r else ")")
        ):
            if r:  # 5. re-noise, the base sampler as it was before the step
                run.base.load(saved)
                x_t = renoise(run.schedule, x, s, t, generator=generator)
            step = method.evaluate(run, k, x_t)  # 1. evaluate (and the gradient)
            if losses is not None and r == 0:
                with torch.no_grad():
                    losses.append(per_sample_loss(run.loss_fn, step.x0))
            pred = method.shift_pred(run, step)  # 2. shift
            with torch.no_grad():
                x = run.base.update(x_t, k, pred, generator=generator)  # 3. base step
            x = method.correct(run, step, x)  # 4. correct
            require(torch.isfinite(x).all(), lambda: "the state after the step holds NaN or inf")
    return x
