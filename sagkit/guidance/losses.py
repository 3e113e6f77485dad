"""Guidance losses on images: small factories that return plain callables.

Every loss maps a batch of images x of shape (B, C, H, W) in [-1, 1] to (B,) values, is
differentiable in x and is non-negative (so the DPS step rule ζ/sqrt(L) of
:mod:`sagkit.guidance` applies). The classifier-based losses take any object with

- ``logits(x)``: (B, K) class logits,
- ``features(x)``: (B, F) penultimate features,
- ``feature_maps(x)``: a list of (B, C_l, H_l, W_l) convolutional activations,

such as ``sk.digits.load_classifier("digits")``. Reference images are (C, H, W) or (1, C, H, W).

These are the guidance tasks of FreeDoM (Yu et al. 2023, "FreeDoM: Training-Free Energy-Guided
Conditional Diffusion Model": classifier, style, face identity, inpainting-like
reconstruction) and SAG (Pan et al. 2023, "Towards Accurate Guided Diffusion Sampling through
Symplectic Adjoint Method": style, identity, aesthetics), at digit scale.

    loss = sk.losses.target_class(classifier, 3)
    loss(x)  # (B,) cross-entropy of class 3
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "target_class",
    "style",
    "feature_match",
    "masked_reconstruction",
    "gram",
    "check_reference",
]

Loss = Callable[[torch.Tensor], torch.Tensor]


def check_reference(reference, *, name: str = "reference", shape=None) -> torch.Tensor:
    """A reference image as a detached (1, C, H, W) tensor; ``ValueError`` naming ``name`` if not.

    Args:
        reference: (C, H, W) or (1, C, H, W).
        shape: the expected (C, H, W), or ``None`` to accept any.
    """
    ref = torch.as_tensor(reference).detach()
    if ref.ndim == 3:
        ref = ref[None]
    if ref.ndim != 4 or ref.shape[0] != 1:
        raise ValueError(
            f"{name} must be one image of shape (C, H, W) or (1, C, H, W), got {tuple(ref.shape)}"
        )
    if shape is not None and tuple(ref.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {tuple(shape)} (C, H, W), got {tuple(ref.shape[1:])}"
        )
    return ref


def _check_batch(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1:] != ref.shape[1:]:
        raise ValueError(
            f"the reference has shape {tuple(ref.shape[1:])} but the images x have shape {tuple(x.shape)}: reference and x must have the same (C, H, W)"
        )


def _on_reference(fn, ref: torch.Tensor):
    """``fn(ref)`` without a graph; a ``ValueError`` of the classifier (wrong size) names the reference."""
    try:
        with torch.no_grad():
            return fn(ref)
    except ValueError as err:
        raise ValueError(f"reference does not fit the classifier: {err}") from None


def _num_classes(classifier) -> int | None:
    """How many classes the classifier's logits have, where it says."""
    classes = getattr(getattr(classifier, "config", None), "get", lambda k: None)("classes")
    if classes is None:
        classes = getattr(classifier, "classes", None)
    return classes if isinstance(classes, int) else None


def target_class(classifier, label) -> Loss:
    """L(x) = −log softmax(logits(x))[label], the cross-entropy of the target class, (B,).

    FreeDoM's and UGD's classifier guidance, evaluated on the clean-image estimate (so a
    classifier trained on clean images suffices). ``label``: an int, or a (B,) tensor of ints.
    """
    label = torch.as_tensor(label)
    if label.ndim > 1 or label.is_floating_point() or label.dtype == torch.bool:
        raise ValueError(f"label must be an int or a (B,) tensor of ints, got {label!r}")
    classes = _num_classes(classifier)
    if classes is not None and label.numel() and not bool(((label >= 0) & (label < classes)).all()):
        raise ValueError(
            f"label must lie in 0..{classes - 1} (the classifier's classes), got {label.tolist()}"
        )

    def loss(x: torch.Tensor) -> torch.Tensor:
        logits = classifier.logits(x)
        target = label.to(logits.device).expand(logits.shape[0])
        return F.cross_entropy(logits, target, reduction="none")

    return loss


def gram(feature_map: torch.Tensor) -> torch.Tensor:
    """Gram matrix G = F Fᵀ / (H W) of a (B, C, H, W) feature map, shape (B, C, C)."""
    b, c, h, w = feature_map.shape
    flat = feature_map.reshape(b, c, h * w)
    return flat @ flat.transpose(1, 2) / (h * w)


def style(classifier, reference, *, layers=None) -> Loss:
    """L(x) = Σ_l ‖G_l(x) − G_l(ref)‖²_F, Gram matrices of the classifier's feature maps, (B,).

    The style loss of FreeDoM and SAG (there on CLIP image features; Gatys et al. 2016 on VGG),
    with :func:`gram` normalised by the number of positions H_l W_l.

    Args:
        classifier: has ``feature_maps(x)``.
        reference: the style image, (C, H, W) or (1, C, H, W).
        layers: indices into ``feature_maps`` to use; all by default.
    """
    ref = check_reference(reference)
    maps = _on_reference(classifier.feature_maps, ref)
    chosen = list(range(len(maps))) if layers is None else list(layers)
    if not chosen or any(not -len(maps) <= i < len(maps) for i in chosen):
        raise ValueError(f"layers must index the {len(maps)} feature maps, got {layers!r}")
    targets = [gram(maps[i]).detach() for i in chosen]

    def loss(x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, ref)
        maps_x = classifier.feature_maps(x)
        return sum(
            (gram(maps_x[i]) - g.to(x)).pow(2).flatten(1).sum(1)
            for i, g in zip(chosen, targets, strict=True)
        )

    return loss


def feature_match(classifier, reference) -> Loss:
    """L(x) = 1 − cos(features(x), features(ref)), cosine distance of penultimate features, (B,).

    The identity loss of FreeDoM and SAG (there with a face-recognition network's embedding).
    """
    ref = check_reference(reference)
    target = _on_reference(classifier.features, ref)

    def loss(x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, ref)
        return 1 - F.cosine_similarity(classifier.features(x), target.to(x), dim=1)

    return loss


def masked_reconstruction(reference, mask) -> Loss:
    """L(x) = ‖m ⊙ (x − ref)‖², the squared error on the observed pixels, (B,).

    Inpainting as guidance: the linear inverse problem y = m ⊙ x_0 of DPS (Chung et al. 2023)
    and FreeDoM, in DPS's form ‖y − A x̂0‖², so DPS's step ζ/‖y − A x̂0‖ = ζ/sqrt(L) keeps the
    published meaning of ζ.

    Args:
        reference: the image, (C, H, W) or (1, C, H, W).
        mask: weights in [0, 1] broadcastable to the reference (e.g. (H, W) or (1, 1, H, W)),
            1 where the reference is observed.

    (docs/maths.md §8.3)
    """
    ref = check_reference(reference, name="reference")
    mask = torch.as_tensor(mask).detach()
    try:
        mask = torch.broadcast_to(mask, ref.shape).to(ref.dtype)
    except RuntimeError:
        raise ValueError(
            f"mask must broadcast to the reference's shape {tuple(ref.shape)}, got {tuple(mask.shape)}"
        ) from None
    if bool(((mask < 0) | (mask > 1)).any()) or not bool(mask.sum() > 0):
        raise ValueError("mask must lie in [0, 1] and be non-zero somewhere")

    def loss(x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, ref)
        return (mask.to(x) * (x - ref.to(x))).pow(2).flatten(1).sum(1)

    return loss
