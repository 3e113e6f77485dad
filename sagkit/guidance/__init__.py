"""Training-free guidance on top of the gradient engines: the guided sampler and its step rules
(:mod:`.sampler`) over a base sampler, sagkit's DDIM or any diffusers scheduler (:mod:`.base`),
the papers' presets (:mod:`.presets`), guidance losses (:mod:`.losses`), latent optimisation and
morphing (:mod:`.optimize`) and the latent-diffusion pieces (:mod:`.latent`)."""
