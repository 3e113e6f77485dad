"""scikit-learn's digits as images in [-1, 1]: the data of the shipped models and the mixture."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HELDOUT", "digit_images", "digits_dataset"]

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
