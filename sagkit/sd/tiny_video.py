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

from .tiny import assemble, tiny_pipeline, tiny_unet

__all__ = ["tiny_animatediff", "tiny_text_to_video"]


def _sd_parts(latent_size: int, seed: int) -> dict:
    """The VAE, text encoder, tokenizer, scheduler and 2-D UNet of the tiny SD pipeline."""
    parts = tiny_pipeline(latent_size=latent_size, seed=seed).components
    return {name: parts[name] for name in ("vae", "text_encoder", "tokenizer", "scheduler", "unet")}


def tiny_animatediff(*, latent_size: int = 8, seed: int = 0, dtype=torch.float32):
    """An ``AnimateDiffPipeline``: the tiny SD UNet (widths 16 and 32) with a random
    ``MotionAdapter`` (one motion layer a block, 2 heads, up to 32 frames), made into a
    ``UNetMotionModel``; the tiny SD text encoder, VAE (frames 2·``latent_size`` square) and
    DDIM scheduler."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    parts = _sd_parts(latent_size, seed)
    torch.manual_seed(seed)
    adapter = MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=32,
    )
    return assemble(AnimateDiffPipeline, dtype=dtype, **parts, motion_adapter=adapter)


def tiny_text_to_video(*, latent_size: int = 8, seed: int = 0, dtype=torch.float32):
    """A ``TextToVideoSDPipeline``: a random ``UNet3DConditionModel`` (:func:`tiny_unet`, cross
    attention to the tiny text encoder); the tiny SD text encoder, VAE (frames
    2·``latent_size`` square) and DDIM scheduler."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    parts = _sd_parts(latent_size, seed)
    torch.manual_seed(seed)
    unet = tiny_unet(UNet3DConditionModel, latent_size=latent_size, blocks="3D")
    return assemble(TextToVideoSDPipeline, dtype=dtype, **{**parts, "unet": unet})
