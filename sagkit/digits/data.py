"""scikit-learn's digits as images in [-1, 1]: the data of the shipped models and the mixture."""

from __future__ import annotations

import torch
from torch import nn

from ..core.models import GaussianMixture
from ..core.schedules import Schedule, VPSchedule

__all__ = ["HELDOUT", "digit_images", "digits_dataset", "digits_mixture"]

HELDOUT = 360  # held-out images (20 %), stratified by digit


def digit_images(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 of scikit-learn's 8×8 digits, pixel values 0..16 mapped to [-1, 1].

    Returns ``(images, labels)``: (1797, 1, size, size) float64 (bilinear upsampling when
    ``size`` is not 8) and (1797,) int64 digits.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float64)[:, None] / 8.0 - 1.0
    if size != 8:
        images = nn.functional.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False
        )
    return images, torch.as_tensor(data.target, dtype=torch.int64)


def digits_dataset(split: str = "train", *, size: int = 16, dtype=torch.float32):
    """scikit-learn's digits as images in [-1, 1], with a fixed stratified split.

    Args:
        split: "train" (1437 images), "test" (the 360 held out) or "all" (1797).
        size: side length; 8 is native, larger sizes are bilinear upsamplings.
    Returns:
        ``(images, labels)``: (N, 1, size, size) in ``dtype`` and (N,) int64 digits.
    """
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    images, labels = digit_images(size)
    if split != "all":
        train, test = train_test_split(
            range(len(labels)), test_size=HELDOUT, random_state=0, stratify=labels.numpy()
        )
        idx = torch.as_tensor(sorted(train if split == "train" else test))
        images, labels = images[idx], labels[idx]
    return images.to(dtype), labels


def digits_mixture(
    *,
    n_components: int | None = 512,
    std: float = 0.1,
    size: int = 8,
    schedule: Schedule | None = None,
    seed: int = 0,
    dtype=torch.float64,
) -> GaussianMixture:
    """A :class:`~sagkit.GaussianMixture` centred on scikit-learn's digits images in [-1, 1].

    Args:
        n_components: how many images (chosen at random with ``seed``) become means;
            ``None`` takes all 1797.
        std: component standard deviation, in the [-1, 1] pixel scale.
        size: 8 (native) or a larger side length (bilinear upsampling).
        schedule: a VP or flow schedule; defaults to :meth:`VPSchedule.linear`.
    Shape of a sample: (1, size, size). ``labels`` holds each component's digit.
    """
    images, labels = digit_images(size)
    if n_components is not None:
        if not 1 <= n_components <= len(images):
            raise ValueError(f"n_components must be in [1, {len(images)}], got {n_components}")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images, labels = images[order[:n_components]], labels[order[:n_components]]
    model = GaussianMixture(images.to(dtype), std, schedule or VPSchedule.linear())
    model.labels = labels
    return model
