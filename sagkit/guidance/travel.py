"""When guidance acts: the guidance window, time travel's repeat counts and its re-noising.

- Guidance window: step k of ``steps`` (k = 0 at t = 1) is guided when lo ≤ k/steps < hi;
  (0.3, 0.7) of 100 steps is SAG's steps 30–69 (docs/maths.md §8.6).
- Time travel (FreeDoM's resampling, SAG's repeats, universal guidance's self-recurrence): a
  step is taken ``repeats`` times; between two, x_s is re-noised back to t,
  x_t = (α_t/α_s) x_s + sqrt(σ_t² − (α_t σ_s/α_s)²) ξ, and the base sampler is put back as it was
  before the step (docs/maths.md §8.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.checks import check_count

__all__ = ["check_window", "guidance_window", "repeat_schedule", "renoise"]


def check_window(window) -> tuple[float, float]:
    """``window`` as a checked pair of floats (lo, hi) with 0 ≤ lo < hi ≤ 1."""
    try:
        lo, hi = (float(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be a pair (lo, hi) of fractions, got {window!r}") from None
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"window must satisfy 0 <= lo < hi <= 1, got {window!r}")
    return lo, hi


def guidance_window(steps: int, window) -> list[bool]:
    """Which of ``steps`` steps are guided: step k when lo ≤ k/steps < hi, window = (lo, hi).

    (docs/maths.md §8.6)
    """
    lo, hi = check_window(window)
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


def renoise(schedule, x_s: torch.Tensor, s: float, t: float, *, generator=None) -> torch.Tensor:
    """Time travel from s back to t > s: (α_t/α_s) x_s + sqrt(σ_t² − (α_t/α_s)² σ_s²) ξ,
    ξ ~ N(0, I), the forward transition p(x_t | x_s) of any schedule (sqrt(1 − α_t²/α_s²) ξ
    for a VP one).

    (docs/maths.md §8.5)
    """
    ratio = schedule.alpha(float(t)) / schedule.alpha(float(s))
    variance = schedule.sigma(float(t)) ** 2 - (ratio * schedule.sigma(float(s))) ** 2
    device = generator.device if generator is not None else x_s.device
    noise = torch.randn(x_s.shape, generator=generator, dtype=x_s.dtype, device=device)
    return ratio * x_s + math.sqrt(max(0.0, variance)) * noise.to(x_s.device)
