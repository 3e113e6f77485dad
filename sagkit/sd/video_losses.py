"""Losses on decoded video, on transformers CLIP models the caller passes in.

A video loss maps decoded video (B, C, F, H, W) in [-1, 1] (batch, channels C = 3, frames,
height, width: the layout of diffusers' video latents and of its video pipelines'
``decode_latents``) to per-sample values (B,), so it is the ``loss_fn`` of a guided video
pipeline as an image loss is of :class:`sagkit.sd.pipeline.GuidedStableDiffusion`.

    FrameAverage(image_loss)             (1/F) Σ_f ℓ(x_f): any image loss of :mod:`.clip`
                                         (style, CLIP-I, text, aesthetic) on every frame
    TemporalConsistency(vision)          (1/(F−1)) Σ_f [1 − cos(e(x_f), e(x_{f+1}))]
    TemporallyRegularised(loss, T, weight=λ)   L(x) + λ T(x)
    video_style_loss(vision, ref, temporal=λ)  FrameAverage(StyleLoss) + λ TemporalConsistency

x_f is frame f, (B, 3, H, W); e is CLIP's image embedding (:func:`sagkit.sd.clip.image_embeddings`).
(docs/maths.md §11.7)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..core.checks import check_scale
from .clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, StyleLoss, cosine_distance, image_embeddings

__all__ = [
    "check_video",
    "FrameAverage",
    "TemporalConsistency",
    "TemporallyRegularised",
    "video_style_loss",
]

LAYOUT = "(B, C, F, H, W) (batch, channels C = 3, frames, height, width; diffusers' video layout)"


def check_video(video, *, min_frames: int = 1) -> torch.Tensor:
    """A floating tensor (B, 3, F, H, W) with B, H, W >= 1 and F >= ``min_frames``; returns it.

    Raises:
        TypeError: ``video`` is not a floating-point tensor.
        ValueError: another shape (with a hint for an image batch (B, 3, H, W) and for frames
            before channels (B, F, 3, H, W)), or too few frames.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor {LAYOUT}, got {type(video).__name__}")
    if not video.is_floating_point():
        raise TypeError(
            f"video must be floating point in [-1, 1], got {video.dtype} (convert 0..255 pixels "
            "with x / 127.5 - 1)"
        )
    shape = tuple(video.shape)
    if video.ndim == 4:
        raise ValueError(
            f"video must have shape {LAYOUT}, got {shape}: for images use an image loss, or "
            "make a one-frame video with x[:, :, None]"
        )
    if video.ndim != 5:
        raise ValueError(f"video must have shape {LAYOUT}, got {shape}")
    if shape[1] != 3:
        hint = ": frames before channels? use video.permute(0, 2, 1, 3, 4)" if shape[2] == 3 else ""
        raise ValueError(f"video must have shape {LAYOUT}, got {shape}{hint}")
    if 0 in (shape[0], shape[3], shape[4]):
        raise ValueError(f"video must have B, H, W >= 1, got shape {shape}")
    if shape[2] < min_frames:
        raise ValueError(f"video must have F >= {min_frames} frames, got shape {shape}")
    return video


def _check_vision_model(vision_model) -> None:
    """Raise ``TypeError`` unless ``vision_model`` is callable with a ``config.image_size``."""
    if not callable(vision_model) or not hasattr(
        getattr(vision_model, "config", None), "image_size"
    ):
        raise TypeError(
            "vision_model must be a transformers CLIPVisionModel or CLIPVisionModelWithProjection, "
            f"got {type(vision_model).__name__}"
        )


def _check_normalisation(mean, std) -> None:
    """Raise ``ValueError`` unless ``mean`` and ``std`` are 3 finite numbers, ``std`` > 0."""
    for name, values in (("mean", mean), ("std", std)):
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(
                f"{name} must be 3 numbers (one per channel), got {values!r}"
            ) from None
        if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"{name} must be 3 finite numbers (one per channel), got {values!r}")
    if not all(float(s) > 0 for s in std):
        raise ValueError(f"std must be positive, got {std!r}")


class FrameAverage:
    """An image loss on every frame, averaged: L(x) = (1/F) Σ_f ℓ(x_f), (B,).

    Args:
        image_loss: ℓ, maps images (B, 3, H, W) in [-1, 1] to per-image losses (B,): a loss of
            :mod:`sagkit.sd.clip` (``StyleLoss``: the per-frame Gram-matrix style loss;
            ``ImageSimilarityLoss``: CLIP-I; ``TextSimilarityLoss``: text–image) or your own.

    ℓ is called once per frame on x_f = x[:, :, f] (B, 3, H, W), so a loss with per-sample
    conditions (text embeddings (B, E)) keeps sample b with condition b; the F graphs are all
    kept for the backward pass, as one batch of B·F images would keep them.

    (docs/maths.md §11.7)
    """

    def __init__(self, image_loss: Callable[[torch.Tensor], torch.Tensor]):
        if not callable(image_loss):
            raise TypeError(
                "image_loss must map images (B, 3, H, W) to losses (B,), got "
                f"{type(image_loss).__name__}"
            )
        self.image_loss = image_loss

    def frame_losses(self, video: torch.Tensor) -> torch.Tensor:
        """ℓ(x_f) for every frame, (B, F), of a checked video."""
        batch, losses = video.shape[0], []
        for f in range(video.shape[2]):
            value = self.image_loss(video[:, :, f])
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch,):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(
                    f"image_loss must return one loss per image, shape ({batch},) for a frame of "
                    f"{batch} images, got {shape}"
                )
            losses.append(value)
        return torch.stack(losses, dim=1)

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        return self.frame_losses(check_video(video)).mean(dim=1)


class TemporalConsistency:
    """Temporal consistency in CLIP's embedding: T(x) = (1/(F−1)) Σ_{f<F−1} d(e(x_f), e(x_{f+1})),
    (B,) in [0, 2], d(a, b) = 1 − a·b/(‖a‖ ‖b‖) the cosine distance.

    Zero when consecutive frames have parallel embeddings (a still video), so as a guidance
    term it pulls each frame's embedding toward its neighbours': it penalises flicker of
    content and style between frames (and, weighted too high, motion itself). The cosine
    distance, not ‖e_f − e_{f+1}‖²: CLIP compares embeddings by angle (CLIP-I and the
    text loss are cosines too), so the term does not reward shrinking the embeddings' norm
    instead of aligning them, and it is bounded and free of the embedding's scale, so one
    weight means the same for any CLIP; 1 − T is the frame-consistency score video
    generators are evaluated with (mean cosine of consecutive frames' CLIP embeddings). On
    normalised embeddings ‖a − b‖² = 2 d(a, b): the same term, twice.

    Args:
        vision_model: a ``CLIPVisionModelWithProjection`` (``image_embeds``) or
            ``CLIPVisionModel`` (``pooler_output``).
        mean, std: the processor's normalisation (default OpenAI CLIP's).
    A video of one frame has no consecutive pair: it is refused (``ValueError``) rather than
    given T = 0, which would make the term's weight do nothing without notice. The B·F frames
    go through CLIP in one batch.

    (docs/maths.md §11.7)
    """

    def __init__(
        self,
        vision_model,
        *,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        _check_vision_model(vision_model)
        _check_normalisation(mean, std)
        self.vision_model, self.mean, self.std = vision_model, mean, std

    def embeddings(self, video: torch.Tensor) -> torch.Tensor:
        """e(x_f) of every frame of a checked video, (B, F, E)."""
        b, c, f, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * f, c, h, w)
        e = image_embeddings(self.vision_model, frames, mean=self.mean, std=self.std)
        return e.reshape(b, f, -1)

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        e = self.embeddings(check_video(video, min_frames=2))
        return cosine_distance(e[:, 1:], e[:, :-1]).mean(dim=1)


class TemporallyRegularised:
    """A video loss plus a weighted temporal term: L(x) + λ T(x), (B,).

    Args:
        video_loss: L, a video loss (B, 3, F, H, W) → (B,) (e.g. a :class:`FrameAverage`).
        temporal: T, e.g. a :class:`TemporalConsistency`.
        weight: λ >= 0.

    (docs/maths.md §11.7)
    """

    def __init__(self, video_loss: Callable, temporal: Callable, *, weight: float):
        for name, value in (("video_loss", video_loss), ("temporal", temporal)):
            if not callable(value):
                raise TypeError(
                    f"{name} must map video {LAYOUT} to losses (B,), got {type(value).__name__}"
                )
        self.video_loss, self.temporal = video_loss, temporal
        self.weight = check_scale(weight, "weight")

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        return self.video_loss(video) + self.weight * self.temporal(video)


def video_style_loss(
    vision_model,
    reference: torch.Tensor,
    *,
    temporal: float = 0.0,
    layer: int = 2,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
):
    """SAG's style loss on video: L(x) = (1/F) Σ_f ‖G(x_f) − G(ref)‖_F + λ T(x), (B,).

    G is the Gram matrix of CLIP's patch tokens at encoder layer ``layer``
    (:class:`sagkit.sd.clip.StyleLoss`, docs/maths.md §11.3) and T the
    :class:`TemporalConsistency` term, weighted by λ = ``temporal`` (>= 0).

    Args:
        vision_model: a transformers ``CLIPVisionModel`` (or ``...WithProjection``).
        reference: the style image, (3, H, W) or (1, 3, H, W) in [-1, 1] (checked as
            ``StyleLoss``'s).
        temporal: λ; 0 (the default) leaves the temporal term out, and then videos of one
            frame are accepted.
        layer, mean, std: as :class:`sagkit.sd.clip.StyleLoss`'s.
    Returns a :class:`FrameAverage` when λ = 0, else a :class:`TemporallyRegularised`.

    (docs/maths.md §11.7)
    """
    _check_vision_model(vision_model)
    _check_normalisation(mean, std)
    weight = check_scale(temporal, "temporal")
    style = FrameAverage(StyleLoss(vision_model, reference, layer=layer, mean=mean, std=std))
    if weight == 0:
        return style
    consistency = TemporalConsistency(vision_model, mean=mean, std=std)
    return TemporallyRegularised(style, consistency, weight=weight)
