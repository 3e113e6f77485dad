"""The losses of SAG's Stable Diffusion tasks, on transformers CLIP models the caller passes in.

Every loss maps decoded images (B, 3, H, W) in [-1, 1] (the VAE's range) to (B,) values, so it
is a ``loss_fn`` of :class:`sagkit.sd.pipeline.GuidedStableDiffusion`. A reference image is in
[-1, 1] too: one of another dtype or outside that range (8-bit pixels: convert them with
x / 127.5 - 1) is refused, but a float reference in [0, 1] cannot be told from a valid one by
its values; convert it with 2x - 1.

    StyleLoss(vision, reference)        ‖G(x) − G(ref)‖_F, G the Gram matrix of an
                                        intermediate layer's patch tokens (style transfer)
    ImageSimilarityLoss(vision, ref)    1 − cos(e(x), e(ref))     (CLIP-I, personalisation)
    TextSimilarityLoss(vision, t)       1 − cos(e(x), t)          (text guidance)
    AestheticLoss(vision, head)         s_max − head(e(x)/‖e(x)‖) (an aesthetic predictor)

e is the CLIP image embedding: ``image_embeds`` of a ``CLIPVisionModelWithProjection``, the
pooled output of a ``CLIPVisionModel``. The images reach CLIP through :func:`preprocess`, a
differentiable copy of ``CLIPImageProcessor`` (docs/maths.md §11.2). sagkit downloads nothing:
load the CLIP models (and the aesthetic head's weights) yourself. A model in half precision
runs in it; its features are cast to float32 (or the images' float64) before the Gram
matrices, norms and cosines, which are sums of many products (docs/maths.md §11.6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..core.models import working_dtype

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "resized_size",
    "preprocess",
    "image_embeddings",
    "text_embeddings",
    "patch_gram",
    "cosine_distance",
    "StyleLoss",
    "ImageSimilarityLoss",
    "TextSimilarityLoss",
    "AestheticLoss",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(h, w) after resizing the shortest edge to ``shortest_edge``, the other edge
    ⌊shortest_edge · long / short⌋, as ``CLIPImageProcessor`` computes it."""
    short, long = sorted((height, width))
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def preprocess(
    images: torch.Tensor,
    *,
    size: int,
    crop: int | None = None,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """CLIP's input from images in [-1, 1], differentiably: (B, 3, H, W) → (B, 3, crop, crop),
    float32 (float64 for float64 images).

        u = (x + 1)/2 ∈ [0, 1];  shortest edge resized to ``size`` (bicubic, a = −0.5, with
        antialiasing: torch's ``interpolate(..., antialias=True)``, PIL's kernel);
        centre crop of crop × crop (top = ⌊(h − crop)/2⌋, left = ⌊(w − crop)/2⌋);
        (u − mean_c)/std_c per channel.

    ``CLIPImageProcessor`` does the same on 8-bit images, rounding to integers after each of
    PIL's two resampling passes: the two differ by at most (1 + S)/(2·255)/min std, S the
    largest absolute row sum of the second pass's weights (docs/maths.md §11.2; tested).

    Raises:
        TypeError: ``images`` is not a floating-point tensor (8-bit pixels: x / 127.5 - 1).
        ValueError: ``images`` is not (B, 3, H, W) with H, W >= 1.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"images must be a torch.Tensor (B, 3, H, W) in [-1, 1], got {type(images).__name__}"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"images must be floating point in [-1, 1], got {images.dtype} (convert 0..255 "
            "pixels with x / 127.5 - 1)"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if 0 in images.shape[2:]:
        raise ValueError(f"images must have H, W >= 1, got shape {tuple(images.shape)}")
    crop = size if crop is None else crop
    h, w = resized_size(images.shape[2], images.shape[3], size)
    if min(h, w) < crop:
        raise ValueError(f"crop ({crop}) must not exceed size ({size})")
    u = (images.to(working_dtype(images.dtype)) + 1) / 2  # half-precision images in float32
    u = F.interpolate(u, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (h - crop) // 2, (w - crop) // 2
    u = u[:, :, top : top + crop, left : left + crop]
    m = torch.as_tensor(mean, dtype=u.dtype, device=u.device)[:, None, None]
    s = torch.as_tensor(std, dtype=u.dtype, device=u.device)[:, None, None]
    return (u - m) / s


def _pixels(vision_model, images: torch.Tensor, mean, std) -> torch.Tensor:
    """CLIP's input for ``vision_model`` (its ``image_size``), in the model's dtype."""
    size = vision_model.config.image_size
    return preprocess(images, size=size, mean=mean, std=std).to(vision_model.dtype)


def image_embeddings(
    vision_model,
    images: torch.Tensor,
    *,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """e(x), (B, E) in float32 (float64 for float64 images): ``image_embeds`` of a
    ``CLIPVisionModelWithProjection``, ``pooler_output`` of a ``CLIPVisionModel``."""
    out = vision_model(pixel_values=_pixels(vision_model, images, mean, std))
    embeds = getattr(out, "image_embeds", None)
    return (out.pooler_output if embeds is None else embeds).to(working_dtype(images.dtype))


def text_embeddings(text_model, tokenizer, texts: str | Sequence[str]) -> torch.Tensor:
    """CLIP text embeddings (B, E) of ``texts`` by a ``CLIPTextModelWithProjection``
    (``text_embeds``) or a ``CLIPTextModel`` (``pooler_output``), float32, no gradient."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    tokens = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = text_model(input_ids=tokens.input_ids.to(text_model.device))
    embeds = getattr(out, "text_embeds", None)
    return (out.pooler_output if embeds is None else embeds).float()


def patch_gram(
    vision_model,
    images: torch.Tensor,
    *,
    layer: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """G = Fᵀ F, (B, D, D), F (B, P, D) the P patch tokens (the class token dropped) output by
    encoder layer ``layer`` (0-based: ``hidden_states[layer + 1]``), in float32 (float64 for
    float64 images).

    (docs/maths.md §11.3)
    """
    out = vision_model(
        pixel_values=_pixels(vision_model, images, mean, std), output_hidden_states=True
    )
    layers = len(out.hidden_states) - 1
    if not 0 <= layer < layers:
        raise ValueError(f"layer must be in [0, {layers - 1}] for this model, got {layer}")
    tokens = out.hidden_states[layer + 1][:, 1:, :].to(working_dtype(images.dtype))
    return tokens.transpose(1, 2) @ tokens


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 − a·b/(‖a‖ ‖b‖) along the last axis, (B,) for a (B, E) and b (B, E) or (1, E).

    (docs/maths.md §11.4)
    """
    return 1 - F.cosine_similarity(a, b.expand_as(a), dim=-1, eps=1e-12)


def _reference(reference) -> torch.Tensor:
    """The reference image as (1, 3, H, W), checked: a float tensor, finite, in [-1, 1]."""
    if not isinstance(reference, torch.Tensor):
        raise TypeError(
            "reference must be a torch.Tensor, one image (3, H, W) or (1, 3, H, W) in [-1, 1], "
            f"got {type(reference).__name__}"
        )
    reference = reference[None] if reference.ndim == 3 else reference
    if reference.ndim != 4 or reference.shape[:2] != (1, 3):
        raise ValueError(
            f"reference must be one image (3, H, W) or (1, 3, H, W) in [-1, 1], got "
            f"{tuple(reference.shape)}"
        )
    if 0 in reference.shape[2:]:
        raise ValueError(f"reference must have H, W >= 1, got shape {tuple(reference.shape)}")
    if not reference.is_floating_point():
        raise TypeError(
            f"reference must be a float image in [-1, 1], got {reference.dtype}: convert 0..255 "
            "pixels with x / 127.5 - 1"
        )
    if not bool(torch.isfinite(reference).all()):
        raise ValueError("reference contains NaN or inf; it must be an image in [-1, 1]")
    low, high = float(reference.min()), float(reference.max())
    if low < -1 or high > 1:
        raise ValueError(
            f"reference must be in [-1, 1] (the VAE's range), got values in [{low:g}, {high:g}]: "
            "convert 0..255 pixels with x / 127.5 - 1"
        )
    return reference


class StyleLoss:
    """SAG's style loss: L(x) = ‖G(x) − G(ref)‖_F (the Frobenius norm), (B,).

    Args:
        vision_model: a transformers ``CLIPVisionModel`` (or ``...WithProjection``).
        reference: the style image, (3, H, W) or (1, 3, H, W) in [-1, 1], any size
            (:func:`preprocess` brings it to CLIP's input as it does the samples). Another
            dtype or values outside [-1, 1] are refused (8-bit pixels: x / 127.5 - 1); a float
            image in [0, 1] cannot be told from a valid one by its values: convert it with
            2x - 1 yourself.
        layer: the encoder layer whose patch tokens make G (0-based; default 2, the third
            block, the official code's choice).
        mean, std: the processor's normalisation (default OpenAI CLIP's).
    G(ref) is computed once, here.

    (docs/maths.md §11.3)
    """

    def __init__(
        self,
        vision_model,
        reference: torch.Tensor,
        *,
        layer: int = 2,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        self.vision_model, self.layer, self.mean, self.std = vision_model, layer, mean, std
        with torch.no_grad():
            self.reference_gram = self.gram(_reference(reference))

    def gram(self, images: torch.Tensor) -> torch.Tensor:
        """G of images (B, 3, H, W) in [-1, 1], (B, D, D)."""
        return patch_gram(self.vision_model, images, layer=self.layer, mean=self.mean, std=self.std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        gram = self.gram(images)
        return torch.linalg.matrix_norm(gram - self.reference_gram.to(gram), ord="fro")


class _EmbeddingLoss:
    """Shared: the CLIP image embedding of the samples, with the processor's normalisation."""

    def __init__(self, vision_model, mean, std):
        self.vision_model, self.mean, self.std = vision_model, mean, std

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """e(x), (B, E)."""
        return image_embeddings(self.vision_model, images, mean=self.mean, std=self.std)

    def grey_embeddings(self, batch: int) -> torch.Tensor:
        """e of ``batch`` mid-grey images (zeros), (batch, E), without gradient: what a loss
        checks its other inputs against when it is built."""
        size = self.vision_model.config.image_size
        grey = torch.zeros(batch, 3, size, size, device=self.vision_model.device)
        with torch.no_grad():
            return self.embed(grey)


class ImageSimilarityLoss(_EmbeddingLoss):
    """CLIP-I as a loss: L(x) = 1 − cos(e(x), e(ref)), (B,) in [0, 2].

    Args:
        vision_model: a ``CLIPVisionModelWithProjection`` (or ``CLIPVisionModel``).
        reference: (3, H, W) or (1, 3, H, W) in [-1, 1], checked as :class:`StyleLoss`'s (a
            float image in [0, 1] cannot be told from a valid one: convert it with 2x - 1).

    (docs/maths.md §11.4)
    """

    def __init__(
        self,
        vision_model,
        reference: torch.Tensor,
        *,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        super().__init__(vision_model, mean, std)
        with torch.no_grad():
            self.reference_embedding = self.embed(_reference(reference))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        e = self.embed(images)
        return cosine_distance(e, self.reference_embedding.to(e))


class TextSimilarityLoss(_EmbeddingLoss):
    """CLIP text–image guidance: L(x) = 1 − cos(e(x), t), (B,) in [0, 2].

    Args:
        vision_model: a ``CLIPVisionModelWithProjection`` (or ``CLIPVisionModel``).
        text_embeds: t, (1, E) or (B, E), from the same CLIP (:func:`text_embeddings`); E is
            checked against the vision model's embedding when the loss is built.

    (docs/maths.md §11.4)
    """

    def __init__(
        self,
        vision_model,
        text_embeds: torch.Tensor,
        *,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        super().__init__(vision_model, mean, std)
        if not isinstance(text_embeds, torch.Tensor):
            raise TypeError(
                f"text_embeds must be a torch.Tensor (1, E) or (B, E), got "
                f"{type(text_embeds).__name__}"
            )
        if text_embeds.ndim != 2:
            raise ValueError(
                f"text_embeds must have shape (1, E) or (B, E), got {tuple(text_embeds.shape)}"
            )
        width = self.grey_embeddings(1).shape[-1]
        if text_embeds.shape[1] != width:
            raise ValueError(
                f"text_embeds must have width E = {width} (this CLIP's image embedding), got "
                f"{tuple(text_embeds.shape)}: embed the text with the same CLIP"
            )
        self.text_embeds = text_embeds.detach()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        e = self.embed(images)
        if self.text_embeds.shape[0] not in (1, e.shape[0]):
            raise ValueError(
                f"text_embeds has batch {self.text_embeds.shape[0]} for {e.shape[0]} images: "
                "give one text embedding (1, E) or one per image (B, E)"
            )
        return cosine_distance(e, self.text_embeds.to(e))


class AestheticLoss(_EmbeddingLoss):
    """An aesthetic predictor as a loss: L(x) = s_max − h(e(x)/‖e(x)‖), (B,).

    Args:
        vision_model: the CLIP the head was trained on (a ``...WithProjection``).
        head: h, a module (or a function) mapping normalised embeddings (B, E) to scores
            (B, 1) or (B,) (e.g. a linear layer loaded with an aesthetic predictor's weights);
            checked on two grey images' embeddings when the loss is built.
        best: s_max, the top of the score scale (10 for LAION's predictor), so that L ≥ 0
            for scores on that scale (DPS's step needs L ≥ 0).

    (docs/maths.md §11.5)
    """

    def __init__(
        self,
        vision_model,
        head,
        *,
        best: float = 10.0,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        super().__init__(vision_model, mean, std)
        if not callable(head):
            raise TypeError(
                f"head must be a module or function of embeddings, got {type(head).__name__}"
            )
        self.head, self.best = head, float(best)
        e = self.grey_embeddings(2)
        expected = f"head must map normalised embeddings (B, {e.shape[1]}) to scores (B, 1) or (B,)"
        try:
            with torch.no_grad():
                score = self.score(e)
        except RuntimeError as error:
            raise ValueError(
                f"{expected}; it fails on (2, {e.shape[1]}): {' '.join(str(error).split())}"
            ) from None
        if tuple(score.shape) not in ((2,), (2, 1)):
            raise ValueError(f"{expected}, got {tuple(score.shape)} for B = 2")

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """h(e/‖e‖) of embeddings (B, E), as the head returns it, in the embeddings' dtype."""
        e = embeddings / embeddings.norm(dim=-1, keepdim=True)
        parameters = getattr(self.head, "parameters", None)  # a module runs in its dtype
        weight = None if parameters is None else next(parameters(), None)
        return self.head(e if weight is None else e.to(weight.dtype)).to(e)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.best - self.score(self.embed(images)).reshape(images.shape[0])
