"""Stable Diffusion 3 and FLUX pipelines with tiny configs and random weights.

Built locally from configs (nothing is downloaded), small enough for a CPU in seconds: the
offline tests of :mod:`sagkit.sd.flow`. Their images are noise-like (random weights); they show
the wiring, not the pictures. Every text encoder is there, T5 included, with letter
tokenizers (:func:`sagkit.sd.tiny.tiny_tokenizer`, :func:`tiny_t5_tokenizer`), so prompts
work offline as they do with the real pipelines.

    pipe = tiny_sd3()     # StableDiffusion3Pipeline: 2 CLIP + T5, patch 2, 8×8 latents
    pipe = tiny_flux()    # FluxPipeline: CLIP + T5, guidance embedding, 8×8 latents

The VAEs have SD3's and FLUX's ``scaling_factor`` and ``shift_factor``, and the schedulers
their configs (SD3: shift 3; FLUX: dynamic shifting), so the pipelines exercise every
convention of the real ones.
"""

from __future__ import annotations

import string

import torch

from .tiny import assemble, tiny_text_encoder, tiny_tokenizer, tiny_vae

__all__ = ["TEXT_WIDTH", "tiny_t5_tokenizer", "tiny_t5", "tiny_flow_vae", "tiny_sd3", "tiny_flux"]

TEXT_WIDTH = 32
"""The width D of the tiny T5's states (the transformers' ``joint_attention_dim``)."""

CLIP_WIDTH = 16
"""The width of the tiny CLIP text encoders (SD3 puts two side by side: 2·16 = D)."""


def tiny_t5_tokenizer():
    """A ``T5TokenizerFast`` (unigram) whose vocabulary is the lowercase letters, with and
    without the word-start mark, after ``<pad>`` (0), ``</s>`` (1) and ``<unk>`` (2)."""
    from transformers import T5TokenizerFast

    letters = list(string.ascii_lowercase)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -2.0) for c in letters] + [("▁" + c, -1.5) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_t5(vocab_size: int):
    """A ``T5EncoderModel``: width :data:`TEXT_WIDTH`, 2 layers, 4 heads."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_WIDTH,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _clip_text(tokenizer, model_class):
    """A CLIP text encoder of width :data:`CLIP_WIDTH` (projection of the same width), 2
    heads (:func:`~sagkit.sd.tiny.tiny_text_encoder`)."""
    return tiny_text_encoder(
        tokenizer,
        model_class,
        hidden_size=CLIP_WIDTH,
        num_attention_heads=2,
        projection_dim=CLIP_WIDTH,
    )


def tiny_flow_vae(*, latent_size: int, scaling_factor: float, shift_factor: float):
    """:func:`~sagkit.sd.tiny.tiny_vae` with a flow model's scale and shift and without the
    quant convolutions (as SD3's and FLUX's VAEs)."""
    return tiny_vae(
        latent_size=latent_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_sd3(*, latent_size: int = 8, seed: int = 0, dtype=torch.float32):
    """A ``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` (patch 2, 2 layers, 2
    heads of 8, text width :data:`TEXT_WIDTH`, pooled width 2·:data:`CLIP_WIDTH`), two CLIP
    text encoders with projection, a T5 encoder, a VAE with SD3's scaling 1.5305 and shift
    0.0609, and ``FlowMatchEulerDiscreteScheduler(shift=3)`` (SD3-medium's), built in that
    order after ``torch.manual_seed(seed)``."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_WIDTH,
        out_channels=4,
        pos_embed_max_size=latent_size,
    )
    tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer()
    return assemble(
        StableDiffusion3Pipeline,
        dtype=dtype,
        transformer=transformer,
        text_encoder=_clip_text(tokenizer, CLIPTextModelWithProjection),
        text_encoder_2=_clip_text(tokenizer, CLIPTextModelWithProjection),
        text_encoder_3=tiny_t5(len(t5_tokenizer)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=t5_tokenizer,
        vae=tiny_flow_vae(latent_size=latent_size, scaling_factor=1.5305, shift_factor=0.0609),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def tiny_flux(
    *, latent_size: int = 8, guidance_embeds: bool = True, seed: int = 0, dtype=torch.float32
):
    """A ``FluxPipeline``: a ``FluxTransformer2DModel`` (1 double and 1 single block, 2 heads
    of 16, text width :data:`TEXT_WIDTH`, pooled width :data:`CLIP_WIDTH`, a guidance
    embedding as FLUX-dev's unless ``guidance_embeds=False``, FLUX-schnell's), a CLIP text
    encoder, a T5 encoder, a VAE with FLUX's scaling 0.3611 and shift 0.1159, and FLUX's
    scheduler config (dynamic shifting, μ from 0.5 at 256 tokens to 1.15 at 4096), built in
    that order after ``torch.manual_seed(seed)``. ``default_sample_size`` is ``latent_size``
    (diffusers fixes it at 128, FLUX's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = assemble(
        FluxPipeline,
        dtype=dtype,
        transformer=transformer,
        text_encoder=_clip_text(tokenizer, CLIPTextModel),
        text_encoder_2=tiny_t5(len(t5_tokenizer)),
        tokenizer=tokenizer,
        tokenizer_2=t5_tokenizer,
        vae=tiny_flow_vae(latent_size=latent_size, scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=scheduler,
    )
    pipe.default_sample_size = latent_size
    return pipe
