"""Every choice of guided sampling in one object, resolved and validated once.

    config = sk.GuidanceConfig(guidance="sag", n=4, window=(0.2, 0.8))
    x = sk.guided_sample(model, loss, x_T, config=config)
    x = sk.guided_sample(model, loss, x_T, preset="sag-paper", n=4)   # the same, built for you

:class:`GuidanceConfig` is frozen; its fields are the options of :func:`sagkit.guided_sample`,
:class:`sagkit.sd.GuidedStableDiffusion`, the evaluation sweeps and ``sagkit sample``, which
pass it on instead of listing the options again. :meth:`GuidanceConfig.resolve` builds one
in this order: the defaults (:data:`DEFAULTS`, or a caller's, such as Stable Diffusion's
w = 7.5), then a preset's values, then the arguments given (``None`` means "not given").
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..core.checks import check_count, check_name, check_scale
from ..core.models import ClassifierFreeGuidance, null_cond_of
from ..gradients.api import METHODS, GradientMethod, resolve_engine
from .base import Timesteps, make_base
from .methods import GUIDANCE, GuidanceMethod
from .presets import PRESETS
from .step import GuidanceRun
from .travel import guidance_window, repeat_schedule

__all__ = [
    "GuidanceConfig",
    "DEFAULTS",
    "OPTIONS",
    "ESTIMATE_GRIDS",
    "STEP_SIZES",
    "DIFFUSERS_NAMES",
]

ESTIMATE_GRIDS = ("to-zero", "sampler")
STEP_SIZES = ("per-sample", "per-batch")


def _option(default, help: str, **cli) -> Any:
    """A field with its help line and how a command line reads it (``cli``: argparse's
    ``type``, ``nargs``, ``choices``; ``cli=None`` for a field no command line sets)."""
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass(frozen=True)
class GuidanceConfig:
    """Every choice of guided sampling (see :mod:`sagkit.guidance.methods` for the methods).

    Attributes:
        guidance: the method: a name in :data:`sagkit.GUIDANCE` ("none", "freedom", "dps",
            "sag", "backward") or a :class:`~sagkit.guidance.methods.GuidanceMethod` object.
        steps: base sampler steps.
        n: estimate steps of the n-step methods (SAG; n = 1 is FreeDoM); ignored by the others.
        scale: the step rule's constant: c of the RMS rule (default 0.2·cfg_scale under CFG,
            else 2), DPS's ζ (default 3) or backward guidance's step (default 1).
        window: (lo, hi): step k is guided when lo ≤ k/steps < hi.
        repeats: time travel: an int taken on the guided steps (default: the method's, 2 for
            FreeDoM, SAG and backward, 1 for DPS), one count per step, or a function k ↦ count.
        sampler: "ddim" (sagkit's DDIM), a diffusers scheduler of the model's training
            schedule, or the name of a diffusers scheduler class (built from the model's
            scheduler config, as the presets build theirs).
        estimate_grid: "to-zero" or "sampler" (SAG's code).
        step_size: "per-sample" or "per-batch" (the official codes').
        backward_steps: descent steps m of backward guidance.
        cfg_scale: w of classifier-free guidance (only with a ``cond``; default 1, the
            conditional model).
        gradient: the engine of the guidance gradient: an exact engine of
            :data:`sagkit.METHODS` by name, or a :class:`~sagkit.GradientMethod` object such
            as ``make_budgeted(budget_bytes=2**28)``. The default, "budgeted", keeps step
            graphs while 1 GiB holds them (backprop's speed) and runs the symplectic adjoint
            beyond (flat memory); both are exact, so samples differ from "symplectic"'s by
            rounding only.
        reuse_eps: serve the estimate's first network call from the base step's ε (one call
            fewer per guided step where the engine's first call needs no graph, with
            bit-identical samples); ``False`` recomputes it, for comparison.
    """

    guidance: str | GuidanceMethod = _option("sag", "the guidance method", choices=list(GUIDANCE))
    steps: int = _option(50, "base sampler steps", type="count")
    n: int = _option(3, "estimate steps of SAG (n = 1: FreeDoM)", type="count")
    scale: float | None = _option(None, "the step rule's constant (c, ζ)", type=float)
    window: tuple[float, float] = _option((0.3, 0.7), "guided fraction LO HI", type=float, nargs=2)
    repeats: int | Sequence[int] | Callable | None = _option(
        None, "time travel: repeats of each guided step", type="count"
    )
    sampler: Any = _option("ddim", "ddim, or a diffusers scheduler class name", type=str)
    estimate_grid: str = _option("to-zero", "grid of the n-step estimate", choices=ESTIMATE_GRIDS)
    step_size: str = _option("per-sample", "one step size per sample or batch", choices=STEP_SIZES)
    backward_steps: int = _option(5, "descent steps of backward guidance", type="count")
    cfg_scale: float | None = _option(None, "w of classifier-free guidance", type=float)
    gradient: str | GradientMethod = _option("budgeted", "the gradient engine", type=str)
    reuse_eps: bool = _option(True, "reuse the base step's ε in the estimate", type=bool)

    def __post_init__(self):

        def set_(name, value):  # a frozen dataclass normalises its fields through this
            object.__setattr__(self, name, value)

        if isinstance(self.guidance, str):
            check_name(self.guidance, "guidance", GUIDANCE)
        elif not isinstance(self.guidance, GuidanceMethod):
            raise TypeError(
                f"guidance must be a name in {list(GUIDANCE)} or a GuidanceMethod, got "
                f"{type(self.guidance).__name__}"
            )
        for name in ("steps", "n", "backward_steps"):
            set_(name, check_count(getattr(self, name), name))
        for name in ("scale", "cfg_scale"):
            if getattr(self, name) is not None:
                set_(name, check_scale(getattr(self, name), name))
        if self.scale is not None and not self.method.reads_scale:
            raise ValueError(
                f"scale is not read by guidance={self.method!r}: its scales are fields of the "
                f"method object (e.g. {type(self.method).__name__}(...)); leave scale unset"
            )
        guided = guidance_window(self.steps, self.window)
        set_("window", tuple(float(w) for w in self.window))
        if self.method.guides and not any(guided):
            raise ValueError(
                f"the guidance window {self.window} holds no step of steps={self.steps} (step "
                f"k is guided when lo <= k/steps < hi): guidance={self.method.name!r} would "
                "return the unguided sample; widen the window or take more steps"
            )
        if isinstance(self.repeats, Sequence) and not isinstance(self.repeats, str):
            set_("repeats", tuple(self.repeats))
        if self.repeats is not None:
            repeat_schedule(self.repeats, guided)  # the counts are checked here, once
        _check_sampler(self.sampler)
        check_name(self.estimate_grid, "estimate_grid", ESTIMATE_GRIDS)
        check_name(self.step_size, "step_size", STEP_SIZES)
        if not isinstance(self.reuse_eps, bool):
            raise TypeError(f"reuse_eps must be True or False, got {self.reuse_eps!r}")
        engine = resolve_engine(self.gradient)
        if not _exact_for_the_estimate(engine):
            exact = [name for name, e in METHODS.items() if _exact_for_the_estimate(e)]
            raise ValueError(
                f"gradient must be an exact engine for the DDIM estimate ({', '.join(exact)} or "
                f"such a GradientMethod), got {engine.name!r}"
            )

    @property
    def method(self) -> GuidanceMethod:
        """The guidance method object."""
        return (
            self.guidance if isinstance(self.guidance, GuidanceMethod) else GUIDANCE[self.guidance]
        )

    @property
    def engine(self) -> GradientMethod:
        """The gradient engine object."""
        return resolve_engine(self.gradient)

    @property
    def per_batch(self) -> bool:
        """Whether the step size is one for the batch (``step_size="per-batch"``)."""
        return self.step_size == "per-batch"

    @property
    def estimate_steps(self) -> int:
        """The steps of the method's estimate: n for SAG, 1 for the one-step methods."""
        return self.method.estimate_steps(self.n)

    def guided_steps(self) -> list[bool]:
        """Which steps the method changes (all ``False`` for unguided sampling)."""
        if not self.method.guides:
            return [False] * self.steps
        return guidance_window(self.steps, self.window)

    def repeat_counts(self) -> list[int]:
        """How many times each step is taken (the method's repeats by default)."""
        repeats = self.method.repeats if self.repeats is None else self.repeats
        return repeat_schedule(repeats, self.guided_steps())

    def replace(self, **changes) -> GuidanceConfig:
        """A copy with the fields ``changes`` names set (``None`` values are ignored), checked;
        ``self`` when nothing changes (a checked configuration is not checked again)."""
        _check_names(changes)
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def coerce(
        cls,
        config: GuidanceConfig | None = None,
        *,
        preset: str | None = None,
        model=None,
        cond=None,
        defaults: Mapping[str, Any] | None = None,
        **options,
    ) -> GuidanceConfig:
        """The configuration of a call that takes ``config``, ``preset`` and ``options``: every
        entry point's one coercion. ``config`` with the ``options`` given over its fields, or
        :meth:`resolve` of the rest; a preset with a ``config`` is refused."""
        if config is None:
            return cls.resolve(preset=preset, model=model, cond=cond, defaults=defaults, **options)
        if preset is not None:
            raise ValueError(
                "give config or preset, not both (GuidanceConfig.resolve takes a preset)"
            )
        if not isinstance(config, GuidanceConfig):
            raise TypeError(f"config must be a GuidanceConfig, got {type(config).__name__}")
        return config.replace(**options)

    def bind(self, model, loss_fn: Callable | None, *, cond=None, cfg: bool = False, device=None):
        """The run of this configuration (:class:`~sagkit.guidance.step.GuidanceRun`): its base
        sampler built on ``device``, ``model`` wrapped in classifier-free guidance with
        w = ``cfg_scale`` (default 1) around ``model.null_cond`` when ``cfg``, and the method,
        engine, step constant (the method's default for w under CFG when ``scale`` is unset),
        guided steps and repeat counts resolved once. ``cond``: (B, ...), checked."""
        base = make_base(self.sampler, model, self.steps, device=device)
        cfg_scale = 1.0 if self.cfg_scale is None else self.cfg_scale
        if cfg:
            model = ClassifierFreeGuidance(model, null_cond_of(model).to(cond), cfg_scale)
        scale = self.scale
        if scale is None:
            scale = self.method.default_scale(cfg_scale if cfg else None)
        return GuidanceRun(
            model=model,
            cfg=cfg,
            base=base,
            loss_fn=loss_fn,
            cond=cond,
            config=self,
            method=self.method,
            engine=self.engine,
            scale=float(scale),
            guided=tuple(self.guided_steps()),
            counts=tuple(self.repeat_counts()),
        )

    @classmethod
    def resolve(
        cls,
        *,
        preset: str | None = None,
        model=None,
        cond=None,
        defaults: Mapping[str, Any] | None = None,
        **given,
    ) -> GuidanceConfig:
        """The configuration of one call: ``defaults`` (over :data:`DEFAULTS`), then the
        preset's values for ``model`` (and ``cond``: a preset's CFG scale applies under CFG
        only), then the ``given`` fields that are not ``None``.
        """
        _check_names(given)
        options = dict(defaults or {})
        if preset is not None:
            steps = given.get("steps")
            options.update(PRESETS[preset].options(model, cond=cond, steps=steps))
        options.update({k: v for k, v in given.items() if v is not None})
        return cls(**options)

    def describe(self) -> dict:
        """The fields as JSON values: objects by their class name (a scheduler with its own
        config), callables by their name; for shard files and sample sidecars."""
        return {f.name: _describe(getattr(self, f.name)) for f in fields(self)}


OPTIONS = tuple(f.name for f in fields(GuidanceConfig))
"""The field names of :class:`GuidanceConfig`: the options every guided-sampling layer takes."""

DEFAULTS = {f.name: f.default for f in fields(GuidanceConfig)}
"""sagkit's defaults of guided sampling (docs/maths.md §8.10 compares them with the papers')."""


DIFFUSERS_NAMES = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale"}
"""The names a diffusers user types for two fields, refused with the field's name (an alias
would give one setting two names in every sidecar and shard key)."""


def _check_names(given: Mapping) -> None:
    unknown = sorted(set(given) - set(OPTIONS))
    for name in unknown:
        if name in DIFFUSERS_NAMES:
            raise TypeError(
                f"{name} is diffusers' name: sagkit's option is {DIFFUSERS_NAMES[name]} "
                f"(pass {DIFFUSERS_NAMES[name]}={given[name]!r})"
            )
    if unknown:
        raise TypeError(
            f"unknown guidance option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"the options are {', '.join(OPTIONS)}"
        )


def _exact_for_the_estimate(engine: GradientMethod) -> bool:
    return engine.exact and "x" in engine.wrt and engine.supports("ddim")


def _check_sampler(sampler) -> None:
    """ "ddim", a diffusers scheduler class name, or a scheduler instance (not its class)."""
    if isinstance(sampler, str):
        if sampler == "ddim":
            return
        import diffusers

        if not (sampler.endswith("Scheduler") and hasattr(diffusers, sampler)):
            raise ValueError(
                f"sampler must be 'ddim', a diffusers scheduler or a diffusers scheduler class "
                f"name such as 'DPMSolverMultistepScheduler', got {sampler!r}"
            )
        return
    if isinstance(sampler, Timesteps):
        sampler = sampler.scheduler
    if isinstance(sampler, type):
        raise TypeError(
            f"sampler must be a scheduler instance, got the class {sampler.__name__}: build "
            f"one with {sampler.__name__}.from_config(model.scheduler.config), or pass its "
            "name as a string"
        )
    if not (hasattr(sampler, "set_timesteps") and hasattr(sampler, "step")):
        raise TypeError(
            f"sampler must be 'ddim' or a diffusers scheduler, got {type(sampler).__name__}"
        )


def _describe_map(options: Mapping) -> dict:
    return {k: _describe(v.tolist() if hasattr(v, "tolist") else v) for k, v in options.items()}


def _describe(value):
    if value is None or isinstance(value, bool | str | numbers.Real):
        return value
    if isinstance(value, Timesteps):
        return {
            "scheduler": _describe(value.scheduler),
            "set_timesteps": _describe_map(value.options),
        }
    if isinstance(value, tuple | list):
        return [_describe(v) for v in value]
    if isinstance(value, GradientMethod):
        return f"{value.name}: {value.description}"  # a budget is in the description
    if isinstance(value, GuidanceMethod):
        return repr(value)
    config = getattr(value, "config", None)  # a diffusers scheduler
    if config is not None:  # its "_" keys are diffusers' bookkeeping, one a set's order
        return {
            "class": type(value).__name__,
            "config": {k: _describe(v) for k, v in config.items() if not k.startswith("_")},
        }
    return getattr(value, "__qualname__", type(value).__name__)
