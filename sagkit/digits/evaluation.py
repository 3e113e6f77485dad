"""How good the shipped models are: classifier accuracy and Fréchet distance in its features."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.checks import check_count, check_name
from .classifier import DigitsClassifier
from .data import digits_dataset
from .models import DigitsModel, sample_digits

__all__ = [
    "frechet_distance",
    "evaluate_samples",
    "evaluate_digits",
    "nearest_distance",
    "roughness",
    "RealismCheck",
    "realism_check",
    "NOISE_FAMILIES",
    "noise_images",
]

NOISE_FAMILIES = ("gaussian", "dark", "salt-and-pepper", "blobs")
"""The kinds of pure noise the class task's target is checked on (:func:`noise_images`)."""


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


@torch.no_grad()
def roughness(x: torch.Tensor) -> torch.Tensor:
    """The RMS of the 5-point discrete Laplacian over each image's interior pixels.

    r(x) = sqrt(mean_{c,i,j} (x_{c,i+1,j} + x_{c,i−1,j} + x_{c,i,j+1} + x_{c,i,j−1} − 4 x_{c,i,j})²),
    (i, j) over the (H − 2)(W − 2) interior pixels; x (B, C, H, W), H, W ≥ 3. Returns (B,)
    float64: 0 for an affine ramp, 8 for a ±1 checkerboard. (docs/maths.md §12.1)
    """
    if x.ndim != 4 or x.shape[-1] < 3 or x.shape[-2] < 3:
        raise ValueError(f"x must have shape (B, C, H, W) with H, W >= 3, got {tuple(x.shape)}")
    x = x.double().cpu()
    c = x[..., 1:-1, 1:-1]
    lap = x[..., 2:, 1:-1] + x[..., :-2, 1:-1] + x[..., 1:-1, 2:] + x[..., 1:-1, :-2] - 4 * c
    return lap.flatten(1).square().mean(1).sqrt()


@dataclass(frozen=True)
class RealismCheck:
    """Does an image look like the data? Two scores, each bounded by the range it takes on real
    digits the check was calibrated on (docs/maths.md §12.1):

    - distance: RMS pixel distance to the nearest reference image (:func:`nearest_distance`),
      at most ``max_distance``: rejects images unlike any digit (blobs, flat or noisy frames);
    - roughness: :func:`roughness`, within ``roughness_range``: rejects texture no digit has,
      too rough (noise, salt and pepper) or too smooth (blurred blobs).

    Images are clamped to [-1, 1] first, as the classifier sees them. ``check(x)`` → (B,) bools;
    :meth:`failures` says which bound rejects each image. The classifier cannot serve: it calls
    pure noise a digit with confidence up to that of real digits.

    Attributes:
        reference: (M, C, H, W) the images distances are measured to (the training digits).
        max_distance: the largest distance accepted.
        roughness_range: (lowest, highest) roughness accepted.
    """

    reference: torch.Tensor
    max_distance: float
    roughness_range: tuple[float, float]

    @classmethod
    def calibrate(
        cls, reference: torch.Tensor, calibration: torch.Tensor, *, factor: float = 1.0
    ) -> RealismCheck:
        """Bounds from real images the reference does not hold: the largest distance of a
        ``calibration`` image to ``reference`` and the range of their roughness, each widened
        by ``factor`` (distance and highest roughness × factor, lowest roughness ÷ factor).

        With factor 1 every calibration image passes, and a new image drawn like them fails a
        bound with probability at most 3/(N + 1), N calibration images (docs/maths.md §12.1).
        reference (M, C, H, W), calibration (N, C, H, W), both in [-1, 1].
        """
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0:
            raise ValueError(f"factor must be a positive number, got {factor!r}")
        calibration = calibration.clamp(-1, 1)
        largest = float(nearest_distance(calibration, reference).max())
        r = roughness(calibration)
        return cls(reference, factor * largest, (float(r.min()) / factor, factor * float(r.max())))

    def scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"distance": (B,), "roughness": (B,)}`` float64 for images x (B, C, H, W)."""
        x = x.clamp(-1, 1)
        return {"distance": nearest_distance(x, self.reference), "roughness": roughness(x)}

    def failures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B,) bools per bound, True where it rejects the image: ``"far from the digits"``,
        ``"too rough"``, ``"too smooth"``."""
        s = self.scores(x)
        lo, hi = self.roughness_range
        return {
            "far from the digits": s["distance"] > self.max_distance,
            "too rough": s["roughness"] > hi,
            "too smooth": s["roughness"] < lo,
        }

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ~torch.stack(list(self.failures(x).values())).any(0)


def realism_check(*, factor: float = 1.0) -> RealismCheck:
    """The realism check of the shipped digits: the training digits as reference, calibrated on
    the 360 held-out digits (:meth:`RealismCheck.calibrate`): with the default factor 1 an image
    passes when it is no further from the training digits than the furthest held-out digit and
    its roughness lies within the held-out range.

    It rejects Gaussian and uniform noise, noise on a dark background, salt-and-pepper noise,
    blurred blobs and blurred digits (tested in ``tests/digits/test_evaluation.py``).
    (docs/maths.md §12.1)
    """
    train, _ = digits_dataset("train")
    held_out, _ = digits_dataset("test")
    return RealismCheck.calibrate(train, held_out, factor=factor)


def noise_images(
    family: str, num: int, *, size: int = 16, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``num`` images of pure noise of one family, (num, 1, size, size) float32 in [-1, 1].

    With z ~ N(0, I) per pixel:

    - ``"gaussian"``: clamp(z, −1, 1), the sampler's initial noise seen by the classifier;
    - ``"dark"``: clamp(−1 + 0.5 |z|, −1, 1), faint noise on the black background of the data;
    - ``"salt-and-pepper"``: each pixel white (1) with probability 0.3, else black (−1);
    - ``"blobs"``: z blurred by a Gaussian of σ = 1.5 pixels, scaled to unit standard
      deviation per image and clamped: smooth strokes of no digit.
    """
    check_name(family, "family", NOISE_FAMILIES)
    check_count(num, "num")
    check_count(size, "size")
    return _noise_images(family, num, size, generator)


def _noise_images(family, num, size, generator) -> torch.Tensor:
    z = torch.randn((num, 1, size, size), generator=generator)
    if family == "gaussian":
        return z.clamp(-1, 1)
    if family == "dark":
        return (-1 + 0.5 * z.abs()).clamp(-1, 1)
    if family == "salt-and-pepper":
        white = torch.rand((num, 1, size, size), generator=generator) < 0.3
        return torch.where(white, 1.0, -1.0)
    sigma, radius = 1.5, 4  # "blobs": a separable Gaussian blur, zero-padded
    kernel = torch.exp(-torch.arange(-radius, radius + 1.0).square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = torch.nn.functional.conv2d(z, kernel.view(1, 1, 1, -1), padding=(0, radius))
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return (x / x.flatten(1).std(1).view(-1, 1, 1, 1)).clamp(-1, 1)
