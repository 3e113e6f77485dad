"""Training-free guidance on top of the gradient engines.

- :mod:`.config`: :class:`~.config.GuidanceConfig`, every choice of a guided run;
- :mod:`.methods`: the methods as objects (FreeDoM, DPS, SAG, backward guidance), their
  estimates and step rules, and the registry :data:`~.methods.GUIDANCE`;
- :mod:`.family`: the TFG family on the same sampler (LGD, MPGD, universal guidance, TFG's
  unified step, with SAG's n-step estimate as an option), registered on import;
- :mod:`.travel`: the guidance window and time travel;
- :mod:`.sampler`: :func:`~.sampler.guided_sample`, the checked front, over the unchecked loop;
- :mod:`.base`: the base samplers, sagkit's DDIM or any diffusers scheduler;
- :mod:`.presets`: the official codes' choices;
- :mod:`.losses`: guidance losses on images.

Stable Diffusion and its CLIP losses are in :mod:`sagkit.sd`; latent optimisation through the
engines in :mod:`sagkit.gradients.optimize`.
"""

from . import family  # noqa: F401  (registers "lgd", "mpgd", "ugd", "tfg" in GUIDANCE)
