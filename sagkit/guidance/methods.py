"""Guidance methods as objects: what each does at a guided step of :func:`sagkit.guided_sample`.

At a guided step t → s the sampler evaluates the network once, F = F(x_t) (its prediction in
the schedule's ODE frame: ε for VP schedules, the velocity v for flow schedules), forms the
one-step estimate x̂0 (x̂0 = (x_t − σ_t ε)/α_t, or (x_t − σ_t v)/(α_t + σ_t)) and hands both
to the method (docs/maths.md §8.1):

    F ← method.shift_pred(run, step)          backward guidance: the F of a better x̂0
    x_s = Base(x_t, F)                        the base sampler's update
    x_s ← method.correct(run, step, x_s)      gradient guidance: x_s − ρ_t g

with g = ∂ Σ_b L(x̂0(x_t))_b / ∂x_t for the method's estimate x̂0(x_t) and ρ_t its step rule:

    method              estimate x̂0(x_t)                              step                   repeats
    :class:`Unguided`   —                                             —                      —
    :class:`FreeDoM`    one step (Tweedie): (x_t − σ_t ε)/α_t         ρ = c · RMS(Δ)/RMS(g)  2
    :class:`DPS`        one step (Tweedie)                            ρ = ζ / sqrt(L)        1
    :class:`SAG`        n DDIM steps, g exact through them            ρ = c · RMS(Δ)/RMS(g)  2
    :class:`Backward`   one step; m descent steps on x̂0 + Δ          ε ← ε − (α_t/σ_t) Δ    2
                        (the F whose one-step estimate is x̂0 + Δ)

- FreeDoM: Yu et al. 2023, "FreeDoM: Training-Free Energy-Guided Conditional Diffusion
  Model". SAG: Pan et al. 2023, "Towards Accurate Guided Diffusion Sampling through
  Symplectic Adjoint Method". DPS: Chung et al. 2023, "Diffusion Posterior Sampling for
  General Noisy Inverse Problems". Backward guidance: Bansal et al. 2023, "Universal
  Guidance for Diffusion Models".
- **The estimate grid** (``estimate_grid``, docs/maths.md §8.2). **n counts estimate steps**
  (network evaluations) in both: n = 1 is the one-step estimate, so SAG with n = 1 is FreeDoM
  exactly, whatever the grid. "to-zero" (default): n DDIM steps on
  ``time_grid(schedule, t, 0, n)``, n + 1 points from t to 0, returning x̂0. "sampler" (SAG's
  code): n + 1 points taken evenly in index (rounded down) from the base sampler's remaining
  evaluation times t_k … t_{K−1}, so the last point is the sampler's last time, not 0, and the
  estimate is the state there; when fewer than n + 1 times remain, all of them; when one
  remains, [t_k, 0]. SAG's published default, 4 grid points, is n = 3 here (the default).
- **The gradient engine** (``gradient``): any exact engine of :data:`sagkit.METHODS`, by name
  or as an object. The default, "budgeted" (1 GiB of step graphs), is backprop where the
  estimate's graphs fit (the digits UNet) and the symplectic adjoint of SAG's paper where they
  do not (Stable Diffusion at 64×64 latents); both are exact for the n-step estimate, so the
  choice changes the samples by rounding only.
- The RMS step rule of FreeDoM's and SAG's code: ρ = c · RMS(Δ)/RMS(g), so the guidance moves
  x by c · RMS(Δ) whatever the loss's scale. With a conditional model (``cond`` given) the
  sampler is classifier-free guidance ε_u + w(ε_c − ε_u) and Δ = ε_c − ε_u, with c = 0.2 w
  by default (as published). Without ``cond`` there is no CFG difference; the fallback is
  Δ = Base(x_t) − x_t, the unguided update, so c is the size of the guidance move relative
  to the sampler's own step (default c = 2, chosen on the digits tasks of
  :mod:`sagkit.lab.evaluation`).
- DPS's rule: ζ_i = ζ/‖y − A(x̂0)‖ multiplies ∇‖y − A(x̂0)‖²; for a non-negative loss L this is
  ζ/sqrt(L) times ∇L (default ζ = 3). Unlike the RMS rule it depends on the loss's scale.
- ``step_size="per-sample"`` (default) computes ρ for each sample from its own Δ, g (or L);
  ``"per-batch"`` computes one ρ from the whole batch, as the official codes do (they run one
  image at a time, where the two agree).
- Backward guidance: Δ minimises L(x̂0 + Δ) by ``backward_steps`` = m normalised descent steps
  Δ ← Δ − c · ∇/RMS(∇) from Δ = 0 (c = ``scale``, default 1), and the base step takes
  ε − (α_t/σ_t) Δ, the ε whose Tweedie estimate is x̂0 + Δ. Bansal et al. descend with a
  raw learning rate tuned per task; the normalised step makes c a distance in pixels.

A new method is a subclass of :class:`GuidanceMethod` (or :class:`GradientGuidance`) that
overrides what it changes, registered in :data:`GUIDANCE` under its ``name``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..core.checks import require
from ..core.estimates import rms
from ..core.frames import per_sample
from ..core.registry import Registry
from ..core.schedules import time_grid
from ..gradients.api import GradientMethod, resolve_engine, run_engine

if TYPE_CHECKING:
    from .step import GuidanceRun, GuidedStep

__all__ = [
    "GuidanceMethod",
    "GradientGuidance",
    "Unguided",
    "FreeDoM",
    "SAG",
    "DPS",
    "Backward",
    "GUIDANCE",
    "estimate_times",
    "guidance_gradient",
    "estimate_loss_grad",
    "rms_step_size",
    "dps_step_size",
    "backward_shift",
    "per_sample_loss",
]


class GuidanceMethod:
    """A guidance method; this base class guides nothing. Subclasses override what they change.

    Class attributes: ``name`` (its key in :data:`GUIDANCE`), ``repeats`` (time travel on the
    guided steps by default), ``rule`` (its step rule, for tables and file names), ``guides``
    (whether it changes a step at all), ``description`` (one line for tables) and
    ``reads_scale``.
    """

    name: ClassVar[str] = "none"
    repeats: ClassVar[int] = 1
    rule: ClassVar[str] = "none"
    guides: ClassVar[bool] = True
    description: ClassVar[str] = ""
    reads_scale: ClassVar[bool] = True
    """Whether the configuration's ``scale`` is this method's step constant (a method whose
    scales are its own fields says ``False``, and the configuration refuses a ``scale``)."""

    def estimate_steps(self, n: int) -> int:
        """How many steps its estimate takes, given the configured ``n``: 1 (the one-step
        estimate) unless the method is built on the n-step estimate."""
        return 1

    def default_scale(self, cfg_scale: float | None) -> float:
        """The step rule's constant when ``scale`` is not given (``cfg_scale``: w under CFG)."""
        return 0.0

    def evaluate(self, run: GuidanceRun, k: int, x_t: torch.Tensor) -> GuidedStep:
        """The network's evaluation at step k (default: the base step's call alone)."""
        return run.evaluate(k, x_t)

    def shift_pred(self, run: GuidanceRun, step: GuidedStep) -> torch.Tensor:
        """The F the base sampler updates with at a guided step (default: the network's)."""
        return step.pred

    def correct(self, run: GuidanceRun, step: GuidedStep, x_s: torch.Tensor) -> torch.Tensor:
        """The state after a guided step, from the base sampler's x_s (default: x_s)."""
        return x_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Unguided(GuidanceMethod):
    """The unguided base sampler."""

    guides = False
    description = "the unguided base sampler"


class GradientGuidance(GuidanceMethod):
    """Guidance by a gradient step after the base update: x_s − ρ_t g (docs/maths.md §8.1).

    Subclasses give the step rule :meth:`step_size` (and :meth:`estimate_steps`).
    """

    def step_size(
        self, run: GuidanceRun, step: GuidedStep, x_s: torch.Tensor, loss, g
    ) -> torch.Tensor:
        """ρ_t per sample, (B,)."""
        raise NotImplementedError

    def evaluate(self, run: GuidanceRun, k: int, x_t: torch.Tensor) -> GuidedStep:
        """ε(x_t) together with the gradient of the method's estimate, one evaluation shared."""
        return run.evaluate_with_gradient(k, x_t, self.estimate_steps(run.config.n))

    def correct(self, run: GuidanceRun, step: GuidedStep, x_s: torch.Tensor) -> torch.Tensor:
        loss, g = step.gradient
        return x_s - per_sample(self.step_size(run, step, x_s, loss, g), x_s) * g


class FreeDoM(GradientGuidance):
    """FreeDoM (Yu et al. 2023): the one-step estimate, the RMS step rule."""

    name = "freedom"
    repeats = 2
    rule = "rms"
    description = "one-step estimate (Yu et al. 2023)"

    def default_scale(self, cfg_scale: float | None) -> float:
        """c = 0.2 w under CFG (FreeDoM's and SAG's code), c = 2 for the fallback Δ (chosen on
        the digits tasks of :mod:`sagkit.lab.evaluation`). (docs/maths.md §8.3)"""
        return 2.0 if cfg_scale is None else 0.2 * cfg_scale

    def step_size(self, run, step, x_s, loss, g):
        """ρ = c · RMS(Δ)/RMS(g), Δ = ε_c − ε_u under CFG, else the base update x_s − x_t."""
        delta = step.cfg_difference if step.cfg_difference is not None else x_s - step.x_t
        return rms_step_size(delta, g, scale=run.scale, per_batch=run.config.per_batch)


class SAG(FreeDoM):
    """Symplectic adjoint guidance (Pan et al. 2023): FreeDoM's step on the n-step estimate."""

    name = "sag"
    description = "n-step estimate, exact gradient (Pan et al. 2023)"

    def estimate_steps(self, n: int) -> int:
        return n


class DPS(GradientGuidance):
    """Diffusion posterior sampling (Chung et al. 2023): the one-step estimate, ρ = ζ/sqrt(L)."""

    name = "dps"
    rule = "dps"
    description = "one-step estimate, ζ/‖·‖ step (Chung et al. 2023)"

    def default_scale(self, cfg_scale: float | None) -> float:
        """ζ = 3, chosen on the inpainting task of :mod:`sagkit.lab.evaluation`, where DPS's
        rule is exact (Chung et al. use ζ ≤ 1 on 256² images). (docs/maths.md §8.3)"""
        return 3.0

    def step_size(self, run, step, x_s, loss, g):
        return dps_step_size(loss, scale=run.scale, per_batch=run.config.per_batch)


class Backward(GuidanceMethod):
    """Universal guidance's backward guidance (Bansal et al. 2023): descent on x̂0, mapped to ε."""

    name = "backward"
    repeats = 2
    rule = "backward"
    description = "descent on x̂0, mapped to ε (Bansal et al. 2023)"

    def default_scale(self, cfg_scale: float | None) -> float:
        """c = 1 pixel (RMS) per descent step, chosen on the digits tasks. (docs/maths.md §8.9)"""
        return 1.0

    def shift_pred(self, run, step):
        """The F whose one-step estimate is x̂0 + Δ, Δ from :func:`backward_shift`:
        ε − (α_t/σ_t) Δ for VP schedules (:meth:`~sagkit.core.frames.Frame.shift_x0`)."""
        shift = backward_shift(
            run.loss_fn,
            step.x0,
            steps=run.config.backward_steps,
            scale=run.scale,
            per_batch=run.config.per_batch,
        )
        return run.frame.shift_x0(run.schedule, step.t, step.pred, shift)


GUIDANCE: Registry[GuidanceMethod] = Registry("guidance")
"""The guidance methods by name (the ``guidance`` option of :func:`sagkit.guided_sample`)."""
for _method in (Unguided(), FreeDoM(), DPS(), SAG(), Backward()):
    GUIDANCE.register(_method.name, _method)
del _method


def estimate_times(times: Sequence[float], k: int, n: int, *, grid: str, schedule) -> torch.Tensor:
    """The grid of the n-step estimate at step k of a base sampler with times ``times``.

    "to-zero": ``time_grid(schedule, t_k, 0, n)``. "sampler": n + 1 points evenly in index,
    t_{k + ⌊j (M − 1)/n⌋}, from the M evaluation times t_k … t_{K−1}, K = len(times) − 1 (in
    exact integers; SAG's code rounds a float linspace, which can land one index lower); all
    of them when fewer remain; [t_k, 0] when n = 1 or only t_k remains. float64, (m + 1,).

    (docs/maths.md §8.2)
    """
    t = float(times[k])
    if grid == "to-zero":  # time_grid(schedule, t, 0, n), without its checks
        return torch.linspace(t, 0.0, n + 1, dtype=torch.float64)
    remaining = torch.as_tensor(times[k:-1], dtype=torch.float64)  # t_k … t_{K−1}
    if n == 1 or remaining.numel() == 1:
        return torch.tensor([t, 0.0], dtype=torch.float64)
    points, m = min(n + 1, remaining.numel()), remaining.numel()
    # index ⌊j (M − 1)/n'⌋, j = 0 … n', n' = points − 1, in integers: SAG's code takes
    # torch.linspace(0, M − 1, n' + 1, dtype=long), whose float steps can land one below
    # (M = 59, n = 14: 28 for ⌊7 · 58/14⌋ = 29), and differ between devices
    index = torch.div(torch.arange(points) * (m - 1), points - 1, rounding_mode="floor")
    return remaining[index]


def per_sample_loss(loss_fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """loss_fn(x), checked to be (B,) values."""
    value = loss_fn(x)
    if not isinstance(value, torch.Tensor) or value.shape != (x.shape[0],):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss_fn must return ({x.shape[0]},) values, one per image, got {shape}")
    return value


def guidance_gradient(
    model,
    loss_fn: Callable,
    x_t: torch.Tensor,
    t: float,
    *,
    n: int = 1,
    cond=None,
    ts=None,
    gradient: str | GradientMethod = "budgeted",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of the n-step estimate at x_t and its gradient, ``(L (B,), g (B, ...))``.

    x̂0 = Φ(x_t): DDIM steps of ``model`` on ``ts`` (default ``time_grid(schedule, t, 0, n)``;
    n = 1: the one-step estimate (x_t − σ_t ε)/α_t); g = ∂ Σ_b L(x̂0)_b / ∂x_t by the
    ``gradient`` engine (exact for Φ: the symplectic adjoint of Matsubara et al. 2021 keeps
    one step's graph at a time, backprop all of them; "budgeted" as many as 1 GiB holds).

    (docs/maths.md §8.2)
    """
    ts = time_grid(model.schedule, float(t), 0.0, n) if ts is None else ts
    return estimate_loss_grad(resolve_engine(gradient), model, loss_fn, x_t, ts, cond=cond)


def estimate_loss_grad(
    engine: GradientMethod, model, loss_fn: Callable, x_t: torch.Tensor, ts, *, cond=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`guidance_gradient` on a resolved ``engine`` and grid ``ts``, unchecked: the
    guided step's call. ``(L (B,), g (B, ...))``."""
    values = []

    def recorded(x0):
        value = per_sample_loss(loss_fn, x0)
        values.append(value.detach())
        return value

    _, (g,) = run_engine(engine, model, recorded, x_t, ts, cond=cond)
    return values[-1], g


def _batch_rms(v: torch.Tensor, per_batch: bool) -> torch.Tensor:
    """RMS per sample (B,), or the batch's RMS repeated B times."""
    return rms(v.reshape(1, -1)).expand(v.shape[0]) if per_batch else rms(v)


def rms_step_size(
    delta: torch.Tensor, g: torch.Tensor, *, scale: float, per_batch: bool = False
) -> torch.Tensor:
    """FreeDoM's and SAG's ρ = c · RMS(Δ)/RMS(g), (B,); 0 where g vanishes. With
    ``per_batch`` the RMS run over the whole batch (one ρ, repeated).

    (docs/maths.md §8.3)
    """
    rms_g = _batch_rms(g, per_batch)
    return torch.where(
        rms_g > 0, scale * _batch_rms(delta, per_batch) / rms_g.clamp(min=1e-30), 0.0
    )


def dps_step_size(loss: torch.Tensor, *, scale: float, per_batch: bool = False) -> torch.Tensor:
    """DPS's ρ = ζ/sqrt(L) per sample, (B,): ζ/‖y − A(x̂0)‖ for L = ‖y − A(x̂0)‖². With
    ``per_batch``, ζ/sqrt(Σ_b L_b), the norm over the whole batch.

    (docs/maths.md §8.3)
    """
    require((loss >= 0).all(), lambda: "the DPS step ζ/sqrt(L) needs a non-negative loss")
    total = loss.sum().expand(loss.shape[0]) if per_batch else loss
    return scale / total.clamp(min=1e-12).sqrt()


def backward_shift(
    loss_fn: Callable, x0: torch.Tensor, *, steps: int, scale: float, per_batch: bool = False
) -> torch.Tensor:
    """Backward guidance's Δ, (B, ...): ``steps`` descent steps on L(x̂0 + Δ) from Δ = 0,

        Δ ← Δ − c · ∇_Δ L / RMS(∇_Δ L)     (each step moves x̂0 + Δ by c in RMS).

    (docs/maths.md §8.9)
    """
    delta = torch.zeros_like(x0)
    for _ in range(steps):
        with torch.enable_grad():
            leaf = delta.detach().requires_grad_()
            (grad,) = torch.autograd.grad(per_sample_loss(loss_fn, x0 + leaf).sum(), leaf)
        size = _batch_rms(grad, per_batch)
        step = torch.where(size > 0, scale / size.clamp(min=1e-30), 0.0)
        delta = delta - per_sample(step, grad) * grad
    return delta
