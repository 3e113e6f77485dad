"""The class task's target: pure noise scores at most chance on it (sagkit.lab.evaluation)."""

import pytest
import torch

import sagkit as sk
from sagkit.digits.evaluation import NOISE_FAMILIES, noise_images
from sagkit.lab.evaluation import CLASS_TARGET, default_tasks, noise_label_shares


@pytest.fixture(scope="module")
def shipped():
    return sk.digits.load_classifier("digits", device="cpu")


@pytest.fixture(scope="module")
def shares(shipped):
    return noise_label_shares(shipped, num=512, seed=0)


def test_pure_noise_scores_at_most_chance_on_the_class_target(shipped, shares):
    # chance: a guess gives each of the classes 1/classes of the images; no slack is added,
    # the share measured on 512 images must itself be at most that
    chance = 1 / shipped.config["classes"]
    assert set(shares) == set(NOISE_FAMILIES)
    for family, share in shares.items():
        assert float(share[CLASS_TARGET]) <= chance, (family, share.tolist())


def test_the_target_is_the_digit_noise_is_called_least(shares):
    worst = torch.stack(list(shares.values())).max(0).values  # (classes,) over the families
    assert int(worst.argmin()) == CLASS_TARGET


def test_the_earlier_target_3_fails_the_check(shipped, shares):
    """Why the target changed: the classifier calls most Gaussian and salt-and-pepper noise 3."""
    chance = 1 / shipped.config["classes"]
    for family in ("gaussian", "salt-and-pepper"):
        assert float(shares[family][3]) > chance, family


def test_shares_are_distributions(shares):
    for share in shares.values():
        assert share.dtype == torch.float64 and bool((share >= 0).all())
        assert float(share.sum()) == 1.0  # multiples of 1/512 summing to 1: exact in float64


def test_default_tasks_target_the_class_target(shipped):
    task = next(t for t in default_tasks(shipped) if t.name == "class")
    assert task.label == CLASS_TARGET
    x = noise_images("blobs", 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(
            shipped.logits(x), torch.full((4,), CLASS_TARGET), reduction="none"
        )
        assert torch.equal(task.loss(x), expected)


@pytest.mark.parametrize("family", NOISE_FAMILIES)
def test_noise_images_are_images_in_range_and_seeded(family):
    a = noise_images(family, 5, size=8, generator=torch.Generator().manual_seed(3))
    b = noise_images(family, 5, size=8, generator=torch.Generator().manual_seed(3))
    assert a.shape == (5, 1, 8, 8) and a.dtype == torch.float32
    assert bool((a >= -1).all() and (a <= 1).all()) and torch.equal(a, b)
    assert len(a.unique()) > 1  # noise, not a constant image
    if family == "salt-and-pepper":
        assert set(a.unique().tolist()) == {-1.0, 1.0}


def test_noise_arguments_are_checked(shipped):
    with pytest.raises(ValueError, match="family must be one of"):
        noise_images("uniform", 2)
    with pytest.raises(ValueError, match="num"):
        noise_images("gaussian", 0)
    with pytest.raises(ValueError, match="families entries"):
        noise_label_shares(shipped, families=("gaussian", "pink"))
