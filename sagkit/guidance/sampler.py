"""Training-free guided sampling on any base sampler: :func:`guided_sample`.

A base sampler (:mod:`sagkit.guidance.base`: sagkit's DDIM, or any diffusers scheduler) walks
the times t_0 > … > t_K. Inside the guidance window its step t → s becomes

    x_s = Base(x_t, ε(x_t)) − ρ_t g,      g = ∂L(x̂0(x_t))/∂x_t,      shapes (B, C, H, W),

with a loss L of the clean-image estimate x̂0 (per sample, (B,) values, summed for the
gradient). The method (:mod:`sagkit.guidance.methods`: FreeDoM, DPS, SAG, backward guidance)
chooses the estimate, the step size ρ_t, or how it changes ε instead; the choices of a run
are one :class:`~sagkit.guidance.config.GuidanceConfig`. Time travel and the guidance window
are in :mod:`sagkit.guidance.travel`.

:func:`guided_sample` checks its inputs once, coerces ``config``, ``preset`` and the options
into one :class:`~sagkit.guidance.config.GuidanceConfig`, binds it to the model, loss and
conditioning (:meth:`~sagkit.guidance.config.GuidanceConfig.bind`) and runs
:func:`run_guided`, the loop, which checks nothing. **One guided step, top to bottom, is
:mod:`sagkit.guidance.step`.** The loop does not synchronise host and device: its value
checks are deferred to one check at the end (:func:`sagkit.core.checks.deferred_checks`).
Each step checks, in this order, that the network's ε(x_t), the estimate, the loss, the
guidance gradient and the new state are finite (and DPS's loss non-negative); the first that
failed is raised, naming the step, its time and the quantity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..bridges import moved_names
from ..core.checks import check_cond, check_inputs, deferred_checks
from ..core.models import null_cond_of
from .config import GuidanceConfig
from .methods import per_sample_loss
from .step import GuidanceRun, take_step

__all__ = ["guided_sample", "run_guided"]


def guided_sample(
    model,
    loss_fn: Callable | None,
    x_T: torch.Tensor,
    *,
    config: GuidanceConfig | None = None,
    preset: str | None = None,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    return_trajectory: bool = False,
    return_losses: bool = False,
    **options,
):
    """Sample with training-free guidance by ``loss_fn`` (see :mod:`sagkit.guidance.methods`).

    The choices of the run are a :class:`~sagkit.guidance.config.GuidanceConfig`: ``config``,
    or one resolved from sagkit's defaults, the ``preset`` and the ``options`` given.

    Args:
        model: a model of the protocol (e.g. ``sk.digits.load_pretrained("digits")``). Without
            ``cond``, a model with a ``null_cond`` is run on it (unconditional sampling).
        loss_fn: images (B, ...) → (B,) non-negative values (see :mod:`sagkit.guidance.losses`);
            may be ``None`` for ``guidance="none"``.
        x_T: (B, ...) the initial noise N(0, I), at the base sampler's first time (scaled as
            diffusers' pipelines scale it: ``init_noise_sigma``).
        config: every choice of the run; the ``options`` given override its fields.
        preset: "sag-paper", "freedom-paper" or "dps-paper": the official code's choice for
            every option (:data:`sagkit.guidance.presets.PRESETS`); an option given (not
            ``None``) overrides its preset value. Not with ``config``.
        cond: (B, E) or (1, E) conditioning: the sampler is then classifier-free guidance with
            scale ``cfg_scale`` around ``model.null_cond``, and Δ = ε_c − ε_u.
        generator: a ``torch.Generator`` for the time-travel noise and stochastic schedulers.
        progress: show a progress bar.
        return_trajectory: also return the states at the sampler's times, (steps + 1, B, ...).
        return_losses: also return L of the one-step estimate x̂0(x_{t_k}) at every step k
            (the state entering it), and L(x_0) last: (steps + 1, B).
        **options: fields of :class:`~sagkit.guidance.config.GuidanceConfig` (``guidance``,
            ``steps``, ``n``, ``scale``, ``window``, ``repeats``, ``sampler``,
            ``estimate_grid``, ``step_size``, ``backward_steps``, ``cfg_scale``,
            ``gradient``, ``reuse_eps``).
    Returns:
        The samples (B, ...); with a ``return_*`` flag, a tuple ``(samples, trajectory,
        losses)`` holding only the requested extras, in that order.

    (docs/maths.md §8.1)
    """
    check_inputs(model, x_T, cond=cond, x_name="x_T")
    config = GuidanceConfig.coerce(config, preset=preset, model=model, cond=cond, **options)
    cond, cfg = _checked_call(model, loss_fn, x_T, config, cond=cond, return_losses=return_losses)
    run = config.bind(model, loss_fn, cond=cond, cfg=cfg, device=x_T.device)
    return run_guided(
        run,
        x_T,
        generator=generator,
        progress=progress,
        return_trajectory=return_trajectory,
        return_losses=return_losses,
    )


def _checked_call(model, loss_fn, x_T, config, *, cond, return_losses):
    """The checks of a call that need its configuration; returns the (B, ...) conditioning of
    every network call (``cond``, or the model's ``null_cond``, or ``None``) and whether the
    sampler is classifier-free guidance."""
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    if loss_fn is None and (any(config.guided_steps()) or return_losses):
        raise ValueError(
            f"loss_fn is needed for guidance={config.method.name!r} and for return_losses"
        )
    if config.cfg_scale is not None and cond is None:
        raise ValueError("cfg_scale needs cond (classifier-free guidance needs a condition)")
    null, cfg = null_cond_of(model), cond is not None
    if cfg:
        if null is None:
            raise ValueError(
                "cond needs a model with a null_cond (the unconditional embedding) for "
                "classifier-free guidance"
            )
        cond = _batch_cond(cond, x_T, "cond")
    elif null is not None:  # in x's dtype: a half-precision model keeps a half null_cond
        cond = _batch_cond(null.to(x_T), x_T, "model.null_cond")
    if loss_fn is not None:
        with torch.no_grad():
            per_sample_loss(loss_fn, x_T)  # fail early on a wrong shape or reference
    return cond, cfg


def _batch_cond(cond, x: torch.Tensor, name: str) -> torch.Tensor:
    """cond with batch size 1 or B, expanded to B, in x's dtype and device."""
    cond = check_cond(torch.as_tensor(cond), name, batch=x.shape[0]).to(x)
    return cond.expand(x.shape[0], *cond.shape[1:])


def run_guided(
    run: GuidanceRun,
    x_T: torch.Tensor,
    *,
    generator=None,
    progress: bool = True,
    return_trajectory: bool = False,
    return_losses: bool = False,
):
    """The guided loop of :func:`guided_sample` on a bound run
    (:meth:`~sagkit.guidance.config.GuidanceConfig.bind`), without its checks: each step is
    :func:`~sagkit.guidance.step.take_step`. No host–device synchronisation inside the loop:
    the values are checked once at the end (:func:`~sagkit.core.checks.deferred_checks`).

    (docs/maths.md §8.1)
    """
    x = run.base.start(x_T)
    trajectory, losses = [x], [] if return_losses else None
    with deferred_checks():
        steps = len(run.counts)
        bar = tqdm(
            range(steps), desc=f"guidance {run.method.name}", disable=not progress, leave=False
        )
        for k in bar:
            x = take_step(run, k, x, generator=generator, losses=losses)
            if return_trajectory:
                trajectory.append(x)
        extras = []
        if return_trajectory:
            extras.append(torch.stack(trajectory))
        if return_losses:
            with torch.no_grad():
                losses.append(per_sample_loss(run.loss_fn, x))
            extras.append(torch.stack(losses))
    return (x, *extras) if extras else x


__getattr__ = moved_names(__name__)  # names that lived here in 0.2 (sagkit.bridges)
