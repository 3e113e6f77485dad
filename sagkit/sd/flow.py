"""Guided text-to-image sampling over diffusers' flow-matching pipelines: Stable Diffusion 3
and FLUX.

    pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=torch.bfloat16).to("cuda")
    guided = GuidedStableDiffusion3.from_pipe(pipe)
    images = guided("a lighthouse", loss_fn=StyleLoss(clip_vision, reference), n=3)

    pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.bfloat16).to("cuda")
    images = GuidedFlux.from_pipe(pipe)("a lighthouse", loss_fn=..., guidance_scale=3.5)

Both are :class:`sagkit.sd.pipeline.GuidedStableDiffusion` on a rectified flow
(docs/maths.md §11.10): the same configuration (every method, engine, window and repeat, CFG
around the negative prompt, batches, generators) and the same losses on decoded images, with

- the transformer as a model of the protocol (:class:`FlowTransformerModel`): it predicts the
  velocity v = ε − x̂0 of x_t = (1 − σ_t) x̂0 + σ_t ε, which is the model's ``velocity``;
  ``eps`` = (x + α_t v)/(α_t + σ_t) is finite at t = 1 (α = 0), where x̂0 = x − σ_t v;
- the schedule of the pipeline's ``FlowMatchEulerDiscreteScheduler``
  (:meth:`sagkit.FlowSchedule.from_diffusers`), whose σ's are the times of the base sampler;
- the text as one tensor per sample (:func:`pack_text`): the prompt embeddings (B, L, D) and
  the pooled embedding (B, P) as rows of (B, L + 1, W), so that CFG batches it and a gradient
  can be taken with respect to it like a UNet's ``encoder_hidden_states``;
- the loss L(z) = ℓ(D(z / s + b)), s and b the VAE's ``scaling_factor`` and
  ``shift_factor``.

With ``guidance="none"`` and the pipeline's scheduler, the run is the pipeline's own
denoising loop from the same initial noise. The latents are (B, C, h, w) for both; FLUX's
transformer sees them packed into 2 × 2 patches (:func:`pack_latents`) at each call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..core.checks import check_cond, check_count, check_matches, check_scale
from ..core.frames import per_sample
from ..core.models import null_cond_of, time_column, working_dtype
from ..core.schedules import FlowSchedule, is_flow_scheduler
from ..guidance.base import Timesteps
from ..guidance.config import GuidanceConfig
from .latent import vae_input
from .pipeline import CallParts, GuidedPipeline, check_embeds, check_prompts

__all__ = [
    "pack_text",
    "unpack_text",
    "pack_latents",
    "unpack_latents",
    "latent_image_ids",
    "FlowTransformerModel",
    "SD3Model",
    "FluxModel",
    "FlowPipeline",
    "GuidedStableDiffusion3",
    "GuidedFlux",
]


def pack_text(prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The conditioning of a flow transformer as one tensor (B, L + 1, W), W = max(D, P):

        cond[:, :L, :D] = prompt_embeds (B, L, D),   cond[:, L, :P] = pooled (B, P),

    zero elsewhere. CFG concatenates two such tensors along the batch, and a gradient with
    respect to ``cond`` reaches both parts (docs/maths.md §11.10).
    """
    width, pooled_width = prompt_embeds.shape[2], pooled.shape[1]
    full = max(width, pooled_width)
    text = nn.functional.pad(prompt_embeds, (0, full - width))
    row = nn.functional.pad(pooled.to(prompt_embeds.dtype), (0, full - pooled_width))
    return torch.cat([text, row[:, None]], dim=1)


def unpack_text(cond: torch.Tensor, *, width: int, pooled_width: int):
    """(prompt_embeds (B, L, D), pooled (B, P)) of ``cond`` (B, L + 1, W) (:func:`pack_text`);
    views, so gradients flow back to ``cond``."""
    return cond[:, :-1, :width], cond[:, -1, :pooled_width]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's sequence of 2 × 2 patches: (B, C, h, w) → (B, h/2 · w/2, 4C), the patch at
    (i, j) as token i·w/2 + j, its channels in the order (c, di, dj) (``FluxPipeline``'s
    packing; h and w even)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: (B, h/2 · w/2, 4C) → (B, C, h, w) for latents of
    ``height`` h and ``width`` w."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, *, device=None, dtype=None) -> torch.Tensor:
    """FLUX's position ids of the packed latent tokens, (h/2 · w/2, 3): (0, i, j) for the
    patch at (i, j) of latents h × w."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowTransformerModel(nn.Module):
    """A flow-matching transformer as a model of the protocol (docs/maths.md §11.10).

    The network predicts the velocity v = ε − x̂0 of x_t = α_t x̂0 + σ_t ε, α_t = 1 − σ_t:

        velocity(x, t, cond) = the network's output at σ_t,
        eps(x, t, cond) = (x + α_t v)/(α_t + σ_t),     x̂0 = (x − σ_t v)/(α_t + σ_t).

    The solvers, engines and guidance of a flow schedule call ``velocity`` (ε alone loses x̂0
    at t = 1, where α = 0 and ε = x).

    Args:
        transformer: the pipeline's transformer.
        scheduler: the pipeline's ``FlowMatchEulerDiscreteScheduler``; the schedule is
            :meth:`sagkit.FlowSchedule.from_diffusers` of it.
        null_cond: the conditioning used when none is given, (1, L + 1, W) or (B, L + 1, W)
            (:func:`pack_text`): the negative prompt's under CFG, or the prompts' own for a
            run without CFG.

    Half-precision weights run the network in half precision while x, ``cond``, v and ε stay
    float32, as :class:`sagkit.DiffusersModel` does (docs/maths.md §11.6).
    """

    sample_ndim = 4

    def __init__(self, transformer: nn.Module, scheduler, null_cond: torch.Tensor):
        super().__init__()
        self.transformer = transformer
        self.scheduler = scheduler
        self.schedule = FlowSchedule.from_diffusers(scheduler)
        if not isinstance(null_cond, torch.Tensor) or null_cond.ndim != 3:
            shape = tuple(null_cond.shape) if isinstance(null_cond, torch.Tensor) else null_cond
            raise ValueError(f"null_cond must have shape (1, L + 1, W), got {shape}")
        self.register_buffer("null_cond", null_cond.detach().clone())

    @property
    def text_widths(self) -> tuple[int, int]:
        """(D, P): the widths of the prompt and of the pooled embeddings."""
        config = self.transformer.config
        return config.joint_attention_dim, config.pooled_projection_dim

    @property
    def channels(self) -> int:
        """C of the latents (B, C, h, w)."""
        return self.transformer.config.in_channels

    def _check(self, x: torch.Tensor, cond):
        """Check x and cond; returns cond, the ``null_cond`` expanded when omitted."""
        if x.ndim != self.sample_ndim or x.shape[1] != self.channels:
            raise ValueError(
                f"x must have shape (B, {self.channels}, H, W) for this transformer, got "
                f"{tuple(x.shape)}"
            )
        weight = next(self.transformer.parameters())
        working = working_dtype(weight.dtype)
        if x.dtype != working:
            raise TypeError(
                f"x is {x.dtype}; this model's weights are {weight.dtype} and it takes x in "
                f"{working} (docs/maths.md §11.6)"
                + (": pass x.float()" if working != weight.dtype else "")
            )
        check_matches(x, weight.new_empty((), dtype=working), "x")
        null = null_cond_of(self)
        if cond is None:
            return null.to(x.dtype).expand(x.shape[0], *null.shape[1:])
        check_cond(cond, "cond", batch=x.shape[0])
        if cond.shape[1:] != null.shape[1:]:
            raise ValueError(
                f"cond must have shape (B, {', '.join(map(str, null.shape[1:]))}) for this "
                f"model (pack_text), got {tuple(cond.shape)}"
            )
        return cond.expand(x.shape[0], *cond.shape[1:])

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """The scheduler's timesteps σ·N for the σ's (B,), float32 as the scheduler holds
        them (``FlowMatchEulerDiscreteScheduler.timesteps``)."""
        return (sigma * self.schedule.num_train_timesteps).to(torch.float32)

    def network(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The transformer's output for x (B, C, h, w) in the network's dtype at σ (B,),
        conditioned on ``cond`` (B, L + 1, W) in the network's dtype."""
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """v(x, t) = ε − x̂0, the network's output, shape and dtype of x.

        (docs/maths.md §11.10)
        """
        cond = self._check(x, cond)
        sigma = self.schedule.sigma(time_column(t, x))
        dtype = self.transformer.dtype
        return self.network(x.to(dtype), sigma, cond.to(dtype)).to(x.dtype)

    def eps(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """ε(x, t) = (x + α_t v)/(α_t + σ_t), shape and dtype of x.

        (docs/maths.md §11.10)
        """
        v = self.velocity(x, t, cond)
        tt = time_column(t, x)
        alpha, sigma = self.schedule.alpha(tt), self.schedule.sigma(tt)
        return (x + per_sample(alpha, x) * v) / per_sample(alpha + sigma, x)


class SD3Model(FlowTransformerModel):
    """Stable Diffusion 3's ``SD3Transformer2DModel`` as a model (:class:`FlowTransformerModel`).

    It is called as ``StableDiffusion3Pipeline`` calls it: latents (B, C, h, w), the timestep
    σ·N, ``encoder_hidden_states`` the prompt embeddings (B, L, D) and
    ``pooled_projections`` (B, P), both unpacked from ``cond`` (:func:`unpack_text`).
    """

    def network(self, x, sigma, cond):
        text, pooled = unpack_text(
            cond, width=self.text_widths[0], pooled_width=self.text_widths[1]
        )
        return self.transformer(
            hidden_states=x,
            timestep=self.timesteps(sigma).to(x.device),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            return_dict=False,
        )[0]


class FluxModel(FlowTransformerModel):
    """FLUX's ``FluxTransformer2DModel`` as a model (:class:`FlowTransformerModel`).

    It is called as ``FluxPipeline`` calls it: the latents packed into 2 × 2 patches
    (:func:`pack_latents`) with their position ids (:func:`latent_image_ids`) and zero text
    ids, the timestep (σ·N)/1000 (the transformer multiplies it by 1000 again), the prompt
    embeddings and the pooled embedding unpacked from ``cond``, and, for a transformer with a
    guidance embedding (FLUX-dev), ``guidance`` = ``guidance_scale``; the output is unpacked
    to (B, C, h, w).

    Args:
        guidance_scale: the distilled guidance of a transformer with ``guidance_embeds``
            (``FluxPipeline``'s ``guidance_scale``); ignored by one without (FLUX-schnell).
    """

    def __init__(self, transformer, scheduler, null_cond, *, guidance_scale: float = 3.5):
        super().__init__(transformer, scheduler, null_cond)
        self.guidance_scale = check_scale(guidance_scale, "guidance_scale")

    @property
    def channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def network(self, x, sigma, cond):
        b, _, h, w = x.shape
        text, pooled = unpack_text(
            cond, width=self.text_widths[0], pooled_width=self.text_widths[1]
        )
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack_latents(x),
            timestep=self.timesteps(sigma).to(x.device, x.dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=x.new_zeros(text.shape[1], 3),
            img_ids=latent_image_ids(h, w, device=x.device, dtype=x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height=h, width=w)


class FlowPipeline(GuidedPipeline):
    """What guided sampling shares over diffusers' flow-matching pipelines (SD3, FLUX).

    The denoiser is the pipeline's ``transformer``; the text is encoded by the pipeline's own
    ``encode_prompt`` into one tensor per sample (:func:`pack_text`), or taken from the
    embeddings given; the loss sees the VAE's decode of z / s + b; a bare flow-matching
    scheduler as the sampler gets the arguments of the pipeline's own ``set_timesteps``
    (:meth:`configure`).

    A call (:meth:`sagkit.sd.pipeline.GuidedPipeline.__call__`) is Stable Diffusion's
    (:class:`sagkit.sd.pipeline.GuidedStableDiffusion`: latents (B, C, h, w), a ``loss_fn``
    of images) with ``cfg_scale`` defaulting to SD3's pipeline's ``guidance_scale`` (7), height
    and width multiples of f·p (f the VAE's factor, p the patch size) and ``sampler`` the
    pipeline's scheduler by default, driven as the pipeline drives it (:meth:`configure`;
    "ddim" is sagkit's uniform grid in t). It returns diffusers'
    ``StableDiffusion3PipelineOutput`` or ``FluxPipelineOutput`` (``.images``). Its own
    arguments:

    - ``num_images_per_prompt`` (default 1): images per prompt; the batch is B = prompts ×
      this;
    - ``pooled_prompt_embeds`` (B, P), with ``prompt_embeds`` (B, L, D), and
      ``negative_pooled_prompt_embeds`` (1, P), with ``negative_prompt_embeds`` (1, L, D):
      the text as embeddings (:meth:`encode`);
    - ``max_sequence_length`` (default the pipeline's): the T5 tokens (:meth:`encode`);
    - ``guidance_scale``: FLUX-dev's distilled guidance (:class:`GuidedFlux`); refused by SD3,
      whose CFG scale is ``cfg_scale``.
    """

    denoiser_name = "transformer"
    call_arguments = {
        "guidance_scale": None,
        "num_images_per_prompt": 1,
        "pooled_prompt_embeds": None,
        "negative_pooled_prompt_embeds": None,
        "max_sequence_length": None,
    }
    model_class: ClassVar[type] = FlowTransformerModel
    """The model of the pipeline's transformer."""
    mu_defaults: ClassVar[tuple[int, int, float, float]] = (256, 4096, 0.5, 1.15)
    """The pipeline's defaults of (base_image_seq_len, max_image_seq_len, base_shift,
    max_shift) where the scheduler config has none."""

    def __init__(self, pipe):
        super().__init__(pipe)
        if not is_flow_scheduler(pipe.scheduler):
            raise TypeError(
                f"pipe must be a {self.pipeline_name} with a flow-matching scheduler, got "
                f"{type(pipe.scheduler).__name__}"
            )

    @property
    def default_latent_size(self) -> int:
        """The pipeline's ``default_sample_size``."""
        return self.pipe.default_sample_size

    def model(self, null_cond: torch.Tensor, **options) -> FlowTransformerModel:
        """The transformer as a sagkit model, ``null_cond`` (:func:`pack_text`) its default
        conditioning."""
        return self.model_class(self.denoiser, self.pipe.scheduler, null_cond, **options)

    def encode_text(self, prompt, count: int, max_sequence_length: int):
        """(prompt_embeds (B·count, L, D), pooled (B·count, P)) of the prompts by the
        pipeline's ``encode_prompt``, ``count`` rows a prompt."""
        raise NotImplementedError

    def encode(
        self,
        prompt=None,
        *,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' conditioning (B, L + 1, W) and the negative prompt's (1, L + 1, W)
        (:func:`pack_text`), in :attr:`dtype` (B = prompts × ``num_images_per_prompt``).

        The text goes through the pipeline's ``encode_prompt``, or is given as embeddings:
        ``prompt_embeds`` (B, L, D) with ``pooled_prompt_embeds`` (B, P) (D the transformer's
        ``joint_attention_dim``, P its ``pooled_projection_dim``; each row serves
        ``num_images_per_prompt`` samples), and ``negative_prompt_embeds`` (1, L, D) with
        ``negative_pooled_prompt_embeds`` (1, P). The negative prompt (default "") is
        encoded once, as a prompt: it is the unconditional embedding of the whole batch.
        ``max_sequence_length``: the T5 tokens (default the pipeline's: 256 for SD3, 512 for
        FLUX).
        """
        self.check_text_embeds(
            prompt_embeds,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_pooled_prompt_embeds,
        )
        if negative_prompt_embeds is not None and negative_prompt is not None:
            raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
        prompt, _ = check_prompts(
            prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
        )
        if max_sequence_length is None:
            max_sequence_length = self.pipeline_default("max_sequence_length")
        max_sequence_length = check_count(max_sequence_length, "max_sequence_length")
        count = num_images_per_prompt
        if prompt_embeds is None:
            text, pooled = self.encode_text(prompt, count, max_sequence_length)
        else:
            text = prompt_embeds.repeat_interleave(count, dim=0)
            pooled = pooled_prompt_embeds.repeat_interleave(count, dim=0)
        if negative_prompt_embeds is None:
            negative = self.encode_text(negative_prompt or "", 1, max_sequence_length)
        else:
            negative = negative_prompt_embeds, negative_pooled_prompt_embeds
        if negative[0].shape[1] != text.shape[1]:
            raise ValueError(
                f"the negative prompt's embeddings have {negative[0].shape[1]} tokens and the "
                f"prompt's {text.shape[1]} (CFG batches the two): give negative_prompt_embeds "
                f"of {text.shape[1]} tokens, or the max_sequence_length of prompt_embeds"
            )
        cond = pack_text(text.to(self.device, self.dtype), pooled.to(self.device, self.dtype))
        null = pack_text(*(e.to(self.device, self.dtype) for e in negative))
        return cond, null

    def check_text_embeds(
        self,
        prompt_embeds,
        pooled_prompt_embeds,
        negative_prompt_embeds,
        negative_pooled_prompt_embeds,
    ) -> None:
        """Raise unless the embeddings given (:meth:`encode`) are floating tensors of the
        transformer's widths, each text's with its pooled embedding, one pooled row per row of
        ``prompt_embeds``."""
        config = self.denoiser.config
        width, pooled_width = config.joint_attention_dim, config.pooled_projection_dim
        where = "the transformer's joint_attention_dim and pooled_projection_dim"
        for name, embeds, shape in (
            ("prompt_embeds", prompt_embeds, (None, None, width)),
            ("pooled_prompt_embeds", pooled_prompt_embeds, (None, pooled_width)),
            ("negative_prompt_embeds", negative_prompt_embeds, (1, None, width)),
            ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds, (1, pooled_width)),
        ):
            check_embeds(embeds, name, shape=shape, where=where)
        for name, text, pooled in (
            ("prompt_embeds", prompt_embeds, pooled_prompt_embeds),
            ("negative_prompt_embeds", negative_prompt_embeds, negative_pooled_prompt_embeds),
        ):
            if (text is None) != (pooled is None):
                pooled_name = name.replace("prompt_embeds", "pooled_prompt_embeds")
                raise ValueError(
                    f"give {name} and {pooled_name} together (the transformer takes both)"
                )
        if prompt_embeds is not None and prompt_embeds.shape[0] != pooled_prompt_embeds.shape[0]:
            raise ValueError(
                f"pooled_prompt_embeds must have one row per prompt_embeds row, got "
                f"{tuple(pooled_prompt_embeds.shape)} for {tuple(prompt_embeds.shape)}"
            )

    def configure(self, config: GuidanceConfig, latents: torch.Tensor) -> GuidanceConfig:
        """A flow-matching scheduler as the sampler (bare, or by class name, built from the
        pipeline's scheduler config) is driven as the pipeline drives its own: in a
        :class:`~sagkit.guidance.base.Timesteps` with the arguments of the pipeline's
        ``set_timesteps`` for ``config.steps`` and these latents (:meth:`timestep_options`).
        "ddim", a ``Timesteps`` and other schedulers are left as given."""
        sampler = config.sampler
        if isinstance(sampler, str) and sampler != "ddim":
            import diffusers

            sampler = getattr(diffusers, sampler).from_config(self.pipe.scheduler.config)
        if isinstance(sampler, str) or isinstance(sampler, Timesteps):
            return config
        if not is_flow_scheduler(sampler):  # a preset's DPM-Solver: the base sampler refuses it
            return config
        options = self.timestep_options(sampler, config.steps, latents)
        return config.replace(sampler=Timesteps(sampler, options))

    def timestep_options(self, scheduler, steps: int, latents: torch.Tensor) -> dict:
        """The keyword arguments of ``set_timesteps`` in the pipeline's loop."""
        raise NotImplementedError

    def shift_mu(self, scheduler, tokens: int) -> float:
        """μ of a dynamically shifted scheduler for an image of ``tokens`` transformer tokens:
        linear in the tokens from ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at
        ``max_image_seq_len`` (diffusers' ``calculate_shift``; docs/maths.md §11.10)."""
        base_len, max_len, base_shift, max_shift = self.mu_defaults
        config = scheduler.config
        base_len = config.get("base_image_seq_len", base_len)
        max_len = config.get("max_image_seq_len", max_len)
        base_shift = config.get("base_shift", base_shift)
        max_shift = config.get("max_shift", max_shift)
        slope = (max_shift - base_shift) / (max_len - base_len)
        return tokens * slope + base_shift - slope * base_len

    def latent_shape(
        self, batch: int, *, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int, int]:
        """(B, C, h, w), h = height / f, w = width / f (f the VAE's downsampling; a side not
        given is the pipeline's ``default_sample_size``), C the latent channels."""
        h, w = self.spatial_size(height, width)
        return batch, self.latent_channels, h, w

    def latent_sizes(self, latents: torch.Tensor) -> dict:
        """``height`` and ``width`` of the images of latents (B, C, h, w): h·f and w·f."""
        factor = self.pipe.vae_scale_factor
        return {"height": latents.shape[2] * factor, "width": latents.shape[3] * factor}

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, output_type: str = "pil"):
        """The images of latents z (B, C, h, w) as diffusers' pipeline returns them: decoded
        from z / s + b and post-processed; ``output_type="latent"`` returns z itself (FLUX's
        pipeline returns its packed tokens, :func:`pack_latents` of z)."""
        if output_type == "latent":
            return self.output(z)
        vae = self.pipe.vae
        image = vae.decode(vae_input(vae, z).to(vae.dtype), return_dict=False)[0]
        return self.output(self.pipe.image_processor.postprocess(image, output_type=output_type))

    def output(self, images):
        """diffusers' output object of the pipeline holding ``images``."""
        raise NotImplementedError

    def call_parts(self, generator, *, guidance_scale, **text) -> CallParts:
        """The samples per prompt, the pooled embeddings and ``max_sequence_length`` to
        :meth:`encode`; ``guidance_scale`` to :meth:`model` (:meth:`model_options`)."""
        return CallParts(encode=text, model=self.model_options(guidance_scale))

    def model_options(self, guidance_scale: float | None) -> dict:
        """The keyword arguments of :meth:`model` for a call's ``guidance_scale``: none, as
        SD3's transformer has no distilled guidance (its CFG scale is ``cfg_scale``)."""
        if guidance_scale is not None:
            raise ValueError(
                f"guidance_scale is FLUX-dev's distilled guidance; {type(self).__name__} has "
                "none: give classifier-free guidance's w as cfg_scale"
            )
        return {}


class GuidedStableDiffusion3(FlowPipeline):
    """A diffusers ``StableDiffusion3Pipeline`` sampled with guidance.

    Build it with :meth:`from_pipe`. The pipeline's components are used as loaded (dtype,
    device); nothing is copied or downloaded.
    """

    pipeline_name = "diffusers StableDiffusion3Pipeline"
    model_class = SD3Model
    mu_defaults = (256, 4096, 0.5, 1.16)

    @property
    def latent_multiple(self) -> int:
        """The transformer's ``patch_size``."""
        return self.denoiser.config.patch_size

    def output(self, images):
        """``StableDiffusion3PipelineOutput(images=images)``."""
        from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput

        return StableDiffusion3PipelineOutput(images=images)

    def encode_text(self, prompt, count: int, max_sequence_length: int):
        """The two CLIP encoders' penultimate states side by side, zero-padded to T5's width,
        then T5's states (zeros without ``text_encoder_3``); the two pooled CLIP outputs side
        by side (``StableDiffusion3Pipeline.encode_prompt``)."""
        text, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=count,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return text, pooled

    def timestep_options(self, scheduler, steps: int, latents: torch.Tensor) -> dict:
        """μ for the image's tokens (h/p · w/p) where the scheduler shifts dynamically (SD 3.5
        configs); nothing otherwise (its own shift)."""
        if not scheduler.config.get("use_dynamic_shifting"):
            return {}
        patch = self.denoiser.config.patch_size
        tokens = (latents.shape[2] // patch) * (latents.shape[3] // patch)
        return {"mu": self.shift_mu(scheduler, tokens)}


class GuidedFlux(FlowPipeline):
    """A diffusers ``FluxPipeline`` sampled with guidance.

    Build it with :meth:`from_pipe`. The pipeline's components are used as loaded (dtype,
    device); nothing is copied or downloaded. Without a ``cfg_scale`` the sampler is the
    conditional model alone, as ``FluxPipeline`` samples by default (its guidance is distilled
    into the network: ``guidance_scale`` goes in as an input of FLUX-dev's transformer); with
    one, CFG around the negative prompt (diffusers' ``true_cfg_scale``).

    A call (:meth:`sagkit.sd.pipeline.GuidedPipeline.__call__`) takes the arguments of
    :class:`FlowPipeline`, with

    - ``guidance_scale``: the distilled guidance of FLUX-dev's transformer (default the
      pipeline's, 3.5; ignored by FLUX-schnell's);
    - ``cfg_scale`` (an option): CFG around the negative prompt (default "") with this w,
      diffusers' ``true_cfg_scale``; without it, no CFG (one network call a step);
    - height and width multiples of 2f; ``latents`` unpacked, (B, C, h, w);
    - the sampler: the pipeline's scheduler by default with ``FluxPipeline``'s σ's and μ
      (:meth:`timestep_options`).
    """

    pipeline_name = "diffusers FluxPipeline"
    model_class = FluxModel
    cfg_optional = True

    @property
    def latent_multiple(self) -> int:
        """2: the latents are packed into 2 × 2 patches."""
        return 2

    @property
    def latent_channels(self) -> int:
        """C = the transformer's ``in_channels`` / 4 (the channels of a 2 × 2 patch)."""
        return self.denoiser.config.in_channels // 4

    def output(self, images):
        """``FluxPipelineOutput(images=images)``."""
        from diffusers.pipelines.flux import FluxPipelineOutput

        return FluxPipelineOutput(images=images)

    def defaults(self, loss_fn: Callable | None = None) -> dict:
        """As :meth:`GuidedPipeline.defaults`, but no CFG (FLUX's ``guidance_scale`` is the
        distilled guidance, an input of the transformer, not w)."""
        return {**super().defaults(loss_fn), "cfg_scale": None}

    def encode_text(self, prompt, count: int, max_sequence_length: int):
        """T5's states and CLIP's pooled output (``FluxPipeline.encode_prompt``)."""
        text, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=count,
            max_sequence_length=max_sequence_length,
        )
        return text, pooled

    def timestep_options(self, scheduler, steps: int, latents: torch.Tensor) -> dict:
        """``FluxPipeline``'s: σ = linspace(1, 1/K, K) for K steps (none with
        ``use_flow_sigmas``) and μ for the h/2 · w/2 packed tokens."""
        options = {
            "mu": self.shift_mu(scheduler, (latents.shape[2] // 2) * (latents.shape[3] // 2))
        }
        if not scheduler.config.get("use_flow_sigmas"):
            options["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        return options

    def model_options(self, guidance_scale: float | None) -> dict:
        """FLUX-dev's distilled guidance input: ``guidance_scale``, by default the pipeline's
        (3.5; FLUX-schnell's transformer ignores it)."""
        if guidance_scale is None:
            guidance_scale = self.pipeline_default("guidance_scale")
        return {"guidance_scale": guidance_scale}
