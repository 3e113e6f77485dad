"""The realism check behind notebook 05's morph score: real digits pass, every noise family fails."""

import math

import pytest
import torch
import torch.nn.functional as F

from sagkit.digits.data import digits_dataset
from sagkit.digits.evaluation import (
    NOISE_FAMILIES,
    RealismCheck,
    nearest_distance,
    noise_images,
    realism_check,
    roughness,
)

SIZE, N = 16, 64


def uniform(gen, *shape):
    return torch.rand(*shape, generator=gen)


def round_blobs(gen, n):
    """Round Gaussian blobs of width 1.5 to 4.5 pixels, centred in the middle half, on black."""
    yy, xx = torch.meshgrid(torch.arange(SIZE * 1.0), torch.arange(SIZE * 1.0), indexing="ij")
    cy, cx = (SIZE / 4 + SIZE / 2 * uniform(gen, n, 1, 1, 1) for _ in range(2))
    width = 1.5 + 3 * uniform(gen, n, 1, 1, 1)
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    return 2 * blob / blob.amax((2, 3), keepdim=True) - 1


def blurred(x, std):
    """x blurred by a Gaussian of ``std`` pixels, the black frame continued outside."""
    k = torch.arange(-6.0, 7.0)
    k = torch.exp(-(k**2) / (2 * std**2))
    k = k / k.sum()
    x = F.pad(x, (6, 6, 6, 6), value=-1.0)
    return F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))


def ranged_families(held_out):
    """Non-digits over a range of each family's parameter (the project's noise_images fixes it),
    and real digits spoiled: with salt and pepper, or blurred into blobs."""
    gen = torch.Generator().manual_seed(0)
    some = held_out[torch.randint(len(held_out), (N,), generator=gen)]
    amplitude = 1.5 * uniform(gen, N, 1, 1, 1)  # from black to bright noise
    fraction = 0.05 + 0.45 * uniform(gen, N, 1, 1, 1)
    salt = uniform(gen, N, 1, SIZE, SIZE) < 0.5
    families = {
        "uniform noise": uniform(gen, N, 1, SIZE, SIZE) * 2 - 1,
        "noise on a dark background, amplitude 0 to 1.5": -1
        + amplitude * torch.randn(N, 1, SIZE, SIZE, generator=gen).abs(),
        "salt and pepper on black, 5 to 50 %": torch.where(
            uniform(gen, N, 1, SIZE, SIZE) < fraction, 1.0, -1.0
        ),
        "salt and pepper on digits, 10 %": torch.where(
            uniform(gen, N, 1, SIZE, SIZE) < 0.1, torch.where(salt, 1.0, -1.0), some
        ),
        "round blurred blobs": round_blobs(gen, N),
        "digits blurred by 1.5 px": blurred(some, 1.5),
        "digits blurred by 2 px": blurred(some, 2.0),
        "a black frame": -torch.ones(1, 1, SIZE, SIZE),
    }
    return {name: x.clamp(-1, 1) for name, x in families.items()}


RANGED = list(ranged_families(torch.zeros(1, 1, SIZE, SIZE)))


@pytest.fixture(scope="module")
def check():
    return realism_check()


@pytest.fixture(scope="module")
def held_out():
    return digits_dataset("test")[0]


@pytest.fixture(scope="module")
def families(held_out):
    return ranged_families(held_out)


def test_nearest_distance_is_the_rms_distance_to_the_closest_reference():
    ref = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    x = torch.full((1, 1, 2, 2), 0.75)
    assert float(nearest_distance(x, ref)[0]) == pytest.approx(0.25)  # nearer to the ones
    with pytest.raises(ValueError, match="same size"):
        nearest_distance(x, torch.zeros(2, 1, 3, 3))


def test_roughness_is_zero_on_a_ramp_and_eight_on_a_checkerboard():
    i = torch.arange(5.0)
    # dyadic values, so every sum below is exact in floating point
    ramp = (0.25 * i[:, None] - 0.5 * i[None, :] - 0.5)[None, None]  # affine: Laplacian 0
    board = ((i[:, None] + i[None, :]) % 2 * 2 - 1)[None, None]  # ±1: each interior term is ±8
    r = roughness(torch.cat([ramp, board]))
    assert r.dtype == torch.float64
    assert r.tolist() == [0.0, 8.0]
    with pytest.raises(ValueError, match="H, W >= 3"):
        roughness(torch.zeros(1, 1, 2, 5))


def test_the_bounds_are_the_held_out_digits_range(check, held_out):
    train, _ = digits_dataset("train")
    assert check.max_distance == float(nearest_distance(held_out, train).max())
    r = roughness(held_out)
    assert check.roughness_range == (float(r.min()), float(r.max()))
    assert bool(check(held_out).all())  # every held-out digit, by construction
    loose = realism_check(factor=2.0)
    assert loose.max_distance == 2 * check.max_distance
    assert loose.roughness_range == (check.roughness_range[0] / 2, 2 * check.roughness_range[1])


def test_real_digits_it_was_not_calibrated_on_pass_at_the_calibrated_rate(held_out):
    """Calibrated on half the held-out digits, the check rejects few of the other half.

    For exchangeable images each of the three bounds is exceeded by a new one with probability at
    most 1/(n + 1), n calibration images: at most 3/(n + 1) in all, so about 3 of the other 180
    on average. A count of 11 or more has probability below 1e-3 under Poisson(3): the check
    would be fitted to its calibration images, not to digits.
    """
    train, _ = digits_dataset("train")
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))
    first, second = held_out[order[: len(order) // 2]], held_out[order[len(order) // 2 :]]
    half = RealismCheck.calibrate(train, first)
    rejected = int((~half(second)).sum())
    assert rejected <= 10, rejected


@pytest.mark.parametrize("family", NOISE_FAMILIES)
def test_realism_check_rejects_the_project_noise_families(check, family):
    images = noise_images(family, 256, generator=torch.Generator().manual_seed(0))
    passed = int(check(images).sum())
    assert passed == 0, f"{passed} of {len(images)} {family} images pass"


@pytest.mark.parametrize("name", RANGED)
def test_realism_check_rejects_every_image_of_each_ranged_family(check, families, name):
    images = families[name]
    passed = int(check(images).sum())
    assert passed == 0, f"{passed} of {len(images)} {name} images pass"


def test_failures_name_the_bound_that_rejects(check, held_out, families):
    imgs = families
    rough = check.failures(imgs["salt and pepper on black, 5 to 50 %"])
    assert bool(rough["too rough"].all()) and not bool(rough["too smooth"].any())
    smooth = check.failures(imgs["digits blurred by 2 px"])
    assert bool(smooth["too smooth"].all()) and not bool(smooth["too rough"].any())
    assert bool(check.failures(imgs["a black frame"])["far from the digits"].all())
    assert not any(bool(f.any()) for f in check.failures(held_out).values())


def test_realism_check_refuses_a_non_positive_factor():
    for bad in (0, -1.0, math.nan, True, "2"):
        with pytest.raises(ValueError, match="factor"):
            realism_check(factor=bad)
