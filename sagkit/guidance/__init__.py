"""Training-free guidance on top of the gradient engines: the guided sampler and its step rules
(:mod:`.sampler`) over a base sampler, sagkit's DDIM or any diffusers scheduler (:mod:`.base`),
the papers' presets (:mod:`.presets`), guidance losses (:mod:`.losses`), latent optimisation and
morphing (:mod:`.optimize`), the latent-diffusion pieces (:mod:`.latent`), guided Stable
Diffusion over a diffusers pipeline (:mod:`.stable_diffusion`) and the CLIP losses of its tasks
(:mod:`.clip`)."""
