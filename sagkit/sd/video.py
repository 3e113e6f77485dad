"""Guided text-to-video sampling over a loaded diffusers AnimateDiff or TextToVideoSD pipeline.

    pipe = AnimateDiffPipeline.from_pretrained(path, motion_adapter=adapter).to("cuda")
    guided = GuidedVideo.from_pipe(pipe)
    video = guided("a lighthouse", loss_fn=video_style_loss(clip_vision, reference), n=3)

:class:`GuidedVideo` is :class:`sagkit.sd.pipeline.GuidedStableDiffusion` with frames
(docs/maths.md §11.8): the same configuration (every method, preset and scheduler, CFG around
the negative prompt, batches, generators) on latents of shape (B, C, F, h, w), the layout of
diffusers' video latents. Two UNets are supported: AnimateDiff's ``UNetMotionModel`` (an SD 1.5
UNet with a motion adapter; it takes one text embedding per frame, :class:`PerFrameText`) and
TextToVideoSD's ``UNet3DConditionModel``. With ``guidance="none"`` the run is the pipeline's own
denoising loop from the same initial noise.

A video loss takes decoded pixel video (B, 3, F, H, W) in [-1, 1] and returns (B,) values
(:mod:`sagkit.sd.video_losses`). The VAE decodes the latent video frame by frame, in chunks of
``decode_chunk_size`` frames (:func:`decode_video`), inside the loss as for the output; inside
a gradient each chunk's decoder runs under activation checkpointing, so decoding holds one
chunk's activations at a time (docs/maths.md §11.9).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.checks import check_count
from ..gradients.memory import checkpoint_contexts
from .latent import TextConditionedModel, vae_input
from .pipeline import CallParts, GuidedPipeline

__all__ = [
    "DECODE_CHUNK_SIZE",
    "GuidedVideo",
    "VideoTextModel",
    "PerFrameText",
    "decode_video",
    "video_decoded_loss",
]

DECODE_CHUNK_SIZE = 16
"""Frames per decoder call by default (AnimateDiff's ``decode_chunk_size``)."""


def decode_video(
    vae, z: torch.Tensor, *, chunk: int = DECODE_CHUNK_SIZE, scaling_factor: float | None = None
) -> torch.Tensor:
    """The pixel video D(z / s) of a latent video z (B, C, F, h, w): (B, 3, F, H, W).

    The B·F frames (in the order b·F + f, as diffusers' ``decode_latents``) go through the
    decoder ``chunk`` at a time. When a gradient is being recorded (grad mode on and z
    requiring grad) each chunk runs under ``torch.utils.checkpoint`` (non-reentrant), and the
    gradient passes through every chunk. What is held:

    - from the forward pass to the end of the backward pass, the B·F latent frames z / s (the
      checkpoints' inputs; no decoder activation);
    - whatever the loss keeps of the decoded video for its own backward pass (CLIP's graph on
      every frame), freed as that backward pass runs;
    - then, one chunk at a time, the decoder activations of ``chunk`` frames, recomputed,
      backpropagated through and freed before the next chunk.

    So the peak is S + max(M, c·A) (S the latent frames, M the loss's graph, A one frame's
    decoder activations, c = ``chunk``), where a plain decode holds S + M + B·F·A
    (docs/maths.md §11.9). The decoder runs in its weights' dtype (half precision included);
    the video comes back in z's dtype.

    Args:
        vae: a diffusers ``AutoencoderKL``.
        z: (B, C, F, h, w) latents.
        chunk: frames per decoder call (AnimateDiff's ``decode_chunk_size``).
        scaling_factor: s; by default ``vae.config.scaling_factor``.
    """
    chunk = check_count(chunk, "decode_chunk_size")
    if not isinstance(z, torch.Tensor) or z.ndim != 5:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be latent video (B, C, F, h, w), got {shape}")
    b, c, f, h, w = z.shape
    frames = (
        vae_input(vae, z, scaling_factor=scaling_factor).transpose(1, 2).reshape(b * f, c, h, w)
    )
    recorded = torch.is_grad_enabled() and frames.requires_grad
    pieces = []
    for start in range(0, b * f, chunk):
        piece = frames[start : start + chunk]
        if recorded:
            piece = checkpoint(
                _decode, vae, piece, use_reentrant=False, context_fn=checkpoint_contexts
            )
        else:
            piece = _decode(vae, piece)
        pieces.append(piece)
    video = torch.cat(pieces)
    return video.reshape(b, f, *video.shape[1:]).transpose(1, 2)


def _decode(vae, frames: torch.Tensor) -> torch.Tensor:
    """D(frames) (N, 3, H, W) for latent frames (N, C, h, w), in the frames' dtype."""
    return vae.decode(frames.to(vae.dtype)).sample.to(frames.dtype)


def video_decoded_loss(
    vae,
    video_loss: Callable,
    *,
    chunk: int = DECODE_CHUNK_SIZE,
    scaling_factor: float | None = None,
) -> Callable:
    """A latent-space loss z ↦ video_loss(D(z / s)) for latent videos z (B, C, F, h, w).

    ``video_loss`` maps decoded pixel video (B, 3, F, H, W), roughly in [-1, 1], to (B,)
    values; the decode is :func:`decode_video` in chunks of ``chunk`` frames, checkpointed
    inside a gradient. (docs/maths.md §11.8, §11.9)
    """
    chunk = check_count(chunk, "decode_chunk_size")

    def loss(z: torch.Tensor) -> torch.Tensor:
        return video_loss(decode_video(vae, z, chunk=chunk, scaling_factor=scaling_factor))

    return loss


class PerFrameText(nn.Module):
    """AnimateDiff's ``UNetMotionModel`` with one text embedding per video.

    The motion UNet takes its cross-attention states per frame, (B·F, L, D) in the order
    b·F + f; ``AnimateDiffPipeline`` repeats each prompt's embedding F times. This module does
    the same at every call, so that it takes (B, L, D) like ``UNet3DConditionModel`` and
    every other text-conditioned UNet.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor):
        per_frame = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
        return self.unet(sample, timestep, encoder_hidden_states=per_frame)


class VideoTextModel(TextConditionedModel):
    """A text-conditioned video UNet with its unconditional (negative-prompt) embeddings.

    Args:
        unet: the pipeline's ``UNetMotionModel`` (wrapped in :class:`PerFrameText`) or
            ``UNet3DConditionModel``.
        scheduler: the pipeline's scheduler (its ``alphas_cumprod`` define the schedule).
        negative_embeds: (1, L, D) text embeddings of the empty or negative prompt.
    ``eps(x, t, cond)`` takes latent videos x (B, C, F, h, w) and one prompt embedding per
    video, ``cond`` (B, L, D).
    """

    sample_ndim = 5

    def __init__(self, unet, scheduler, negative_embeds: torch.Tensor):
        from diffusers import UNetMotionModel

        super().__init__(
            PerFrameText(unet) if isinstance(unet, UNetMotionModel) else unet,
            scheduler,
            negative_embeds,
        )


class GuidedVideo(GuidedPipeline):
    """A diffusers ``AnimateDiffPipeline`` or ``TextToVideoSDPipeline`` sampled with guidance.

    Build it with :meth:`from_pipe`. The pipeline's components are used as loaded (dtype,
    device); nothing is copied or downloaded.

    A call (:meth:`sagkit.sd.pipeline.GuidedPipeline.__call__`) takes latents (B, C, F, h, w)
    (C the UNet's ``in_channels``), a ``loss_fn`` of decoded pixel video (B, 3, F, H, W), e.g.
    :func:`sagkit.sd.video_losses.video_style_loss`, and ``cfg_scale`` the pipeline's
    ``guidance_scale`` by default (7.5 for AnimateDiff, 9 for TextToVideoSD); stochastic
    schedulers draw their noise in the (B, C, F, h, w) layout. ``output_type`` is by default
    the pipeline's ("pil" for AnimateDiff, "np" for TextToVideoSD). It returns diffusers'
    ``AnimateDiffPipelineOutput`` or ``TextToVideoSDPipelineOutput`` (``.frames``:
    (B, F, 3, H, W) for "pt" and "np", B lists of F images for "pil", the latents
    (B, C, F, h, w) for "latent"). Its own arguments:

    - ``num_frames`` (default the pipeline's, 16; with ``latents``, theirs): F;
    - ``num_videos_per_prompt`` (default 1): videos per prompt; the batch is B = prompts ×
      this;
    - ``decode_chunk_size`` (default :data:`DECODE_CHUNK_SIZE`): frames per decoder call, in
      the loss and for the output.
    """

    pipeline_name = "diffusers AnimateDiffPipeline or TextToVideoSDPipeline"
    latent_dims = ("F", "h", "w")
    processor_name = "video_processor"
    call_arguments = {
        "num_frames": None,
        "num_videos_per_prompt": 1,
        "decode_chunk_size": DECODE_CHUNK_SIZE,
    }

    def __init__(self, pipe):
        from diffusers import UNet3DConditionModel, UNetMotionModel

        super().__init__(pipe)
        if not isinstance(pipe.unet, (UNetMotionModel, UNet3DConditionModel)):
            raise TypeError(
                f"pipe must be a {self.pipeline_name}: its unet must be a UNetMotionModel or a "
                f"UNet3DConditionModel, got {type(pipe.unet).__name__}"
            )

    def model(self, negative_embeds: torch.Tensor) -> VideoTextModel:
        """The video UNet as a sagkit model, the negative embeddings (1, L, D) its
        ``null_cond``."""
        return VideoTextModel(self.pipe.unet, self.pipe.scheduler, negative_embeds)

    def latent_loss(
        self, loss_fn: Callable, *, decode_chunk_size: int = DECODE_CHUNK_SIZE
    ) -> Callable:
        """z ↦ loss_fn(D(z / s)) on the pipeline's VAE (:func:`video_decoded_loss`);
        ``loss_fn`` takes pixel video (B, 3, F, H, W) in [-1, 1]."""
        return video_decoded_loss(self.pipe.vae, loss_fn, chunk=decode_chunk_size)

    def latent_shape(
        self,
        batch: int,
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> tuple[int, int, int, int, int]:
        """(B, C, F, h, w): F = ``num_frames`` (default the pipeline's, 16), h = height / f,
        w = width / f (f the VAE's downsampling; a side not given is the UNet's
        ``sample_size``), C the UNet's ``in_channels``."""
        if num_frames is None:
            num_frames = self.pipeline_default("num_frames")
        frames = check_count(num_frames, "num_frames")
        h, w = self.spatial_size(height, width)
        return batch, self.pipe.unet.config.in_channels, frames, h, w

    def latent_sizes(self, latents: torch.Tensor) -> dict:
        """``num_frames``, ``height`` and ``width`` of the video of latents (B, C, F, h, w)."""
        factor = self.pipe.vae_scale_factor
        return {
            "num_frames": latents.shape[2],
            "height": latents.shape[3] * factor,
            "width": latents.shape[4] * factor,
        }

    def call_parts(
        self, generator, *, num_frames, num_videos_per_prompt, decode_chunk_size
    ) -> CallParts:
        """F to the latents' sizes, the videos per prompt to :meth:`encode` and the decode
        chunk to the loss and :meth:`decode`; refuses a pipeline with AnimateDiff's FreeInit
        or FreeNoise enabled (they change diffusers' loop)."""
        for feature in ("free_init", "free_noise"):  # AnimateDiff's other samplers
            if getattr(self.pipe, f"{feature}_enabled", False):
                raise ValueError(
                    f"pipe has {feature} enabled, which changes diffusers' sampling loop; guided "
                    f"sampling runs the plain loop: call pipe.disable_{feature}() first"
                )
        chunk = {"decode_chunk_size": check_count(decode_chunk_size, "decode_chunk_size")}
        return CallParts(
            encode={"num_images_per_prompt": num_videos_per_prompt},
            sizes={"num_frames": num_frames},
            loss=chunk,
            decode=chunk,
        )

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        *,
        output_type: str = "pil",
        decode_chunk_size: int = DECODE_CHUNK_SIZE,
    ):
        """The video of latents z (B, C, F, h, w) as diffusers' pipeline returns it: decoded
        in chunks of frames (:func:`decode_video`) and post-processed by the pipeline's
        ``video_processor``, in diffusers' output class of the pipeline."""
        from diffusers import UNetMotionModel

        if isinstance(self.pipe.unet, UNetMotionModel):
            from diffusers.pipelines.animatediff import AnimateDiffPipelineOutput as Output
        else:
            from diffusers.pipelines.deprecated.text_to_video_synthesis import (
                TextToVideoSDPipelineOutput as Output,
            )
        if output_type == "latent":
            return Output(frames=z)
        video = decode_video(self.pipe.vae, z, chunk=decode_chunk_size)
        return Output(
            frames=self.pipe.video_processor.postprocess_video(video, output_type=output_type)
        )
