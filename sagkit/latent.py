"""Latent diffusion (Stable Diffusion and kin): the two pieces a latent model adds.

1. The loss is defined on images, the sampler runs on latents: L(z) = ℓ(D(z / s)), D the VAE
   decoder and s its ``scaling_factor``. Every gradient engine differentiates through D.
2. Text-to-image models are sampled with classifier-free guidance; inside an n-step estimate
   the guided ε̃ = ε_u + w (ε_c − ε_u) must be used too, or the estimate is not the image the
   sampler will make. :func:`latent_model` wraps the UNet so that every solve, estimate and
   gradient sees ε̃.

See docs/latent_diffusion.md for the recipe on a real pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .models import ClassifierFreeGuidance, DiffusersModel

__all__ = ["decoded_loss", "latent_model"]


def decoded_loss(vae, image_loss: Callable, scaling_factor: float | None = None) -> Callable:
    """A latent-space loss z ↦ image_loss(vae.decode(z / s).sample).

    Args:
        vae: a diffusers ``AutoencoderKL`` (or anything with ``.decode(z).sample``).
        image_loss: maps decoded images (B, 3, H, W), roughly in [-1, 1], to (B,) or a scalar.
        scaling_factor: s; by default ``vae.config.scaling_factor`` (0.18215 for SD 1.x).
    """
    s = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return image_loss(vae.decode(z / s).sample)

    return loss


def latent_model(unet, scheduler, negative_embeds: torch.Tensor, guidance_scale: float = 7.5):
    """A ``UNet2DConditionModel`` under classifier-free guidance, as a model of the protocol.

    Args:
        unet: the pipeline's UNet.
        scheduler: the pipeline's scheduler (its ``alphas_cumprod`` define the schedule).
        negative_embeds: (1, L, D) text embeddings of the empty / negative prompt.
        guidance_scale: w.
    Call it with ``cond`` = the prompt embeddings (B, L, D).
    """
    return ClassifierFreeGuidance(DiffusersModel(unet, scheduler), negative_embeds, guidance_scale)
