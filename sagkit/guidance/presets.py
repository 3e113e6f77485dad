"""Presets: every choice an official code makes, as :func:`sagkit.guided_sample` arguments.

    x = sk.guided_sample(model, loss, x_T, preset="sag-paper", cond=cond)

A preset fixes the base sampler (a diffusers scheduler built from the model's own scheduler
config, as the official codes build theirs from the pipeline's), the steps, the guidance
window, the repeats, the estimate and its grid, the step rule and its constants, and whether
ρ is per batch. An argument passed to ``guided_sample`` overrides the preset's; with a
different ``steps`` the window and repeats keep their fractions of the run.

docs/maths.md §8.10 tabulates each choice against sagkit's defaults and says why they differ.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from ..core.checks import check_count
from ..core.registry import Registry

__all__ = ["Preset", "PRESETS"]


@dataclass(frozen=True)
class Preset:
    """One official code's choices.

    Attributes:
        name: its key in :data:`PRESETS`.
        guidance: the method (:data:`sagkit.GUIDANCE`).
        scheduler: the diffusers scheduler class name, and config overrides.
        steps: the official number of steps.
        window: the guided fraction (lo, hi).
        repeats: ((lo, hi, count), ...): steps with lo ≤ k/steps < hi are taken ``count``
            times, the others once.
        n: estimate steps (SAG).
        estimate_grid: "to-zero" or "sampler".
        cfg_scale: the official classifier-free guidance scale w (used with ``cond``).
        scale: the step-rule constant; ``None``: the rule's default (c = 0.2 w under CFG).
        sources: each choice and where it comes from.
    """

    name: str
    guidance: str
    scheduler: tuple[str, dict]
    steps: int
    window: tuple[float, float]
    repeats: tuple[tuple[float, float, int], ...]
    n: int = 1
    estimate_grid: str = "to-zero"
    cfg_scale: float | None = None
    scale: float | None = None
    sources: dict = field(default_factory=dict)

    def options(self, model, *, cond=None, steps: int | None = None) -> dict:
        """The :func:`sagkit.guided_sample` arguments of this preset for ``model``.

        ``model`` must carry its diffusers scheduler as ``model.scheduler`` (the shipped
        digits model does); ``steps`` overrides the official count.
        """
        config = getattr(getattr(model, "scheduler", None), "config", None)
        if config is None:
            raise ValueError(
                f"preset {self.name!r} builds its sampler from the model's diffusers scheduler: "
                "the model needs a .scheduler (e.g. sk.digits.load_pretrained('digits'))"
            )
        class_name, overrides = self.scheduler
        scheduler_class = getattr(importlib.import_module("diffusers"), class_name)
        steps = self.steps if steps is None else check_count(steps, "steps")

        def count(k: int) -> int:
            return next((c for lo, hi, c in self.repeats if lo <= k / steps < hi), 1)

        options = {
            "guidance": self.guidance,
            "sampler": scheduler_class.from_config(config, **overrides),
            "steps": steps,
            "window": self.window,
            "repeats": [count(k) for k in range(steps)],
            "n": self.n,
            "estimate_grid": self.estimate_grid,
            "step_size": "per-batch",
            "scale": self.scale,
        }
        if cond is not None and self.cfg_scale is not None:
            options["cfg_scale"] = self.cfg_scale
        return options


PRESETS: Registry[Preset] = Registry("preset")
"""The official codes' choices by name (the ``preset`` argument of :func:`sagkit.guided_sample`)."""

PRESETS.register(
    "sag-paper",
    Preset(
        "sag-paper",
        guidance="sag",
        scheduler=("DPMSolverMultistepScheduler", {}),
        steps=100,
        window=(0.3, 0.7),
        repeats=((0.3, 0.7, 2),),
        n=3,
        estimate_grid="sampler",
        cfg_scale=7.5,
        sources={
            "sampler": "DPM-Solver++(2M) from the pipeline's scheduler config (SAG's official "
            "code, img_guided_sampling/style_transfer.py)",
            "steps, window, repeats": "is_grad = steps 30–69 of 100, repeats 2 there",
            "n": "4 grid points (the paper's n = 4) = 3 DDIM steps of the estimate",
            "estimate grid": "num_pred_steps points of the remaining timesteps, evenly in index",
            "step size": "ρ = 0.2·w·RMS(ε_c − ε_u)/RMS(g), one .item() for the batch",
            "cfg_scale": "the pipeline's default guidance_scale 7.5",
        },
    ),
)
PRESETS.register(
    "freedom-paper",
    Preset(
        "freedom-paper",
        guidance="freedom",
        scheduler=("DDPMScheduler", {}),
        steps=100,
        window=(0.3, 0.7),
        repeats=((0.3, 0.6, 3),),
        cfg_scale=5.0,
        sources={
            "sampler": "the DDPM posterior step (η = 1) between 100 DDIM timesteps (FreeDoM's "
            "official code, SD_style/ldm/models/diffusion/ddim.py)",
            "steps, window": "guidance on steps 30–69 of 100 (index 69 … 30)",
            "repeats": "3 on steps 30–59, 1 on steps 60–69",
            "estimate": "Tweedie's one-step x̂0",
            "step size": "ρ = 0.2·w·RMS(ε_c − ε_u)/RMS(g), one .item() for the batch, w = 5",
        },
    ),
)
PRESETS.register(
    "dps-paper",
    Preset(
        "dps-paper",
        guidance="dps",
        scheduler=("DDPMScheduler", {"clip_sample": True}),
        steps=1000,
        window=(0.0, 1.0),
        repeats=(),
        scale=0.25,
        sources={
            "sampler": "ancestral DDPM, 1000 steps, x̂0 clipped to [−1, 1] (DPS's official code, "
            "configs/diffusion_config.yaml)",
            "window, repeats": "every step guided, no time travel",
            "step size": "x −= 0.5 ∇‖y − A(x̂0)‖ over the batch (configs/inpainting_config.yaml): "
            "ζ/sqrt(L) ∇L with L = ‖·‖² is 2ζ ∇‖·‖, so ζ = 0.25",
        },
    ),
)


def _describe(preset: Preset) -> str:
    """The preset's choices and their sources, as lines of a docstring."""
    lines = [f"``{preset.name}``:"]
    lines += [f"    - {choice}: {source}" for choice, source in preset.sources.items()]
    return "\n".join(lines)


# Each preset's choices with their sources, in this module's docstring (help(), the docs).
__doc__ += "\nThe presets:\n\n" + "\n\n".join(_describe(p) for p in PRESETS.values()) + "\n"
