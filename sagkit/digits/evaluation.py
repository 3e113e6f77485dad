"""How good the shipped models are: classifier accuracy and Fréchet distance in its features."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .classifier import DigitsClassifier
from .data import digits_dataset
from .models import DigitsModel, sample_digits

__all__ = [
    "frechet_distance",
    "evaluate_samples",
    "evaluate_digits",
    "nearest_distance",
    "RealismCheck",
    "realism_check",
]


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½) of two feature sets (N, D), (M, D)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = (torch.atleast_2d(torch.cov(f.T)) for f in (a, b))
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@torch.no_grad()
def evaluate_samples(
    classifier: DigitsClassifier,
    samples: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor,
    *,
    batch_size: int = 512,
) -> dict[str, float]:
    """How well images match their labels and a reference set, in the classifier's eyes.

    Args:
        classifier: a :class:`DigitsClassifier`.
        samples: (N, 1, S, S) images (samples or data), clamped to [-1, 1] here.
        labels: (N,) the digits they should show.
        reference: (M, 1, S, S) images to compare with (held-out data).
    Returns:
        ``{"accuracy": ..., "fd": ...}``: the classifier's accuracy on ``samples`` and the
        Fréchet distance between ``samples`` and ``reference`` in its feature space.
    """
    p = next(classifier.parameters())

    def run(x):
        chunks = [x[i : i + batch_size].to(p).clamp(-1, 1) for i in range(0, len(x), batch_size)]
        feats = [classifier.features(c) for c in chunks]
        return torch.cat(feats), torch.cat([classifier.out(f) for f in feats])

    feats, logits = run(samples)
    accuracy = (logits.argmax(-1).cpu() == torch.as_tensor(labels).cpu()).double().mean()
    return {"accuracy": float(accuracy), "fd": frechet_distance(feats, run(reference)[0])}


def evaluate_digits(
    model: DigitsModel,
    classifier: DigitsClassifier,
    *,
    scales=(1.0, 2.0),
    per_class: int = 100,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 500,
) -> dict:
    """Evaluate the digits models against the held-out data.

    Returns a dict with ``"heldout"`` (the classifier on the test split, ``"fd"`` against the
    same number of training images: the data-vs-data floor) and, for each guidance scale w,
    ``"w=<w>"``: the classifier's accuracy on ``per_class`` samples of each digit and their
    Fréchet distance to the test split (see :func:`evaluate_samples`).
    """
    test_x, test_y = digits_dataset("test")
    train_x, train_y = digits_dataset("train")
    n = per_class * model.classes
    floor = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:n]
    heldout = evaluate_samples(classifier, test_x, test_y, test_x)
    heldout["fd"] = evaluate_samples(classifier, train_x[floor], train_y[floor], test_x)["fd"]
    results = {"heldout": heldout}
    labels = torch.arange(model.classes).repeat_interleave(per_class)
    for w in scales:
        generator = torch.Generator().manual_seed(seed)
        samples = torch.cat(
            [
                sample_digits(
                    model, labels[i : i + batch_size], scale=w, steps=steps, generator=generator
                ).cpu()
                for i in range(0, n, batch_size)
            ]
        )
        results[f"w={w:g}"] = evaluate_samples(classifier, samples, labels, test_x)
    return results


@torch.no_grad()
def nearest_distance(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The RMS pixel distance of each image to its nearest reference image.

    d(x_b) = min_m ‖x_b − r_m‖ / sqrt(D), D pixels per image; x (B, ...), reference (M, ...)
    with the same image shape. Returns (B,) float64.
    """
    flat_x, flat_r = x.flatten(1).double().cpu(), reference.flatten(1).double().cpu()
    if flat_x.shape[1] != flat_r.shape[1]:
        raise ValueError(
            f"x and reference must hold images of the same size, got {tuple(x.shape[1:])} "
            f"and {tuple(reference.shape[1:])}"
        )
    return torch.cdist(flat_x, flat_r).min(1).values / math.sqrt(flat_x.shape[1])


@dataclass(frozen=True)
class RealismCheck:
    """Is an image near the data? ``check(x)`` → (B,) bools: nearest_distance(x, reference) ≤
    threshold (images clamped to [-1, 1] first, as the classifier sees them).

    A distance to the data manifold, in pixels: the classifier cannot serve, since it calls pure
    noise a digit with confidence up to that of real digits.
    """

    reference: torch.Tensor
    threshold: float

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        return nearest_distance(x.clamp(-1, 1), self.reference)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.distance(x) <= self.threshold


def realism_check(*, factor: float = 2.0) -> RealismCheck:
    """The realism check of the shipped digits: the training digits as reference, and the
    threshold ``factor`` × the largest distance of a held-out digit to its nearest training
    digit (so every held-out digit passes, with a margin of ``factor``).

    With the default factor 2 the threshold lies well below the distance of Gaussian noise
    (clamped to [-1, 1]) to any digit (tested in ``tests/digits/test_evaluation.py``).
    """
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor!r}")
    train, _ = digits_dataset("train")
    held_out, _ = digits_dataset("test")
    largest = float(nearest_distance(held_out, train).max())
    return RealismCheck(train, factor * largest)
