"""The guidance losses of sagkit.losses: shapes, values at the reference, gradients, bad input."""

import pytest
import torch
from helpers import gamma

from sagkit.digits.classifier import DigitsClassifier
from sagkit.guidance import losses


@pytest.fixture(scope="module")
def classifier():
    """A tiny random digits classifier (float64, frozen): the interface of the shipped one."""
    torch.manual_seed(0)
    return DigitsClassifier(channels=(4, 8, 8), features=8).double().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images():
    return (
        torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        * 2
        - 1
    )


def _mask():
    mask = torch.zeros(16, 16, dtype=torch.float64)
    mask[:8] = 1
    return mask


def _all_losses(classifier, ref):
    return {
        "target_class": losses.target_class(classifier, 3),
        "style": losses.style(classifier, ref),
        "feature_match": losses.feature_match(classifier, ref),
        "masked_reconstruction": losses.masked_reconstruction(ref, _mask()),
    }


@pytest.mark.parametrize(
    "name", ["target_class", "style", "feature_match", "masked_reconstruction"]
)
def test_loss_shape_sign_and_gradient(classifier, images, name):
    loss = _all_losses(classifier, images[0])[name]
    x = images.clone().requires_grad_(True)
    value = loss(x)
    assert value.shape == (3,)
    assert bool(torch.isfinite(value).all()) and bool((value >= 0).all())
    (g,) = torch.autograd.grad(value.sum(), x)
    assert g.shape == x.shape and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0)


@pytest.mark.parametrize("name", ["style", "feature_match", "masked_reconstruction"])
def test_reference_losses_vanish_at_the_reference(classifier, images, name):
    loss = _all_losses(classifier, images[0])[name]
    value = loss(images)
    # float64: a sum of squares of differences that vanish in exact arithmetic, each at most
    # γ_N |·| ≈ 1e-13 for these 10³-operation chains: the sum is ≤ 1e-24, far below 1e-10...
    assert float(value[0]) == pytest.approx(0.0, abs=1e-10)
    assert bool((value[1:] > 1e-6).all())  # ...and other images far above both


def test_target_class_is_cross_entropy(classifier, images):
    logits = classifier.logits(images)
    expected = -torch.log_softmax(logits, -1)[:, 3]
    torch.testing.assert_close(losses.target_class(classifier, 3)(images), expected)
    per_sample = losses.target_class(classifier, torch.tensor([0, 1, 2]))(images)
    torch.testing.assert_close(per_sample, -torch.log_softmax(logits, -1)[[0, 1, 2], [0, 1, 2]])


def test_masked_reconstruction_ignores_unobserved_pixels(images):
    ref = images[0]
    loss = losses.masked_reconstruction(ref, _mask())
    x = ref[None].clone()
    x[..., 8:, :] = 5.0  # change only the unobserved bottom half
    assert float(loss(x)[0]) == 0.0
    x[..., 0, 0] += 2.0  # one observed pixel off by 2
    assert float(loss(x)[0]) == pytest.approx(4.0)


def test_gram_shape_and_symmetry():
    f = torch.randn(2, 5, 4, 4)
    g = losses.gram(f)
    assert g.shape == (2, 5, 5)
    # G_ij and G_ji are the same H·W-term dot product, then a division: each within
    # γ_{HW+1} (|F| |F|ᵀ)_ij / HW of the exact value
    bound = 2 * gamma(f.shape[2] * f.shape[3] + 1, f.dtype) * losses.gram(f.abs())
    assert bool(((g - g.transpose(1, 2)).abs() <= bound).all())


def test_bad_input(classifier, images):
    with pytest.raises(ValueError, match="reference"):
        losses.style(classifier, torch.zeros(1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="reference"):
        losses.feature_match(classifier, torch.zeros(2, 1, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        losses.masked_reconstruction(images[0], torch.ones(8, 8))
    with pytest.raises(ValueError, match="mask"):
        losses.masked_reconstruction(images[0], torch.zeros(16, 16))
    with pytest.raises(ValueError, match="label"):
        losses.target_class(classifier, 2.5)
    with pytest.raises(ValueError, match="layers"):
        losses.style(classifier, images[0], layers=[7])
    with pytest.raises(ValueError, match="reference"):  # images of another size than the reference
        losses.masked_reconstruction(images[0], _mask())(torch.zeros(2, 1, 8, 8))
