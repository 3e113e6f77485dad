"""Two-sample distances between sample sets, and the noise floor they are read against.

A guided sampler is judged by how far its samples lie from exact samples of the tilted target
(:mod:`sagkit.core.tilted`). Two distances from maintained libraries, on flattened samples
(n, D) (docs/maths.md §14.5):

- :func:`sliced_w2`: the sliced 2-Wasserstein distance SW₂ = (E_θ W₂²(θᵀa, θᵀb))^{1/2} over
  random directions θ on the sphere (POT's ``ot.sliced_wasserstein_distance``);
- :func:`energy_distance`: Székely's energy distance 2E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ (as a
  V-statistic: twice geomloss's ``SamplesLoss("energy")``).

Both are positive between two finite sets of the *same* distribution: :func:`noise_floor` is
that value for two independent exact sets of the size compared, the smallest distance any
sampler can show at that size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["DISTANCES", "sliced_w2", "energy_distance", "noise_floor", "mean_and_error"]


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(
            f"a and b must be sample sets of one event shape with 2 or more samples each, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a, b


def sliced_w2(a: torch.Tensor, b: torch.Tensor, *, projections: int = 512, seed: int = 0) -> float:
    """The sliced 2-Wasserstein distance between sample sets a (n, ...) and b (m, ...), over
    ``projections`` random directions drawn with ``seed``.

    (docs/maths.md §14.5)
    """
    import ot

    a, b = _pair(a, b)
    return float(ot.sliced_wasserstein_distance(a, b, n_projections=projections, p=2, seed=seed))


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Székely's energy distance 2E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ between sample sets a and b
    (a V-statistic over all pairs). geomloss floors each squared distance at 1e-8, so the
    pairs x = x' count 1e-4 instead of 0, which lowers the distance by 1e-4 (1/n + 1/m): 4e-7
    at n = m = 512.

    (docs/maths.md §14.5)
    """
    from geomloss import SamplesLoss

    a, b = _pair(a, b)
    return 2 * float(SamplesLoss("energy")(a, b))


DISTANCES: dict[str, Callable[..., float]] = {
    "sliced_w2": sliced_w2,
    "energy": energy_distance,
}
"""The two-sample distances by name."""


def mean_and_error(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of independent values."""
    v = torch.as_tensor(list(values), dtype=torch.float64)
    if v.numel() < 2:
        raise ValueError(f"a standard error needs 2 or more values, got {v.numel()}")
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def noise_floor(
    sample: Callable[[int, torch.Generator], torch.Tensor],
    size: int,
    *,
    distance: str = "sliced_w2",
    repeats: int = 8,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, standard error) of the ``distance`` between two independent sets of ``size``
    exact samples, over ``repeats`` pairs. ``sample(n, generator)`` draws n exact samples.

    (docs/maths.md §14.5)
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {list(DISTANCES)}, got {distance!r}")
    generator = torch.Generator().manual_seed(seed)
    values = [
        DISTANCES[distance](sample(size, generator), sample(size, generator))
        for _ in range(repeats)
    ]
    return mean_and_error(values)
