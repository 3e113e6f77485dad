"""Training-free guided sampling: FreeDoM, DPS and symplectic adjoint guidance (SAG).

One base sampler for every method: DDIM (η = 0) on ``steps`` steps uniform in t from 1 to 0,
each step t → s taken by :func:`sagkit.solve` on the grid [t, s]. Inside the guidance window
a step becomes

    x_s = DDIM(x_t) − ρ_t g,      g = ∂L(x̂0(x_t))/∂x_t,      shapes (B, C, H, W),

with a loss L of the clean-image estimate x̂0 (per sample, (B,) values, summed for the
gradient). The methods differ in the estimate and the step size ρ_t (one (B,) value per
sample):

    guidance   estimate x̂0(x_t)                                step size ρ_t       repeats
    "none"     —                                               —                   —
    "freedom"  one step (Tweedie): (x_t − σ_t ε(x_t, t))/α_t   c · RMS(Δ)/RMS(g)   2
    "dps"      one step (Tweedie)                              ζ / sqrt(L(x̂0))     1
    "sag"      n DDIM steps from t to 0, g by the              c · RMS(Δ)/RMS(g)   2
               symplectic adjoint (:func:`sagkit.loss_grad`)

- FreeDoM: Yu et al. 2023, "FreeDoM: Training-Free Energy-Guided Conditional Diffusion
  Model". SAG: Pan et al. 2023, "Towards Accurate Guided Diffusion Sampling through
  Symplectic Adjoint Method". DPS: Chung et al. 2023, "Diffusion Posterior Sampling for
  General Noisy Inverse Problems".
- **n counts estimate steps** (network evaluations), as in :func:`sagkit.estimate_x0`: the
  estimate solves the probability-flow ODE on ``time_grid(schedule, t, 0, n)``, n + 1 grid
  points. n = 1 is the one-step estimate, so ``guidance="sag", n=1`` is FreeDoM exactly.
  SAG's published default, 4 grid points, is n = 3 here (the default).
- The RMS step rule of FreeDoM's and SAG's code: ρ_t = c · RMS(Δ)/RMS(g) per sample, so the
  guidance moves x by c · RMS(Δ) whatever the loss's scale. With a conditional model
  (``cond`` given) the sampler is classifier-free guidance ε_u + w(ε_c − ε_u) and
  Δ = ε_c − ε_u, with c = 0.2 w by default (as published). Without ``cond`` there is no CFG
  difference; the fallback is Δ = DDIM(x_t) − x_t, the unguided update, so c is the size of
  the guidance move relative to the sampler's own step (default c = 2, chosen on the
  digits tasks of :mod:`sagkit.lab.evaluation`).
- DPS's rule: ζ_i = ζ/‖y − A(x̂0)‖ multiplies ∇‖y − A(x̂0)‖²; for a non-negative loss L this is
  ζ/sqrt(L) times ∇L (default ζ = 3). Unlike the RMS rule it depends on the loss's scale.
  Chung et al. guide at every step with no time travel; here the window
  is shared with the other methods (pass ``window=(0, 1)`` for theirs) and time travel is off
  by default (``repeats=1``).
- Time travel (FreeDoM's resampling; SAG's repeats): a guided step is taken ``repeats`` times;
  between two, x_s is re-noised back to t, x_t = (α_t/α_s) x_s + sqrt(1 − α_t²/α_s²) ξ.
- Guidance window: step k of ``steps`` (k = 0 at t = 1) is guided when lo ≤ k/steps < hi;
  (0.3, 0.7) of 100 steps is SAG's steps 30–69.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core.checks import check_cond, check_count, check_inputs, check_scale
from ..core.estimates import rms
from ..core.frames import per_sample, tweedie_x0
from ..core.models import ClassifierFreeGuidance
from ..core.registry import Registry
from ..core.schedules import time_grid
from ..core.solvers import solve
from ..gradients.api import loss_grad

__all__ = [
    "GUIDANCE",
    "GuidanceMethod",
    "guided_sample",
    "guidance_window",
    "guidance_gradient",
    "rms_step_size",
    "dps_step_size",
    "renoise",
    "GRADIENT_METHOD",
    "REUSE_EPS",
]

GRADIENT_METHOD = "symplectic"
"""The :data:`sagkit.METHODS` engine for guidance gradients (exact for the n-step solve)."""

DEFAULT_WINDOW = (0.3, 0.7)


@dataclass(frozen=True)
class GuidanceMethod:
    """A guidance method: which estimate, which step rule, how many repeats by default.

    ``n_step``: the estimate takes the ``n`` argument (SAG) rather than one step.
    ``step_rule``: "rms" (FreeDoM, SAG) or "dps"; ``None`` for no guidance.
    """

    name: str
    n_step: bool
    step_rule: str | None
    repeats: int
    description: str


GUIDANCE: Registry[GuidanceMethod] = Registry("guidance")
"""The guidance methods by name (the ``guidance`` argument of :func:`guided_sample`)."""
for _method in (
    GuidanceMethod("none", False, None, 1, "the unguided DDIM sampler"),
    GuidanceMethod("freedom", False, "rms", 2, "one-step estimate (Yu et al. 2023)"),
    GuidanceMethod("dps", False, "dps", 1, "one-step estimate, ζ/‖·‖ step (Chung et al. 2023)"),
    GuidanceMethod("sag", True, "rms", 2, "n-step estimate, symplectic adjoint (Pan et al. 2023)"),
):
    GUIDANCE.register(_method.name, _method)
del _method


def guidance_window(steps: int, window) -> list[bool]:
    """Which of ``steps`` steps are guided: step k when lo ≤ k/steps < hi, window = (lo, hi).

    (docs/maths.md §8.6)
    """
    try:
        lo, hi = (float(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be a pair (lo, hi) of fractions, got {window!r}") from None
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"window must satisfy 0 <= lo < hi <= 1, got {window!r}")
    return [lo <= k / steps < hi for k in range(steps)]


def _per_sample_loss(loss_fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """loss_fn(x), checked to be (B,) values."""
    value = loss_fn(x)
    if not isinstance(value, torch.Tensor) or value.shape != (x.shape[0],):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss_fn must return ({x.shape[0]},) values, one per image, got {shape}")
    return value


def guidance_gradient(
    model, loss_fn: Callable, x_t: torch.Tensor, t: float, *, n: int = 1, cond=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of the n-step estimate at x_t and its gradient, ``(L (B,), g (B, ...))``.

    x̂0 = Φ_n(x_t): n DDIM steps of ``model`` on ``time_grid(schedule, t, 0, n)`` (n = 1: the
    one-step estimate (x_t − σ_t ε)/α_t); g = ∂ Σ_b L(x̂0)_b / ∂x_t by the symplectic adjoint
    (Matsubara et al. 2021; exact for Φ_n with one step's graph in memory at a time).

    (docs/maths.md §8.2)
    """
    values = []

    def recorded(x0):
        value = _per_sample_loss(loss_fn, x0)
        values.append(value.detach())
        return value

    ts = time_grid(model.schedule, float(t), 0.0, n)
    _, g = loss_grad(model, recorded, x_t, ts, method=GRADIENT_METHOD, solver="ddim", cond=cond)
    return values[-1], g


def rms_step_size(delta: torch.Tensor, g: torch.Tensor, *, scale: float) -> torch.Tensor:
    """FreeDoM's and SAG's ρ = c · RMS(Δ)/RMS(g) per sample, (B,); 0 where g vanishes.

    (docs/maths.md §8.3)
    """
    rms_g = rms(g)
    return torch.where(rms_g > 0, scale * rms(delta) / rms_g.clamp(min=1e-30), 0.0)


def dps_step_size(loss: torch.Tensor, *, scale: float) -> torch.Tensor:
    """DPS's ρ = ζ/sqrt(L) per sample, (B,): ζ/‖y − A(x̂0)‖ for L = ‖y − A(x̂0)‖².

    (docs/maths.md §8.3)
    """
    if bool((loss < 0).any()):
        raise ValueError("the DPS step ζ/sqrt(L) needs a non-negative loss")
    return scale / loss.clamp(min=1e-12).sqrt()


def renoise(schedule, x_s: torch.Tensor, s: float, t: float, *, generator=None) -> torch.Tensor:
    """Time travel from s back to t > s: (α_t/α_s) x_s + sqrt(1 − α_t²/α_s²) ξ, ξ ~ N(0, I).

    (docs/maths.md §8.5)
    """
    ratio = schedule.alpha(float(t)) / schedule.alpha(float(s))
    device = generator.device if generator is not None else x_s.device
    noise = torch.randn(x_s.shape, generator=generator, dtype=x_s.dtype, device=device)
    return ratio * x_s + math.sqrt(max(0.0, 1.0 - ratio**2)) * noise.to(x_s.device)


REUSE_EPS = True
"""Whether a guided step's gradient reuses the base step's ε(x_t) (bit-identical results, one
network call fewer per guided step; docs/maths.md §8.8). ``False`` restores the old path, for
comparison."""


def _same_cond(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


class _Last:
    """A model that keeps its last output ``last`` (ε) of a call without autograd: read ε and
    ε_c − ε_u of a step for free.

    With ``serve=True`` it also answers a call without autograd on an input equal, bit for bit,
    to that of the call it remembers (x, t and cond) with the remembered output instead of
    evaluating the network again. A hit returns exactly what the network would return on that
    input (the network is a deterministic function of it), so the results do not change; calls
    under autograd always go to the network (they need its graph). ``hits`` counts the reuses.

    (docs/maths.md §8.8)
    """

    def __init__(self, model, *, serve: bool = False):
        self.model, self.schedule, self.last = model, model.schedule, None
        self.serve, self.hits, self._key = serve, 0, None

    def eps(self, x, t, cond=None):
        recording = not torch.is_grad_enabled()
        if recording and self.serve and self._key is not None:
            x0, t0, c0 = self._key
            if t0 == t and x0.shape == x.shape and torch.equal(x0, x) and _same_cond(c0, cond):
                self.hits += 1
                return self.last
        out = self.model.eps(x, t, cond)
        if recording:
            self.last = out
            if self.serve:
                self._key = (x, t, cond)
        return out


class _BaseSampler:
    """The DDIM step shared by all methods, with what the step rules and loss curves need.

    ``step(x_t, t, s)`` returns x_s, the one-step estimate x̂0(x_t) and the reference
    displacement Δ (ε_c − ε_u under CFG, else x_s − x_t), all (B, ...). ``model`` is the model
    for the guidance gradients: with :data:`REUSE_EPS` it serves the step's ε(x_t) to the
    first step of the estimate, which evaluates the network on the same input.
    """

    def __init__(self, model, cond, cfg_scale: float | None):
        self.schedule = model.schedule
        self.inner = _Last(model)
        self.cfg = cfg_scale is not None
        if self.cfg:
            null = _null_cond(model)
            gradient_model = ClassifierFreeGuidance(model, null, cfg_scale)
            self.outer = _Last(ClassifierFreeGuidance(self.inner, null, cfg_scale), serve=True)
        else:
            gradient_model = model
            self.outer = self.inner = _Last(model, serve=True)
        self.model = self.outer if REUSE_EPS else gradient_model
        self.cond = cond

    def step(self, x_t: torch.Tensor, t: float, s: float):
        with torch.no_grad():
            x_s = solve(self.outer, x_t, torch.tensor([t, s], dtype=torch.float64), cond=self.cond)
            x0 = tweedie_x0(self.schedule, x_t, t, self.outer.last)
            if self.cfg:
                e_cond, e_uncond = self.inner.last.chunk(2)
                delta = e_cond - e_uncond
            else:
                delta = x_s - x_t
        return x_s, x0, delta


def _null_cond(model) -> torch.Tensor:
    null = getattr(model, "null_cond", None)
    if null is None:
        raise ValueError(
            "cond needs a model with a null_cond (the unconditional embedding) for classifier-free guidance"
        )
    return null


def _default_scale(step_rule: str | None, cfg_scale: float | None) -> float:
    """c = 0.2 w under CFG (FreeDoM's and SAG's code), c = 2 for the fallback Δ, ζ = 3 for DPS.

    c = 2 and ζ = 3 were chosen on the digits tasks of :mod:`sagkit.lab.evaluation` (ζ on the
    inpainting task, where DPS's rule is exact; Chung et al. use ζ ≤ 1 on 256² images).

    (docs/maths.md §8.3)
    """
    if step_rule == "dps":
        return 3.0
    return 2.0 if cfg_scale is None else 0.2 * cfg_scale


def _batch_cond(cond, x: torch.Tensor, name: str) -> torch.Tensor:
    """cond with batch size 1 or B, expanded to B, in x's dtype and device."""
    cond = check_cond(torch.as_tensor(cond), name, batch=x.shape[0]).to(x)
    return cond.expand(x.shape[0], *cond.shape[1:])


def guided_sample(
    model,
    loss_fn: Callable | None,
    x_T: torch.Tensor,
    *,
    steps: int = 50,
    guidance: str = "sag",
    n: int = 3,
    scale: float | None = None,
    window=DEFAULT_WINDOW,
    repeats: int | None = None,
    cond: torch.Tensor | None = None,
    cfg_scale: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    return_trajectory: bool = False,
    return_losses: bool = False,
):
    """Sample with training-free guidance by ``loss_fn`` (see the module docstring).

    Args:
        model: a model of the protocol (e.g. ``sk.load_pretrained("digits")``). Without
            ``cond``, a model with a ``null_cond`` is run on it (unconditional sampling).
        loss_fn: images (B, ...) → (B,) non-negative values (see :mod:`sagkit.guidance.losses`); may be
            ``None`` for ``guidance="none"``.
        x_T: (B, ...) the initial noise at t = 1.
        steps: DDIM steps from t = 1 to 0.
        guidance: "none", "freedom", "dps" or "sag" (:data:`GUIDANCE`).
        n: SAG's estimate steps (n = 1: FreeDoM); ignored by the other methods.
        scale: c of the RMS rule (default 0.2·cfg_scale with ``cond``, else 2) or DPS's ζ
            (default 3).
        window: (lo, hi), the guided fraction of the steps.
        repeats: guided steps per window step (time travel between them); ``None``: the
            method's default (2 for FreeDoM and SAG, 1 for DPS).
        cond: (B, E) or (1, E) conditioning: the sampler is then classifier-free guidance with
            scale ``cfg_scale`` around ``model.null_cond``, and Δ = ε_c − ε_u.
        cfg_scale: w of classifier-free guidance, only with ``cond``; default 1 (the
            conditional model).
        generator: a ``torch.Generator`` for the time-travel noise.
        progress: show a progress bar.
        return_trajectory: also return the states at the grid times, (steps + 1, B, ...).
        return_losses: also return L of the one-step estimate x̂0(x_{t_k}) at every grid time
            t_k, k < steps (the state entering step k), and L(x_0) last: (steps + 1, B).
    Returns:
        The samples x_0 (B, ...); with a ``return_*`` flag, a tuple ``(samples, trajectory,
        losses)`` holding only the requested extras, in that order.

    (docs/maths.md §8.1)
    """
    check_inputs(model, x_T, cond=cond, x_name="x_T")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    method = GUIDANCE[guidance]
    check_count(steps, "steps")
    check_count(n, "n")
    n = n if method.n_step else 1  # the one-step methods ignore n
    repeats = method.repeats if repeats is None else check_count(repeats, "repeats")
    guided = guidance_window(steps, window)
    if method.step_rule is None:
        guided = [False] * steps
    elif not any(guided):
        raise ValueError(
            f"the guidance window {tuple(window)} holds no step of steps={steps} (step k is "
            f"guided when lo <= k/steps < hi): guidance={guidance!r} would return the unguided "
            "sample; widen the window or take more steps"
        )
    cfg = cond is not None
    if cfg_scale is not None and not cfg:
        raise ValueError("cfg_scale needs cond (classifier-free guidance needs a condition)")
    cfg_scale = 1.0 if cfg_scale is None else float(cfg_scale)
    if cfg:
        cond = _batch_cond(cond, x_T, "cond")
    elif getattr(model, "null_cond", None) is not None:
        cond = _batch_cond(model.null_cond, x_T, "model.null_cond")
    if scale is None:
        scale = _default_scale(method.step_rule, cfg_scale if cfg else None)
    scale = check_scale(scale, "scale")
    if loss_fn is None and (any(guided) or return_losses):
        raise ValueError(f"loss_fn is needed for guidance={guidance!r} and for return_losses")
    if loss_fn is not None:
        with torch.no_grad():
            _per_sample_loss(loss_fn, x_T)  # fail early on a wrong shape or reference

    base = _BaseSampler(model, cond, cfg_scale if cfg else None)
    ts = time_grid(model.schedule, 1.0, 0.0, steps)
    x = x_T
    trajectory, losses = [x_T], []
    for k in tqdm(range(steps), desc=f"guidance {guidance}", disable=not progress, leave=False):
        t, s = float(ts[k]), float(ts[k + 1])
        x_t = x
        for r in range(repeats if guided[k] else 1):
            if r:
                x_t = renoise(model.schedule, x, s, t, generator=generator)
            x, x0, delta = base.step(x_t, t, s)
            if return_losses and r == 0:
                with torch.no_grad():
                    losses.append(_per_sample_loss(loss_fn, x0))
            if guided[k]:
                loss, g = guidance_gradient(base.model, loss_fn, x_t, t, n=n, cond=cond)
                if method.step_rule == "rms":
                    rho = rms_step_size(delta, g, scale=scale)
                else:
                    rho = dps_step_size(loss, scale=scale)
                x = x - per_sample(rho, x) * g
        if return_trajectory:
            trajectory.append(x)
    extras = []
    if return_trajectory:
        extras.append(torch.stack(trajectory))
    if return_losses:
        with torch.no_grad():
            losses.append(_per_sample_loss(loss_fn, x))
        extras.append(torch.stack(losses))
    return (x, *extras) if extras else x
