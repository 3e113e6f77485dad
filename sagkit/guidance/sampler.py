"""Training-free guided sampling: FreeDoM, DPS, symplectic adjoint guidance (SAG) and backward
guidance, on any base sampler.

A base sampler (:mod:`sagkit.guidance.base`: sagkit's DDIM, or any diffusers scheduler) walks
the times t_0 > … > t_K. Inside the guidance window its step t → s becomes

    x_s = Base(x_t, ε(x_t)) − ρ_t g,      g = ∂L(x̂0(x_t))/∂x_t,      shapes (B, C, H, W),

with a loss L of the clean-image estimate x̂0 (per sample, (B,) values, summed for the
gradient). The methods differ in the estimate and the step size ρ_t:

    guidance    estimate x̂0(x_t)                              step                   repeats
    "none"      —                                             —                      —
    "freedom"   one step (Tweedie): (x_t − σ_t ε)/α_t         ρ = c · RMS(Δ)/RMS(g)  2
    "dps"       one step (Tweedie)                            ρ = ζ / sqrt(L)        1
    "sag"       n DDIM steps, g by the symplectic adjoint     ρ = c · RMS(Δ)/RMS(g)  2
    "backward"  one step; m descent steps on x̂0 + Δ          ε ← ε − (α_t/σ_t) Δ    2

- FreeDoM: Yu et al. 2023, "FreeDoM: Training-Free Energy-Guided Conditional Diffusion
  Model". SAG: Pan et al. 2023, "Towards Accurate Guided Diffusion Sampling through
  Symplectic Adjoint Method". DPS: Chung et al. 2023, "Diffusion Posterior Sampling for
  General Noisy Inverse Problems". Backward guidance: Bansal et al. 2023, "Universal
  Guidance for Diffusion Models".
- **The estimate grid** (``estimate_grid``, docs/maths.md §8.2). **n counts estimate steps**
  (network evaluations) in both: n = 1 is the one-step estimate, so ``guidance="sag", n=1``
  is FreeDoM exactly, whatever the grid.
  "to-zero" (default): n DDIM steps on ``time_grid(schedule, t, 0, n)``, n + 1 points from t
  to 0, returning x̂0. "sampler" (SAG's code): n + 1 points taken evenly in index (rounded
  down) from the base sampler's remaining evaluation times t_k … t_{K−1}, so the last point
  is the sampler's last time, not 0, and the estimate is the state there; when fewer than
  n + 1 times remain, all of them; when one remains, [t_k, 0]. SAG's published default, 4
  grid points, is n = 3 here (the default).
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
- Time travel (FreeDoM's resampling, SAG's repeats, universal guidance's self-recurrence): a
  step is taken ``repeats`` times; between two, x_s is re-noised back to t,
  x_t = (α_t/α_s) x_s + sqrt(1 − α_t²/α_s²) ξ, and the base sampler is put back as it was
  before the step (docs/maths.md §8.5). ``repeats`` is an int (on the guided steps), a list
  with one entry per step, or a function of the step index k.
- Guidance window: step k of ``steps`` (k = 0 at t = 1) is guided when lo ≤ k/steps < hi;
  (0.3, 0.7) of 100 steps is SAG's steps 30–69.
- ``preset``: every choice of one paper's official code at once (:mod:`sagkit.guidance.presets`).

The loop does not synchronise host and device: value checks inside it are deferred to one
check at the end (:func:`sagkit.core.checks.deferred_checks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core.checks import (
    check_cond,
    check_count,
    check_inputs,
    check_name,
    check_scale,
    deferred_checks,
    require,
)
from ..core.estimates import rms
from ..core.frames import per_sample, tweedie_x0
from ..core.models import ClassifierFreeGuidance
from ..core.registry import Registry
from ..core.schedules import time_grid
from ..gradients.api import loss_grad
from .base import make_base

__all__ = [
    "GUIDANCE",
    "GuidanceMethod",
    "guided_sample",
    "guidance_window",
    "guidance_gradient",
    "estimate_times",
    "repeat_schedule",
    "rms_step_size",
    "dps_step_size",
    "backward_shift",
    "renoise",
    "GRADIENT_METHOD",
    "REUSE_EPS",
    "ESTIMATE_GRIDS",
    "STEP_SIZES",
    "DEFAULTS",
]

GRADIENT_METHOD = "symplectic"
"""The :data:`sagkit.METHODS` engine for guidance gradients (exact for the n-step solve)."""

DEFAULT_WINDOW = (0.3, 0.7)
ESTIMATE_GRIDS = ("to-zero", "sampler")
STEP_SIZES = ("per-sample", "per-batch")


@dataclass(frozen=True)
class GuidanceMethod:
    """A guidance method: which estimate, which step rule, how many repeats by default.

    ``n_step``: the estimate takes the ``n`` argument (SAG) rather than one step.
    ``step_rule``: "rms" (FreeDoM, SAG), "dps", "backward"; ``None`` for no guidance.
    """

    name: str
    n_step: bool
    step_rule: str | None
    repeats: int
    description: str


GUIDANCE: Registry[GuidanceMethod] = Registry("guidance")
"""The guidance methods by name (the ``guidance`` argument of :func:`guided_sample`)."""
for _method in (
    GuidanceMethod("none", False, None, 1, "the unguided base sampler"),
    GuidanceMethod("freedom", False, "rms", 2, "one-step estimate (Yu et al. 2023)"),
    GuidanceMethod("dps", False, "dps", 1, "one-step estimate, ζ/‖·‖ step (Chung et al. 2023)"),
    GuidanceMethod("sag", True, "rms", 2, "n-step estimate, symplectic adjoint (Pan et al. 2023)"),
    GuidanceMethod(
        "backward", False, "backward", 2, "descent on x̂0, mapped to ε (Bansal et al. 2023)"
    ),
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


def repeat_schedule(repeats, guided: Sequence[bool]) -> list[int]:
    """How many times each step is taken: an int r on the guided steps (1 elsewhere), a list of
    one count per step, or a function k ↦ count. Counts are integers ≥ 1.

    (docs/maths.md §8.5)
    """
    steps = len(guided)
    if callable(repeats):
        counts = [repeats(k) for k in range(steps)]
    elif isinstance(repeats, Sequence) and not isinstance(repeats, str):
        counts = list(repeats)
        if len(counts) != steps:
            raise ValueError(f"repeats must have one entry per step ({steps}), got {len(counts)}")
    else:
        r = check_count(repeats, "repeats")
        return [r if g else 1 for g in guided]
    return [check_count(c, f"repeats[{k}]") for k, c in enumerate(counts)]


def estimate_times(times: Sequence[float], k: int, n: int, *, grid: str, schedule) -> torch.Tensor:
    """The grid of the n-step estimate at step k of a base sampler with times ``times``.

    "to-zero": ``time_grid(schedule, t_k, 0, n)``. "sampler": n + 1 points evenly in index
    (rounded down) from the evaluation times t_k … t_{K−1}, K = len(times) − 1; all of them
    when fewer remain; [t_k, 0] when n = 1 or only t_k remains. float64, (m + 1,).

    (docs/maths.md §8.2)
    """
    t = float(times[k])
    if grid == "to-zero":
        return time_grid(schedule, t, 0.0, n)
    remaining = torch.as_tensor(times[k:-1], dtype=torch.float64)  # t_k … t_{K−1}
    if n == 1 or remaining.numel() == 1:
        return time_grid(schedule, t, 0.0, 1)
    points = min(n + 1, remaining.numel())
    index = torch.linspace(0, remaining.numel() - 1, points, dtype=torch.long)  # rounded down
    return remaining[index]


def _per_sample_loss(loss_fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """loss_fn(x), checked to be (B,) values."""
    value = loss_fn(x)
    if not isinstance(value, torch.Tensor) or value.shape != (x.shape[0],):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss_fn must return ({x.shape[0]},) values, one per image, got {shape}")
    return value


def guidance_gradient(
    model, loss_fn: Callable, x_t: torch.Tensor, t: float, *, n: int = 1, cond=None, ts=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of the n-step estimate at x_t and its gradient, ``(L (B,), g (B, ...))``.

    x̂0 = Φ(x_t): DDIM steps of ``model`` on ``ts`` (default ``time_grid(schedule, t, 0, n)``;
    n = 1: the one-step estimate (x_t − σ_t ε)/α_t); g = ∂ Σ_b L(x̂0)_b / ∂x_t by the
    symplectic adjoint (Matsubara et al. 2021; exact for Φ with one step's graph in memory at
    a time).

    (docs/maths.md §8.2)
    """
    values = []

    def recorded(x0):
        value = _per_sample_loss(loss_fn, x0)
        values.append(value.detach())
        return value

    ts = time_grid(model.schedule, float(t), 0.0, n) if ts is None else ts
    _, g = loss_grad(model, recorded, x_t, ts, method=GRADIENT_METHOD, solver="ddim", cond=cond)
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
            (grad,) = torch.autograd.grad(_per_sample_loss(loss_fn, x0 + leaf).sum(), leaf)
        size = _batch_rms(grad, per_batch)
        step = torch.where(size > 0, scale / size.clamp(min=1e-30), 0.0)
        delta = delta - per_sample(step, grad) * grad
    return delta


def renoise(schedule, x_s: torch.Tensor, s: float, t: float, *, generator=None) -> torch.Tensor:
    """Time travel from s back to t > s: (α_t/α_s) x_s + sqrt(1 − α_t²/α_s²) ξ, ξ ~ N(0, I).

    (docs/maths.md §8.5)
    """
    ratio = schedule.alpha(float(t)) / schedule.alpha(float(s))
    device = generator.device if generator is not None else x_s.device
    noise = torch.randn(x_s.shape, generator=generator, dtype=x_s.dtype, device=device)
    return ratio * x_s + math.sqrt(max(0.0, 1.0 - ratio**2)) * noise.to(x_s.device)


REUSE_EPS = True
"""Whether a guided step's gradient reuses the base step's ε(x_t): the estimate's first network
call is at the same point (docs/maths.md §8.8), so it is served from the base step, one network
call fewer per guided step. ``False`` recomputes it, for comparison."""


class _Recorder:
    """A model that keeps the output of its last call as ``last`` (ε, or both CFG branches)."""

    def __init__(self, model):
        self.model, self.schedule, self.last = model, model.schedule, None

    def eps(self, x, t, cond=None):
        self.last = self.model.eps(x, t, cond)
        return self.last


class _Primed:
    """A model whose first call, when made without autograd, returns a given ε instead of
    evaluating the network; every other call goes to the network.

    The estimate's first network call is ε(x_t, t) (every solver's first stage is at the
    step's start), which the base step has just computed. Engines that make their first call
    under autograd (they need its graph) get the network, and the served ε is dropped.
    """

    def __init__(self, model, eps: torch.Tensor | None):
        self.model, self.schedule, self.first = model, model.schedule, eps

    def eps(self, x, t, cond=None):
        first, self.first = self.first, None
        if first is not None and not torch.is_grad_enabled():
            return first
        return self.model.eps(x, t, cond)


def _null_cond(model) -> torch.Tensor:
    null = getattr(model, "null_cond", None)
    if null is None:
        raise ValueError(
            "cond needs a model with a null_cond (the unconditional embedding) for classifier-free guidance"
        )
    return null


def _default_scale(step_rule: str | None, cfg_scale: float | None) -> float:
    """c = 0.2 w under CFG (FreeDoM's and SAG's code), c = 2 for the fallback Δ, ζ = 3 for DPS,
    c = 1 for backward guidance's descent steps.

    c = 2, ζ = 3 and the backward c were chosen on the digits tasks of
    :mod:`sagkit.lab.evaluation` (ζ on the inpainting task, where DPS's rule is exact; Chung
    et al. use ζ ≤ 1 on 256² images).

    (docs/maths.md §8.3)
    """
    if step_rule == "dps":
        return 3.0
    if step_rule == "backward":
        return 1.0
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
    steps=None,
    guidance=None,
    n=None,
    scale=None,
    window=None,
    repeats=None,
    sampler=None,
    estimate_grid=None,
    step_size=None,
    backward_steps=None,
    cfg_scale=None,
    preset: str | None = None,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    return_trajectory: bool = False,
    return_losses: bool = False,
):
    """Sample with training-free guidance by ``loss_fn`` (see the module docstring).

    Every argument from ``steps`` to ``cfg_scale`` may be ``None``: its preset value, else
    its default.

    Args:
        model: a model of the protocol (e.g. ``sk.load_pretrained("digits")``). Without
            ``cond``, a model with a ``null_cond`` is run on it (unconditional sampling).
        loss_fn: images (B, ...) → (B,) non-negative values (see :mod:`sagkit.guidance.losses`);
            may be ``None`` for ``guidance="none"``.
        x_T: (B, ...) the initial noise N(0, I), at the base sampler's first time (scaled as
            diffusers' pipelines scale it: ``init_noise_sigma``).
        steps: base sampler steps (default 50).
        guidance: "none", "freedom", "dps", "sag" (default) or "backward" (:data:`GUIDANCE`).
        n: SAG's estimate steps (default 3; n = 1: FreeDoM); ignored by the other methods.
        scale: c of the RMS rule (default 0.2·cfg_scale with ``cond``, else 2), DPS's ζ
            (default 3) or backward guidance's step (default 1).
        window: (lo, hi), the guided fraction of the steps (default (0.3, 0.7)).
        repeats: time travel: an int (default: the method's, 2 for FreeDoM, SAG and backward,
            1 for DPS) taken on the guided steps, a list of one count per step, or a
            function k ↦ count.
        sampler: "ddim" (default, sagkit's DDIM) or a diffusers scheduler of the model's
            training schedule, driven through its ``set_timesteps``/``step``.
        estimate_grid: "to-zero" (default) or "sampler" (SAG's code); see the module docstring.
        step_size: "per-sample" (default) or "per-batch".
        backward_steps: descent steps m of backward guidance (default 5).
        cfg_scale: w of classifier-free guidance, only with ``cond``; default 1 (the
            conditional model).
        preset: "sag-paper", "freedom-paper" or "dps-paper": the official code's choice for
            every argument above (:data:`sagkit.guidance.presets.PRESETS`); an argument given
            (not ``None``) overrides its preset value.
        cond: (B, E) or (1, E) conditioning: the sampler is then classifier-free guidance with
            scale ``cfg_scale`` around ``model.null_cond``, and Δ = ε_c − ε_u.
        generator: a ``torch.Generator`` for the time-travel noise and stochastic schedulers.
        progress: show a progress bar.
        return_trajectory: also return the states at the sampler's times, (steps + 1, B, ...).
        return_losses: also return L of the one-step estimate x̂0(x_{t_k}) at every step k
            (the state entering it), and L(x_0) last: (steps + 1, B).
    Returns:
        The samples (B, ...); with a ``return_*`` flag, a tuple ``(samples, trajectory,
        losses)`` holding only the requested extras, in that order.

    (docs/maths.md §8.1)
    """
    given = {
        "steps": steps,
        "guidance": guidance,
        "n": n,
        "scale": scale,
        "window": window,
        "repeats": repeats,
        "sampler": sampler,
        "estimate_grid": estimate_grid,
        "step_size": step_size,
        "backward_steps": backward_steps,
        "cfg_scale": cfg_scale,
    }
    options = {**DEFAULTS}
    if preset is not None:
        from .presets import PRESETS  # the presets build on this module

        options.update(PRESETS[preset].options(model, cond=cond, steps=steps))
    options.update({k: v for k, v in given.items() if v is not None})
    return _guided_sample(
        model,
        loss_fn,
        x_T,
        cond=cond,
        generator=generator,
        progress=progress,
        return_trajectory=return_trajectory,
        return_losses=return_losses,
        **options,
    )


DEFAULTS = {
    "steps": 50,
    "guidance": "sag",
    "n": 3,
    "scale": None,
    "window": DEFAULT_WINDOW,
    "repeats": None,
    "sampler": "ddim",
    "estimate_grid": "to-zero",
    "step_size": "per-sample",
    "backward_steps": 5,
    "cfg_scale": None,
}
"""sagkit's defaults of :func:`guided_sample` (docs/maths.md §8.10 compares them with the
papers')."""


def _guided_sample(
    model,
    loss_fn,
    x_T,
    *,
    steps,
    guidance,
    n,
    scale,
    window,
    repeats,
    sampler,
    estimate_grid,
    step_size,
    backward_steps,
    cfg_scale,
    cond,
    generator,
    progress,
    return_trajectory,
    return_losses,
):
    check_inputs(model, x_T, cond=cond, x_name="x_T")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    method = GUIDANCE[guidance]
    check_count(steps, "steps")
    check_count(n, "n")
    check_count(backward_steps, "backward_steps")
    check_name(estimate_grid, "estimate_grid", ESTIMATE_GRIDS)
    per_batch = check_name(step_size, "step_size", STEP_SIZES) == "per-batch"
    n = n if method.n_step else 1  # the one-step methods ignore n
    guided = guidance_window(steps, window)
    if method.step_rule is None:
        guided = [False] * steps
    elif not any(guided):
        raise ValueError(
            f"the guidance window {tuple(window)} holds no step of steps={steps} (step k is "
            f"guided when lo <= k/steps < hi): guidance={guidance!r} would return the unguided "
            "sample; widen the window or take more steps"
        )
    counts = repeat_schedule(method.repeats if repeats is None else repeats, guided)
    cfg = cond is not None
    if cfg_scale is not None and not cfg:
        raise ValueError("cfg_scale needs cond (classifier-free guidance needs a condition)")
    cfg_scale = 1.0 if cfg_scale is None else check_scale(cfg_scale, "cfg_scale")
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
    base = make_base(sampler, model, steps, device=x_T.device)

    # The network: under CFG, ε_u + w(ε_c − ε_u) around the recorded two-branch call (for Δ).
    inner = _Recorder(model)
    net = ClassifierFreeGuidance(inner, _null_cond(model), cfg_scale) if cfg else inner
    gradient_model = ClassifierFreeGuidance(model, _null_cond(model), cfg_scale) if cfg else model
    schedule, times = model.schedule, base.times
    x = base.start(x_T)
    trajectory, losses = [x], []
    with deferred_checks():  # no host–device sync inside the loop
        bar = tqdm(range(steps), desc=f"guidance {guidance}", disable=not progress, leave=False)
        for k in bar:
            t, s = times[k], times[k + 1]
            state = base.save() if counts[k] > 1 else None
            x_t = x
            for r in range(counts[k]):
                if r:
                    base.load(state)
                    x_t = renoise(schedule, x, s, t, generator=generator)
                with torch.no_grad():
                    eps = base.eps(net, x_t, k, cond)
                    x0 = tweedie_x0(schedule, x_t, t, eps)
                if return_losses and r == 0:
                    with torch.no_grad():
                        losses.append(_per_sample_loss(loss_fn, x0))
                update_eps = eps
                if guided[k] and method.step_rule == "backward":
                    shift = backward_shift(
                        loss_fn, x0, steps=backward_steps, scale=scale, per_batch=per_batch
                    )
                    update_eps = eps - (schedule.alpha(t) / schedule.sigma(t)) * shift
                with torch.no_grad():
                    x = base.update(x_t, k, update_eps, generator=generator)
                if guided[k] and method.step_rule in ("rms", "dps"):
                    grid = estimate_times(times, k, n, grid=estimate_grid, schedule=schedule)
                    primed = _Primed(gradient_model, eps if REUSE_EPS else None)
                    loss, g = guidance_gradient(primed, loss_fn, x_t, t, cond=cond, ts=grid)
                    if method.step_rule == "rms":
                        delta = _cfg_difference(inner.last) if cfg else x - x_t
                        rho = rms_step_size(delta, g, scale=scale, per_batch=per_batch)
                    else:
                        rho = dps_step_size(loss, scale=scale, per_batch=per_batch)
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


def _cfg_difference(branches: torch.Tensor) -> torch.Tensor:
    """Δ = ε_c − ε_u from the two-branch output (B·2, ...) of a CFG call."""
    e_cond, e_uncond = branches.chunk(2)
    return e_cond - e_uncond
