"""The realism check behind notebook 05's morph score."""

import pytest
import torch

from sagkit.digits.data import digits_dataset
from sagkit.digits.evaluation import nearest_distance, realism_check


@pytest.fixture(scope="module")
def check():
    return realism_check()


def test_nearest_distance_is_the_rms_distance_to_the_closest_reference():
    ref = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    x = torch.full((1, 1, 2, 2), 0.75)
    assert float(nearest_distance(x, ref)[0]) == pytest.approx(0.25)  # nearer to the ones
    with pytest.raises(ValueError, match="same size"):
        nearest_distance(x, torch.zeros(2, 1, 3, 3))


def test_realism_check_passes_real_digits_and_rejects_noise(check):
    held_out, _ = digits_dataset("test")
    assert bool(check(held_out).all())  # every held-out digit, by construction of the threshold
    train, _ = digits_dataset("train")
    assert bool(check(train[:32]).all())  # a training digit is at distance 0
    gen = torch.Generator().manual_seed(0)
    for noise in (
        torch.randn(64, 1, 16, 16, generator=gen),  # Gaussian, clamped by the check
        torch.rand(64, 1, 16, 16, generator=gen) * 2 - 1,  # uniform in [-1, 1]
    ):
        assert not bool(check(noise).any())


def test_realism_check_refuses_a_non_positive_factor():
    with pytest.raises(ValueError, match="factor"):
        realism_check(factor=0)
