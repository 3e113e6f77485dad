"""Guided text-to-image sampling over a loaded diffusers Stable Diffusion pipeline.

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float16).to("cuda")
    guided = GuidedStableDiffusion.from_pipe(pipe)
    images = guided("a lighthouse", loss_fn=StyleLoss(clip_vision, reference), preset="sag-paper")

:class:`GuidedStableDiffusion` runs :func:`sagkit.guided_sample` on the pipeline's components
(docs/maths.md §11.1):

- the text is encoded by the pipeline's own ``encode_prompt``; the sampler is classifier-free
  guidance ε_u + w (ε_c − ε_u) around the negative prompt's embeddings, in the base step and
  in every step of the guidance estimate;
- the base sampler is the pipeline's scheduler (or the one given, or the preset's), driven
  through its own ``set_timesteps``/``step``, from the same initial noise as the pipeline
  draws, so that ``guidance="none"`` is the pipeline's own denoising loop;
- the loss sees decoded images: L(z) = ℓ(D(z / s)) (:func:`sagkit.sd.latent.decoded_loss`),
  so the VAE decoder runs inside the guidance gradient of the guided steps only, once on x_T
  before the loop (where :func:`sagkit.guided_sample` checks the loss's output shape) and once
  at the end for the output, which goes through the pipeline's safety checker and image
  post-processing as diffusers' does (``return_losses`` adds one per step).

What the image, the video (:class:`sagkit.sd.video.GuidedVideo`) and the flow-matching
pipelines (:mod:`sagkit.sd.flow`) share is :class:`GuidedPipeline`: the one call (each
pipeline adds its own arguments, :attr:`GuidedPipeline.call_arguments`), the prompts'
embeddings, the text-conditioned model, the configuration, the initial noise and the checks
of the latents and the generator.

Precision: with half-precision weights the UNet, the decoder and a CLIP loss run in half
precision while the latents, the text embeddings used as conditions, the adjoint and the
gradients stay float32 (:class:`sagkit.DiffusersModel`; docs/maths.md §11.6).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core.checks import check_count
from ..core.models import working_dtype
from ..guidance.config import DEFAULTS, GuidanceConfig
from ..guidance.sampler import guided_sample
from .latent import TextConditionedModel, decoded_loss, vae_input

__all__ = [
    "CallParts",
    "GuidedPipeline",
    "GuidedStableDiffusion",
    "OUTPUT_TYPES",
    "check_output_type",
    "check_prompts",
    "check_embeds",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(frozen=True)
class CallParts:
    """What a pipeline's own arguments of a call add to its steps
    (:meth:`GuidedPipeline.call_parts`): the keyword arguments of each."""

    encode: dict = field(default_factory=dict)
    """Of :meth:`GuidedPipeline.encode` (the samples per prompt, more embeddings)."""
    sizes: dict = field(default_factory=dict)
    """Latent sizes besides height and width (:meth:`GuidedPipeline.latent_shape`)."""
    loss: dict = field(default_factory=dict)
    """Of :meth:`GuidedPipeline.latent_loss`."""
    model: dict = field(default_factory=dict)
    """Of :meth:`GuidedPipeline.model`."""
    decode: dict = field(default_factory=dict)
    """Of the subclass's ``decode``."""


class GuidedPipeline:
    """What guided sampling shares over a diffusers text-to-image or text-to-video pipeline.

    Build a subclass with :meth:`from_pipe`. The pipeline's components are used as loaded
    (dtype, device); nothing is copied or downloaded. A subclass gives the layout of its
    latents (:attr:`latent_dims`, :meth:`latent_shape`, :meth:`latent_sizes`), its model
    (:meth:`model`), its decoded loss, its ``decode`` and the arguments of its own
    (:attr:`call_arguments`, :meth:`call_parts`); the one :meth:`__call__` chains
    :meth:`encode`, :meth:`prepare_latents`, :meth:`sample` and ``decode``. The denoising
    network is the pipeline's attribute :attr:`denoiser_name` (a UNet, or the transformer of
    the flow-matching pipelines, :mod:`sagkit.sd.flow`).
    """

    pipeline_name: ClassVar[str] = "diffusers pipeline"
    """What ``pipe`` must be, in error messages."""
    latent_dims: ClassVar[tuple[str, ...]] = ("h", "w")
    """The names of the latents' axes after (B, C)."""
    denoiser_name: ClassVar[str] = "unet"
    """The pipeline's attribute holding the denoising network ("unet", "transformer")."""
    processor_name: ClassVar[str] = "image_processor"
    """The pipeline's attribute that post-processes the decoded output."""
    cfg_optional: ClassVar[bool] = False
    """Whether a run without ``cfg_scale`` samples the conditional model alone (FLUX, whose
    guidance is distilled into the network), rather than CFG at w = 1."""
    call_arguments: ClassVar[dict[str, object]] = {}
    """The keyword arguments of :meth:`__call__` that this pipeline adds to the common ones,
    name → default (the class's docstring says what each is); any other keyword is a field
    of :class:`~sagkit.guidance.config.GuidanceConfig`."""

    def __init__(self, pipe):
        for name in (self.denoiser_name, "vae", "scheduler", "encode_prompt", self.processor_name):
            if not hasattr(pipe, name):
                raise TypeError(
                    f"pipe must be a {self.pipeline_name}; {type(pipe).__name__} has no .{name}"
                )
        self.pipe = pipe

    @classmethod
    def from_pipe(cls, pipe):
        """The guided sampler over a loaded pipeline."""
        return cls(pipe)

    @property
    def denoiser(self):
        """The pipeline's denoising network (its UNet or transformer)."""
        return getattr(self.pipe, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the latents and of the gradients (float32 for half weights)."""
        return working_dtype(self.denoiser.dtype)

    @property
    def latent_channels(self) -> int:
        """C of the latents (B, C, …): the denoiser's ``in_channels``."""
        return self.denoiser.config.in_channels

    @property
    def latent_multiple(self) -> int:
        """The latents' height and width must be multiples of this (1; a transformer's patch
        size)."""
        return 1

    @property
    def default_latent_size(self) -> int:
        """The latents' side when no height or width is given: the denoiser's
        ``sample_size`` (diffusers' default)."""
        return self.denoiser.config.sample_size

    def pipeline_default(self, name: str):
        """The default of the pipeline's own ``__call__`` argument ``name`` (its
        ``guidance_scale``, ``output_type``)."""
        return inspect.signature(type(self.pipe).__call__).parameters[name].default

    def encode(
        self,
        prompt=None,
        *,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' embeddings (B, L, D) and the negative prompt's (1, L, D), in
        :attr:`dtype`, by the pipeline's ``encode_prompt`` (B = prompts ×
        ``num_images_per_prompt``, the samples of each prompt, images or videos).

        One negative prompt (or ``negative_prompt_embeds`` of batch 1) serves the whole batch:
        it is the model's unconditional embedding.
        """
        width = self.denoiser.config.cross_attention_dim
        for name, embeds in (
            ("prompt_embeds", prompt_embeds),
            ("negative_prompt_embeds", negative_prompt_embeds),
        ):
            check_embeds(
                embeds, name, shape=(None, None, width), where="the UNet's cross_attention_dim"
            )
        prompt, batch = check_prompts(
            prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
        )
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != 1:
            raise ValueError(
                "negative_prompt_embeds must have batch size 1 (one unconditional embedding), "
                f"got shape {tuple(negative_prompt_embeds.shape)}"
            )
        # diffusers wants one negative prompt (of prompt's type) or embedding per prompt
        if negative_prompt is not None and not isinstance(prompt, str):
            negative_prompt = [negative_prompt] * batch
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.expand(batch, -1, -1)
        cond, null = self.pipe.encode_prompt(
            prompt,
            self.device,
            num_images_per_prompt,
            True,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        return cond.to(self.dtype), null[:1].to(self.dtype)

    def model(self, negative_embeds: torch.Tensor) -> TextConditionedModel:
        """The UNet as a sagkit model, the negative embeddings (1, L, D) its ``null_cond``."""
        return TextConditionedModel(self.denoiser, self.pipe.scheduler, negative_embeds)

    def defaults(self, loss_fn: Callable | None = None) -> dict:
        """The pipeline's defaults, over sagkit's (:data:`sagkit.guidance.config.DEFAULTS`):
        the pipeline's own default ``guidance_scale`` as w (7.5 for Stable Diffusion and
        AnimateDiff, 9 for TextToVideoSD), its own scheduler as the base sampler, and no
        guidance without a ``loss_fn``. A preset's values override them."""
        return {
            **DEFAULTS,
            "cfg_scale": float(self.pipeline_default("guidance_scale")),
            "sampler": self.pipe.scheduler,
            "guidance": "sag" if loss_fn is not None else "none",
        }

    def latent_shape(self, batch: int, **sizes) -> tuple[int, ...]:
        """The shape of x_T for ``batch`` samples of the given sizes (checked)."""
        raise NotImplementedError

    def latent_sizes(self, latents: torch.Tensor) -> dict:
        """The sizes (the keywords of :meth:`latent_shape`) that latents of this shape have."""
        raise NotImplementedError

    def spatial_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(h, w) = (height, width) / f, f the VAE's downsampling, checked to be positive
        multiples of f·:attr:`latent_multiple`; a side not given is
        :attr:`default_latent_size` times f (diffusers' default)."""
        factor = self.pipe.vae_scale_factor
        multiple = factor * self.latent_multiple
        default = self.default_latent_size * factor
        height = check_count(default if height is None else height, "height")
        width = check_count(default if width is None else width, "width")
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple}, got {height}×{width}"
            )
        return height // factor, width // factor

    def initial_noise(self, batch: int, *, generator=None, **sizes) -> torch.Tensor:
        """x_T of :meth:`latent_shape`, drawn as the pipeline draws its latents (before its
        ``init_noise_sigma``): ``generator`` is ``None``, one ``torch.Generator`` or a list of
        B of them (one per sample)."""
        from diffusers.utils.torch_utils import randn_tensor

        check_count(batch, "batch")
        shape = self.latent_shape(batch, **sizes)
        _check_generator(generator, batch)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    def check_latents(self, latents, batch: int, **sizes) -> None:
        """Raise unless ``latents`` is a tensor (``batch``, C, …) of the layout
        :attr:`latent_dims`, C = :attr:`latent_channels`, every axis >= 1 (h and w multiples
        of :attr:`latent_multiple`), and each size given (not ``None``) is the one the latents
        have."""
        layout = ", ".join(self.latent_dims)
        if not isinstance(latents, torch.Tensor):
            raise TypeError(
                f"latents must be a torch.Tensor (B, C, {layout}), got {type(latents).__name__}"
            )
        channels, multiple = self.latent_channels, self.latent_multiple
        if (
            latents.ndim != 2 + len(self.latent_dims)
            or latents.shape[1] != channels
            or 0 in latents.shape[2:]
            or any(side % multiple for side in latents.shape[-2:])
        ):
            sides = f"{layout} >= 1" if multiple == 1 else f"h, w multiples of {multiple}"
            raise ValueError(
                f"latents must have shape ({batch}, {channels}, {layout}) (B, the "
                f"{self.denoiser_name}'s latent channels, {sides}), got {tuple(latents.shape)}"
            )
        if latents.shape[0] != batch:
            raise ValueError(
                f"latents must have batch size {batch} (prompts × samples per prompt), "
                f"got shape {tuple(latents.shape)}"
            )
        for name, have in self.latent_sizes(latents).items():
            given = sizes.get(name)
            if given is not None and given != have:
                raise ValueError(
                    f"{name} must be {have} for latents of shape {tuple(latents.shape)} "
                    f"(the VAE's factor {self.pipe.vae_scale_factor}), or left out; "
                    f"got {given!r}"
                )

    def prepare_latents(self, latents, batch: int, *, generator=None, **sizes) -> torch.Tensor:
        """x_T: :meth:`initial_noise` of the given sizes, or ``latents`` checked
        (:meth:`check_latents`), in :attr:`dtype` on the pipeline's device."""
        if latents is None:
            return self.initial_noise(batch, generator=generator, **sizes)
        _check_generator(generator, batch)
        self.check_latents(latents, batch, **sizes)
        return latents.to(self.device, self.dtype)

    def call_parts(self, generator, **arguments) -> CallParts:
        """What the values of this pipeline's own arguments (:attr:`call_arguments`) and the
        call's ``generator`` add to the steps of a call, checked before anything runs."""
        raise NotImplementedError

    def latent_loss(self, loss_fn: Callable) -> Callable:
        """z ↦ loss_fn(D(z / s + b)) on the pipeline's VAE (:func:`~sagkit.sd.latent.decoded_loss`);
        ``loss_fn`` takes images in [-1, 1]. A video pipeline decodes in chunks instead."""
        return decoded_loss(self.pipe.vae, loss_fn)

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | None = None,
        *,
        loss_fn: Callable | None = None,
        config: GuidanceConfig | None = None,
        preset: str | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = None,
        return_losses: bool = False,
        progress: bool = True,
        **options,
    ):
        """Guided sampling: diffusers' output of the pipeline (the class's docstring says which,
        and lists the arguments of its own, :attr:`call_arguments`), with ``return_losses`` a
        pair (output, losses).

        Args:
            prompt: a string or B strings (or ``prompt_embeds`` (B, L, D)).
            negative_prompt: one string, the unconditional branch of CFG for the whole batch
                (default ""; or ``negative_prompt_embeds`` (1, L, D)).
            loss_fn: decoded images (B, 3, H, W) or videos (B, 3, F, H, W) in [-1, 1] → (B,)
                values (:mod:`sagkit.sd.clip`); ``None`` with ``guidance="none"``.
            config: every choice of guided sampling (:meth:`sample`); not with ``preset``.
            preset: "sag-paper", "freedom-paper" or "dps-paper".
            height, width: positive multiples of f·:attr:`latent_multiple` (f the VAE's factor;
                default :attr:`default_latent_size` times f; with ``latents``, theirs).
            generator: a ``torch.Generator`` (or a list of B, one per sample, as diffusers
                accepts) for x_T; the first also drives time travel and stochastic schedulers.
            latents: x_T (B, C, …) of :attr:`latent_dims` instead of drawing it.
            output_type: "pil", "np", "pt" (in [0, 1]) or "latent"; default the pipeline's.
            return_losses: also return L along the run, (steps + 1, B)
                (:func:`sagkit.guided_sample`).
            progress: show the sampler's progress bar.
            **options: fields of :class:`~sagkit.guidance.config.GuidanceConfig` (``guidance``,
                ``steps``, ``n``, ``scale``, ``window``, ``repeats``, ``sampler`` (default the
                pipeline's scheduler), ``estimate_grid``, ``step_size``, ``backward_steps``,
                ``cfg_scale`` (default the pipeline's ``guidance_scale``), ``gradient``,
                ``reuse_eps``).
        """
        own = {name: options.pop(name, default) for name, default in self.call_arguments.items()}
        parts = self.call_parts(generator, **own)  # checked before anything runs
        output_type = self.pipeline_default("output_type") if output_type is None else output_type
        check_output_type(output_type)
        text = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        cond, null = self.encode(prompt, negative_prompt=negative_prompt, **text, **parts.encode)
        sizes = {"height": height, "width": width, **parts.sizes}
        x_T = self.prepare_latents(latents, cond.shape[0], generator=generator, **sizes)
        loss = None if loss_fn is None else self.latent_loss(loss_fn, **parts.loss)
        sampling = {"config": config, "preset": preset, "model_options": parts.model}
        run = {"generator": generator, "progress": progress, "return_losses": return_losses}
        z, losses = self.sample(x_T, cond, null, loss_fn=loss, **sampling, **run, **options)
        output = self.decode(z, output_type=output_type, **parts.decode)
        return (output, losses) if return_losses else output

    def sample(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        null: torch.Tensor,
        *,
        loss_fn: Callable | None,
        config: GuidanceConfig | None = None,
        preset: str | None = None,
        generator=None,
        progress: bool = True,
        return_losses: bool = False,
        model_options: dict | None = None,
        **options,
    ):
        """Guided sampling of latents: z from x_T = ``latents``, conditioned on ``cond``
        (B, L, D) with CFG around ``null`` (1, L, D), guided by ``loss_fn`` on latents (the
        decoded loss of the subclass); returns (z, the losses along the run or ``None``
        without ``return_losses``). ``model_options`` are keyword arguments of :meth:`model`.

        The configuration is ``config`` (the ``options`` given override its fields), or one
        resolved from :meth:`defaults`, then the ``preset`` (built from the pipeline's
        scheduler config), then the ``options``; then :meth:`configure` completes it for the
        latents. Where :attr:`cfg_optional` is set and the configuration has no
        ``cfg_scale``, the sampler is the model conditioned on ``cond`` alone, without CFG
        (one network call a step).
        """
        model = self.model(null, **(model_options or {}))
        config = GuidanceConfig.coerce(
            config,
            preset=preset,
            model=model,
            cond=cond,
            defaults=self.defaults(loss_fn),
            **options,
        )
        config = self.configure(config, latents)
        if self.cfg_optional and config.cfg_scale is None:  # cond is the model's own condition
            model, cond = self.model(cond, **(model_options or {})), None
        result = guided_sample(
            model,
            loss_fn,
            latents,
            config=config,
            cond=cond,
            generator=generator[0] if isinstance(generator, list) else generator,
            progress=progress,
            return_losses=return_losses,
        )
        return result if return_losses else (result, None)

    def configure(self, config: GuidanceConfig, latents: torch.Tensor) -> GuidanceConfig:
        """The configuration of a run on ``latents``, completed where the pipeline needs it:
        ``config`` itself here (the flow-matching pipelines give their scheduler the
        arguments of their own loop, :meth:`sagkit.sd.flow.FlowPipeline.configure`)."""
        return config


class GuidedStableDiffusion(GuidedPipeline):
    """A diffusers ``StableDiffusionPipeline`` (SD 1.x, 2.x) sampled with guidance.

    Build it with :meth:`from_pipe`. The pipeline's components are used as loaded (dtype,
    device); nothing is copied or downloaded.

    A call (:meth:`GuidedPipeline.__call__`) takes latents (B, C, h, w) (C the UNet's
    ``in_channels``), a ``loss_fn`` of images (B, 3, H, W), e.g.
    :class:`sagkit.sd.clip.StyleLoss`, and ``cfg_scale`` 7.5 by default; it returns diffusers'
    ``StableDiffusionPipelineOutput`` (``.images``, ``.nsfw_content_detected``). Its own
    argument:

    - ``num_images_per_prompt`` (default 1): images per prompt; the batch is B = prompts ×
      this.
    """

    pipeline_name = "diffusers StableDiffusionPipeline"
    call_arguments = {"num_images_per_prompt": 1}

    def latent_shape(
        self, batch: int, *, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int, int]:
        """(B, C, h, w), h = height / f, w = width / f (f the VAE's downsampling; a side not
        given is the UNet's ``sample_size``), C the UNet's ``in_channels``."""
        h, w = self.spatial_size(height, width)
        return batch, self.latent_channels, h, w

    def latent_sizes(self, latents: torch.Tensor) -> dict:
        """``height`` and ``width`` of the images of latents (B, C, h, w): h·f and w·f."""
        factor = self.pipe.vae_scale_factor
        return {"height": latents.shape[2] * factor, "width": latents.shape[3] * factor}

    def call_parts(self, generator, *, num_images_per_prompt) -> CallParts:
        """The samples per prompt to :meth:`encode`; the generator to :meth:`decode`, as
        diffusers' pipeline passes it to the VAE's decoder."""
        return CallParts(
            encode={"num_images_per_prompt": num_images_per_prompt},
            decode={"generator": generator},
        )

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, output_type: str = "pil", generator=None):
        """The images of latents z (B, C, h, w) as diffusers' pipeline returns them: decoded,
        through the safety checker (where the pipeline has one) and post-processed."""
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        if output_type == "latent":
            return StableDiffusionPipelineOutput(images=z, nsfw_content_detected=None)
        vae = self.pipe.vae
        z = vae_input(vae, z).to(vae.dtype)
        image = vae.decode(z, return_dict=False, generator=generator)[0]
        image, nsfw = self.pipe.run_safety_checker(image, self.device, vae.dtype)
        keep = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
        image = self.pipe.image_processor.postprocess(
            image, output_type=output_type, do_denormalize=keep
        )
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)


def check_output_type(output_type) -> None:
    """Raise unless ``output_type`` is one of :data:`OUTPUT_TYPES`."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def check_prompts(
    prompt, *, prompt_embeds=None, negative_prompt=None, num_images_per_prompt: int = 1
) -> tuple[str | list[str] | None, int]:
    """(prompt, B): the prompt as diffusers takes it (a string, a list, or ``None`` with
    ``prompt_embeds``) and the number of prompts B, or raise naming the argument: exactly one
    of ``prompt`` (a string or a non-empty sequence of strings) and ``prompt_embeds`` (a
    tensor (B, …), checked by the caller first with :func:`check_embeds`), one
    ``negative_prompt`` string (the unconditional embedding of the whole batch), and a
    positive ``num_images_per_prompt``."""
    if prompt is None and prompt_embeds is None:
        raise ValueError("give prompt (a string or a list of strings) or prompt_embeds")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("give prompt or prompt_embeds, not both")
    if prompt is not None and not isinstance(prompt, str):
        if not isinstance(prompt, Sequence) or not all(isinstance(p, str) for p in prompt):
            raise TypeError(f"prompt must be a string or a list of strings, got {_kind(prompt)}")
        if not prompt:
            raise ValueError("prompt must be a string or a non-empty list of strings, got []")
        prompt = list(prompt)  # diffusers takes a list, not any sequence
    check_count(num_images_per_prompt, "num_images_per_prompt")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise TypeError(
            "negative_prompt must be one string (it is the unconditional embedding of the "
            f"whole batch), got {type(negative_prompt).__name__}"
        )
    if isinstance(prompt, str):
        return prompt, 1
    return prompt, len(prompt) if prompt is not None else prompt_embeds.shape[0]


def check_embeds(embeds, name: str, *, shape: tuple, where: str) -> None:
    """Raise unless ``embeds`` is ``None`` or a floating tensor of ``shape`` (``None`` for a
    free axis, every axis >= 1); ``where`` says where the fixed sizes come from."""
    if embeds is None:
        return
    letters = ("B", "D") if len(shape) == 2 else ("B", "L", "D")
    want = (
        "("
        + ", ".join(a if n is None else str(n) for a, n in zip(letters, shape, strict=True))
        + ")"
    )
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor {want}, got {_kind(embeds)}")
    if (
        embeds.ndim != len(shape)
        or 0 in embeds.shape
        or any(n is not None and have != n for have, n in zip(embeds.shape, shape, strict=True))
    ):
        raise ValueError(f"{name} must have shape {want} ({where}), got {tuple(embeds.shape)}")


def _check_generator(generator, batch: int) -> None:
    """Raise unless ``generator`` is ``None``, one ``torch.Generator`` or a list of ``batch``
    of them (diffusers refuses a list of another length)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, list) or not all(
        isinstance(g, torch.Generator) for g in generator
    ):
        raise TypeError(
            f"generator must be a torch.Generator or a list of them, got {_kind(generator)}"
        )
    if len(generator) != batch:
        raise ValueError(
            f"generator must be one torch.Generator or a list of one per sample, got a list of "
            f"{len(generator)} for a batch of {batch} (prompts × samples per prompt)"
        )


def _kind(value) -> str:
    """The type of ``value``, and of its items for a list or tuple: "list of int"."""
    if isinstance(value, (list, tuple)) and value:
        items = sorted({type(v).__name__ for v in value})
        return f"{type(value).__name__} of {', '.join(items)}"
    return type(value).__name__
