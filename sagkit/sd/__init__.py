"""Stable Diffusion and its losses, over diffusers pipelines and transformers CLIP models.

- :mod:`.pipeline`: :class:`~.pipeline.GuidedStableDiffusion`, guided text-to-image sampling
  over a loaded ``StableDiffusionPipeline``, with the same configuration as every sampler;
- :mod:`.latent`: the two pieces a latent model adds, the decoded loss and the text-conditioned
  UNet with its unconditional embedding;
- :mod:`.clip`: the CLIP losses of SAG's tasks (style, CLIP-I, text, aesthetic);
- :mod:`.tiny`: a tiny random pipeline and CLIP model, for offline tests and dry runs.
"""

from .pipeline import GuidedStableDiffusion

__all__ = ["GuidedStableDiffusion"]
