"""AnimateDiff and TextToVideoSD pipelines with tiny configs and random weights.

Built locally from configs (nothing is downloaded), on the tiny Stable Diffusion components of
:mod:`sagkit.sd.tiny` (text encoder, tokenizer, VAE, DDIM scheduler): the offline tests of
:mod:`sagkit.sd.video`, the fast mode of notebook 07 and ``sagkit sample --video --tiny``.
Their frames are noise-like (random weights); they show the wiring, not the pictures. The
motion modules are random too (not zero as in a fresh AnimateDiff adapter), so the frames of
a video depend on each other.

    pipe = tiny_animatediff()          # AnimateDiffPipeline: UNetMotionModel, 16×16 frames
    pipe = tiny_text_to_video()        # TextToVideoSDPipeline: UNet3DConditionModel, 16×16 frames
"""

from __future__ import annotations

import torch

from .tiny import TEXT_WIDTH, cast_components, tiny_pipeline

__all__ = ["tiny_animatediff", "tiny_text_to_video"]


def _shared(latent_size: int, seed: int) -> dict:
    """The text encoder, tokenizer, VAE, scheduler and 2-D UNet of the tiny SD pipeline."""
    return dict(tiny_pipeline(latent_size=latent_size, seed=seed).components)


def _finish(pipeline_class, parts: dict, dtype, **modules):
    """``pipeline_class`` of the shared text encoder, tokenizer, VAE and scheduler and the
    ``modules`` given (its UNet, ...): no progress bar, eval mode, no parameter gradients,
    every module in ``dtype``."""
    shared = ("vae", "text_encoder", "tokenizer", "scheduler")
    pipe = pipeline_class(**{name: parts[name] for name in shared}, **modules)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    return cast_components(pipe, dtype)


def tiny_animatediff(*, latent_size: int = 8, seed: int = 0, dtype=torch.float32):
    """An ``AnimateDiffPipeline``: the tiny SD UNet (widths 16 and 32) with a random
    ``MotionAdapter`` (one motion layer a block, 2 heads, up to 32 frames), made into a
    ``UNetMotionModel``; the tiny SD text encoder, VAE (frames 2·``latent_size`` square) and
    DDIM scheduler."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    parts = _shared(latent_size, seed)
    torch.manual_seed(seed)
    adapter = MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=32,
    )
    return _finish(AnimateDiffPipeline, parts, dtype, unet=parts["unet"], motion_adapter=adapter)


def tiny_text_to_video(*, latent_size: int = 8, seed: int = 0, dtype=torch.float32):
    """A ``TextToVideoSDPipeline``: a random ``UNet3DConditionModel`` (widths 16 and 32, one
    layer a block, cross attention to the tiny text encoder); the tiny SD text encoder, VAE
    (frames 2·``latent_size`` square) and DDIM scheduler."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    parts = _shared(latent_size, seed)
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=latent_size,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=8,
        attention_head_dim=4,
    )
    return _finish(TextToVideoSDPipeline, parts, dtype, unet=unet)
