"""A Stable Diffusion pipeline and a CLIP vision model with tiny configs and random weights.

Built locally from configs (nothing is downloaded), small enough for a CPU in seconds: the
offline tests of :mod:`sagkit.sd.pipeline` and :mod:`sagkit.sd.clip`, the
fast mode of notebook 06 and ``sagkit sample --tiny``. Their images are noise-like (random
weights); they show the wiring, not the pictures.

    pipe = tiny_pipeline()                  # StableDiffusionPipeline, 16×16 latents, 32×32 images
    vision = tiny_clip_vision()             # CLIPVisionModelWithProjection, 32×32 input

They run without a word on stderr: prompts up to CLIP's 77 tokens fit the tokenizer, the
casts to another dtype go through :func:`cast_components`, and importing :mod:`sagkit.sd`
silences the one notice of the libraries below that says nothing about a sagkit run
(:func:`sagkit.sd.notices.quiet_processor_fallback`).
"""

from __future__ import annotations

import string

import torch

__all__ = [
    "TEXT_WIDTH",
    "tiny_tokenizer",
    "tiny_text_encoder",
    "tiny_unet",
    "tiny_unet_and_vae",
    "tiny_vae",
    "tiny_pipeline",
    "tiny_clip_vision",
    "assemble",
    "cast_components",
]

TEXT_WIDTH = 32
"""The width D of the tiny text encoder's embeddings (and the UNet's cross-attention)."""


def tiny_tokenizer(max_length: int = 77):
    """A ``CLIPTokenizer`` whose vocabulary is the lowercase letters (a word is spelled out, one
    token a letter), for sequences of ``max_length`` tokens with the start and end tokens
    (default 77, CLIP's: a prompt of up to 75 letters is not truncated)."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    letters = list(string.ascii_lowercase)
    tokens = specials + letters + [c + "</w>" for c in letters]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length
    )


def tiny_text_encoder(tokenizer, model_class, **config):
    """A random CLIP text encoder ``model_class`` (``CLIPTextModel``,
    ``CLIPTextModelWithProjection``) for ``tokenizer``'s vocabulary and sequence length: width
    :data:`TEXT_WIDTH`, 2 layers, 4 heads; ``config`` adds to or overrides its
    ``CLIPTextConfig``."""
    from transformers import CLIPTextConfig

    return model_class(
        CLIPTextConfig(
            **{
                "vocab_size": len(tokenizer),
                "hidden_size": TEXT_WIDTH,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": tokenizer.model_max_length,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": 1,
                **config,
            }
        )
    )


def tiny_unet(
    unet_class, *, latent_size: int, cross_attention_dim: int = TEXT_WIDTH, blocks: str = "2D"
):
    """A tiny random ``unet_class`` (``UNet2DConditionModel``, or ``UNet3DConditionModel`` with
    ``blocks="3D"``): 4 latent channels, widths 16 and 32, one layer a block, cross attention
    to ``cross_attention_dim`` in the outer blocks."""
    return unet_class(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=(f"CrossAttnDownBlock{blocks}", f"DownBlock{blocks}"),
        up_block_types=(f"UpBlock{blocks}", f"CrossAttnUpBlock{blocks}"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        attention_head_dim=4,
    )


def tiny_unet_and_vae(
    *, latent_size: int = 16, cross_attention_dim: int = TEXT_WIDTH, seed: int = 0
):
    """A tiny random ``UNet2DConditionModel`` (:func:`tiny_unet`) and ``AutoencoderKL``
    (:func:`tiny_vae`, images 2·``latent_size`` square), built in that order after
    ``torch.manual_seed(seed)``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = tiny_unet(
        UNet2DConditionModel, latent_size=latent_size, cross_attention_dim=cross_attention_dim
    )
    return unet, tiny_vae(latent_size=latent_size)


def tiny_vae(*, latent_size: int, **config):
    """A tiny random ``AutoencoderKL`` with 4 latent channels that halves the side once
    (images 2·``latent_size`` square); ``config`` adds to or overrides its diffusers config
    (a flow model's ``scaling_factor``, ``shift_factor``, no quant convolutions)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **{
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": (8, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "norm_num_groups": 4,
            "sample_size": 2 * latent_size,
            **config,
        }
    )


def tiny_pipeline(*, latent_size: int = 16, seed: int = 0, dtype=torch.float32):
    """A ``StableDiffusionPipeline`` of tiny random components and SD's DDIM scheduler config
    (scaled-linear β from 0.00085 to 0.012, ᾱ_final = ᾱ_0, ``steps_offset=1``), no safety
    checker. The VAE halves the side once: images are 2·``latent_size`` square."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet, vae = tiny_unet_and_vae(latent_size=latent_size, seed=seed)
    tokenizer = tiny_tokenizer()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return assemble(
        StableDiffusionPipeline,
        dtype=dtype,
        vae=vae,
        text_encoder=tiny_text_encoder(tokenizer, CLIPTextModel),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_clip_vision(*, image_size: int = 32, seed: int = 0, dtype=torch.float32):
    """A ``CLIPVisionModelWithProjection``: 8×8 patches, width 32, 4 layers, 16-d embeddings."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        projection_dim=16,
    )
    return CLIPVisionModelWithProjection(config).eval().requires_grad_(False).to(dtype)


def assemble(pipeline_class, *, dtype: torch.dtype, **components):
    """``pipeline_class(**components)`` as every tiny pipeline is finished: no progress bar,
    every module in eval mode without parameter gradients, cast to ``dtype``
    (:func:`cast_components`)."""
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return cast_components(pipe, dtype)


def cast_components(pipe, dtype: torch.dtype):
    """Cast every module of a diffusers pipeline (UNet, VAE, text encoder, ...) to ``dtype``;
    returns ``pipe``.

    The cast of ``pipe.to(dtype=dtype)``, without the warning diffusers' ``ModelMixin.to`` logs
    on every dtype cast ("modules ... that should be kept in float32: []"), even for models
    that keep no module in float32, as these: ``torch.nn.Module.to`` makes the same cast.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, dtype=dtype)
    return pipe
