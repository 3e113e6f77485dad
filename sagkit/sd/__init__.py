"""Stable Diffusion and its losses, over diffusers pipelines and transformers CLIP models.

- :mod:`.pipeline`: :class:`~.pipeline.GuidedStableDiffusion`, guided text-to-image sampling
  over a loaded ``StableDiffusionPipeline``, with the same configuration as every sampler;
- :mod:`.video`: :class:`~.video.GuidedVideo`, the same over a loaded ``AnimateDiffPipeline``
  or ``TextToVideoSDPipeline``, the VAE decoding the frames in chunks;
- :mod:`.latent`: the two pieces a latent model adds, the decoded loss and the text-conditioned
  UNet with its unconditional embedding;
- :mod:`.clip`: the CLIP losses of SAG's tasks (style, CLIP-I, text, aesthetic);
- :mod:`.video_losses`: losses on decoded video (an image loss on every frame, temporal
  consistency);
- :mod:`.flow`: :class:`~.flow.GuidedStableDiffusion3` and :class:`~.flow.GuidedFlux`, the same
  over a loaded ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (rectified flow, velocity
  prediction);
- :mod:`.tiny`, :mod:`.tiny_video`, :mod:`.tiny_flow`: tiny random pipelines and CLIP model, for
  offline tests and dry runs;
- :mod:`.notices`: the one library notice sagkit silences, and why.
"""

from .flow import GuidedFlux, GuidedStableDiffusion3
from .notices import quiet_processor_fallback
from .pipeline import GuidedStableDiffusion
from .video import GuidedVideo

quiet_processor_fallback()  # a notice of transformers that says nothing about a sagkit run

__all__ = ["GuidedStableDiffusion", "GuidedVideo", "GuidedStableDiffusion3", "GuidedFlux"]
