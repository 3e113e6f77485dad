"""The oracle: guidance by the exact guidance score of a mixture (docs/maths.md §14.4).

On a :class:`~sagkit.GaussianMixture` with a closed-form loss
(:mod:`sagkit.core.tilted`), the prediction that samples the tilted target p_0 e^{−L}/Z is
known at every step. :class:`Oracle` shifts the network's prediction by exactly that much,

    F ← F + (F̃ − F*)(x_t),      F̃, F* the tilted and the untilted mixture's predictions,

so that on the mixture itself the base sampler runs on the tilted mixture's exact prediction,
and a consistent sampler at enough steps samples p̃_0. It is the reference every heuristic is
measured against: it uses no gradient, no estimate of x_0 and no step size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.tilted import ExactGuidance
from .methods import GuidanceMethod
from .step import GuidanceRun, GuidedStep

__all__ = ["Oracle"]


@dataclass(frozen=True)
class Oracle(GuidanceMethod):
    """The exact guidance of a mixture: F + (F̃ − F*), in the schedule's frame.

    Fields: ``exact``, an :class:`~sagkit.core.tilted.ExactGuidance` (the mixture and the loss).
    It reads no ``scale`` and takes no time travel (one repeat): it needs neither.
    """

    exact: ExactGuidance

    name: ClassVar[str] = "oracle"
    rule: ClassVar[str] = "oracle"
    description: ClassVar[str] = "the exact guidance score of the mixture (ground truth)"
    reads_scale: ClassVar[bool] = False

    def __post_init__(self):
        if not isinstance(self.exact, ExactGuidance):
            raise TypeError(f"exact must be an ExactGuidance, got {type(self.exact).__name__}")

    def shift_pred(self, run: GuidanceRun, step: GuidedStep) -> torch.Tensor:
        """F + (F̃ − F*) at (x_t, t) in the run's frame (docs/maths.md §14.4)."""
        shift = self.exact.pred_shift(step.x_t, step.t, frame=run.frame)
        return step.pred + shift.to(step.pred)

    def __repr__(self) -> str:
        return f"Oracle({type(self.exact.loss).__name__})"
