"""The two-sample distances (POT's sliced W2, geomloss's energy distance) against what they equal
in closed form, and the noise floor (docs/maths.md §14.5)."""

import math

import pytest
import torch
from helpers import gamma, seeded

from sagkit.lab.distances import energy_distance, mean_and_error, noise_floor, sliced_w2

F64 = torch.float64


def test_sliced_w2_of_a_translation_is_its_length_over_root_d():
    """W₂ between a 1-D set and its translate by θ·c is |θ·c| exactly, so SW₂² = E_θ (θ·c)² =
    ‖c‖²/D. Over P random θ, (θ·c)²/‖c‖² has mean 1/D and relative standard deviation
    sqrt(2(D − 1)/(D + 2)): SW₂ is within 5 standard errors of that, halved by the root."""
    d, projections = 16, 4096
    a = torch.randn(300, d, dtype=F64, generator=seeded(0))
    c = torch.randn(d, dtype=F64, generator=seeded(1))
    exact = float(c.norm()) / math.sqrt(d)
    spread = math.sqrt(2 * (d - 1) / (d + 2)) / math.sqrt(projections)
    assert abs(sliced_w2(a, a + c, projections=projections) / exact - 1) <= 5 * spread / 2


def test_energy_distance_is_szekelys_v_statistic():
    a = torch.randn(40, 3, dtype=F64, generator=seeded(0))
    b = torch.randn(50, 3, dtype=F64, generator=seeded(1)) + 0.5

    def pairwise(p, q):  # by differences: torch.cdist takes the expansion below on 25+ rows
        return ((p[:, None] - q[None]) ** 2).sum(-1).sqrt()

    direct = 2 * pairwise(a, b).mean() - pairwise(a, a).mean() - pairwise(b, b).mean()
    # geomloss floors each squared distance at 1e-8, so the V-statistic's diagonal (x = x')
    # counts 1e-4 instead of 0, lowering it by 1e-4 (1/n + 1/m). It forms ‖x − y‖² as
    # ‖x‖² + ‖y‖² − 2⟨x, y⟩: γ_{2D+2}(‖x‖² + ‖y‖²) of error, /(2‖x − y‖) after the root.
    bias = -1e-4 * (1 / 40 + 1 / 50)

    def expansion_error(p, q):
        size = (p**2).sum(1)[:, None] + (q**2).sum(1)[None]
        return (gamma(8, F64) * size / (2 * pairwise(p, q).clamp(min=1e-4))).mean()

    rounding = 2 * expansion_error(a, b) + expansion_error(a, a) + expansion_error(b, b)
    assert abs(energy_distance(a, b) - float(direct) - bias) <= float(rounding)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sliced_w2(torch.zeros(5, 3), torch.zeros(5, 4)), "sample sets of one event shape"),
        (lambda: energy_distance(torch.zeros(1, 3), torch.zeros(5, 3)), "2 or more samples"),
        (lambda: noise_floor(lambda n, g: torch.zeros(n, 2), 4, distance="w1"), "distance must be"),
        (lambda: mean_and_error([1.0]), "2 or more values"),
    ],
)
def test_bad_inputs_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()
