"""Latent diffusion (Stable Diffusion and kin): the two pieces a latent model adds.

1. The loss is defined on images, the sampler runs on latents: L(z) = ℓ(D(z / s)), D the VAE
   decoder and s its ``scaling_factor``. Every gradient engine differentiates through D.
2. Text-to-image models are sampled with classifier-free guidance; inside an n-step estimate
   the guided ε̃ = ε_u + w (ε_c − ε_u) must be used too, or the estimate is not the image the
   sampler will make. :class:`TextConditionedModel` carries the negative-prompt embeddings as
   its ``null_cond``, so :func:`sagkit.guided_sample` (with ``cond`` and ``cfg_scale``) and
   :class:`sagkit.ClassifierFreeGuidance` build ε̃ for every solve, estimate and gradient.

:class:`sagkit.sd.pipeline.GuidedStableDiffusion` puts both together over a
loaded diffusers pipeline (docs/latent_diffusion.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.models import DiffusersModel

__all__ = ["vae_input", "decoded_loss", "TextConditionedModel"]


def vae_input(vae, z: torch.Tensor, *, scaling_factor: float | None = None) -> torch.Tensor:
    """What the decoder takes for latents z: z / s + b, shape of z.

    s is ``scaling_factor``, by default ``vae.config.scaling_factor`` (0.18215 for SD 1.x); b is
    ``vae.config.shift_factor`` (SD3's and FLUX's VAEs), 0 where the VAE has none (z/s + 0 is
    exact, so SD 1.x and 2.x are unchanged).

    (docs/maths.md §11.1, §11.10)
    """
    s = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
    return z / s + float(vae.config.get("shift_factor") or 0.0)


def decoded_loss(vae, image_loss: Callable, *, scaling_factor: float | None = None) -> Callable:
    """A latent-space loss z ↦ image_loss(vae.decode(z / s + b).sample).

    Args:
        vae: a diffusers ``AutoencoderKL``.
        image_loss: maps decoded images (B, 3, H, W), roughly in [-1, 1], to (B,) or a scalar.
        scaling_factor: s; by default ``vae.config.scaling_factor`` (0.18215 for SD 1.x).
    The decoder sees :func:`vae_input` of z and runs in its weights' dtype (half precision
    included): z / s + b is cast to it and the images back to z's dtype, so ``image_loss`` and
    the gradient see z's dtype.

    (docs/maths.md §11.1)
    """

    def loss(z: torch.Tensor) -> torch.Tensor:
        decoded = vae.decode(vae_input(vae, z, scaling_factor=scaling_factor).to(vae.dtype))
        return image_loss(decoded.sample.to(z.dtype))

    return loss


class TextConditionedModel(DiffusersModel):
    """A ``UNet2DConditionModel`` with its unconditional (negative-prompt) embeddings.

    Args:
        unet: the pipeline's UNet.
        scheduler: the pipeline's scheduler (its ``alphas_cumprod`` define the schedule).
        negative_embeds: (1, L, D) text embeddings of the empty or negative prompt, kept as
            ``null_cond``.
    ``eps(x, t, cond)`` takes the prompt embeddings (B, L, D) as ``cond``.
    """

    def __init__(self, unet, scheduler, negative_embeds: torch.Tensor):
        super().__init__(unet, scheduler)
        if negative_embeds.ndim != 3 or negative_embeds.shape[0] != 1:
            raise ValueError(
                f"negative_embeds must have shape (1, L, D), got {tuple(negative_embeds.shape)}"
            )
        self.register_buffer("null_cond", negative_embeds.detach().clone())
