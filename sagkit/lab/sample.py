"""``sagkit sample``: guided Stable Diffusion from local weights, images written as PNG, or
with ``--video`` guided AnimateDiff or TextToVideoSD, videos written as animated GIF.

The pipeline and the CLIP vision model are read from local folders (``--sd`` / ``--clip``,
or the environment variables ``SAGKIT_SD_PATH`` (``SAGKIT_VIDEO_PATH`` with ``--video``) /
``SAGKIT_CLIP_PATH``), never downloaded; ``--tiny`` uses the random tiny components of
:mod:`sagkit.sd.tiny` (:mod:`sagkit.sd.tiny_video`) instead, to try the command offline. The
loss is :class:`sagkit.sd.clip.StyleLoss` against ``--style`` (on every frame of a video,
:class:`sagkit.sd.video_losses.FrameAverage`). Each image or video is written with a JSON
sidecar that reproduces it; existing files are kept unless ``--overwrite``.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.checks import check_count, check_folder
from ..core.device import resolve_device
from ..guidance.config import GuidanceConfig
from ..version import __version__

__all__ = [
    "SD_PATH_VARIABLE",
    "VIDEO_PATH_VARIABLE",
    "CLIP_PATH_VARIABLE",
    "FPS",
    "save_gif",
    "local_folder",
    "read_image",
    "output_folder",
    "sample",
]

SD_PATH_VARIABLE = "SAGKIT_SD_PATH"
VIDEO_PATH_VARIABLE = "SAGKIT_VIDEO_PATH"
CLIP_PATH_VARIABLE = "SAGKIT_CLIP_PATH"
FPS = 10
"""Frames per second of the GIFs ``sagkit sample --video`` writes (diffusers'
``export_to_gif``'s; GIF frame durations are whole hundredths of a second)."""


def local_folder(given: str | None, variable: str, option: str, what: str) -> Path:
    """The folder ``given`` (else ``$variable``), checked to exist."""
    path = given or os.environ.get(variable)
    if not path:
        raise ValueError(f"{option} (or ${variable}) is required: a local folder holding {what}")
    if not Path(path).is_dir():
        raise ValueError(f"{option}: {path!r} is not a folder (expected {what})")
    return Path(path)


def read_image(path: str | Path, *, option: str = "--style") -> torch.Tensor:
    """An image file as (3, H, W) float32 in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError) as error:
        raise ValueError(f"{option}: cannot read an image from {str(path)!r} ({error})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def save_gif(frames: list, target, *, fps: int = FPS) -> None:
    """Write PIL images as one looping animated GIF at ``fps`` frames per second to ``target``
    (a path or a binary file object)."""
    frames[0].save(
        target,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=1000 // fps,
        loop=0,
    )


def _absolute(path: str | Path) -> str:
    return str(Path(path).resolve())


def output_folder(out: str | Path, names: list[str], *, overwrite: bool = False) -> Path:
    """The folder ``out`` (:func:`~sagkit.core.checks.check_folder`), where none of the files
    ``names`` exists unless ``overwrite``; errors name ``--out``."""
    out = check_folder(out, "--out")
    taken = [name for name in names if (out / name).exists()]
    if taken and not overwrite:
        shown = ", ".join(taken[:4]) + (f" and {len(taken) - 4} more" if len(taken) > 4 else "")
        raise ValueError(
            f"--out: {shown} already exist{'s' if len(taken) == 1 else ''} in {str(out)!r}; "
            "pass --overwrite to replace them, or choose another --out"
        )
    return out


def sample(
    prompt: str,
    *,
    style: str | None,
    out: str | Path,
    preset: str | None = None,
    negative_prompt: str | None = None,
    num_images: int = 1,
    seed: int = 0,
    sd: str | None = None,
    clip: str | None = None,
    tiny: bool = False,
    video: bool = False,
    num_frames: int | None = None,
    decode_chunk_size: int | None = None,
    dtype: str | None = None,
    device=None,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> list[Path]:
    """Sample ``num_images`` images of ``prompt`` guided towards the style of the image file
    ``style`` (no file for ``guidance="none"``); write them as PNG to ``out``; return the paths.
    With ``video``, ``num_images`` videos of ``num_frames`` frames (default the pipeline's,
    16) from a video pipeline (:class:`sagkit.sd.video.GuidedVideo`, decoding
    ``decode_chunk_size`` frames at a time, default
    :data:`~sagkit.sd.video.DECODE_CHUNK_SIZE`), guided by the style loss averaged over the
    frames, written as animated GIFs at :data:`FPS` frames per second.

    Sample i is ``{guidance or preset}-seed{seed}-{i:03d}.png`` (``.gif``), beside a JSON file
    of the same stem recording what reproduces it (:meth:`_Request.record`). Existing files of
    those names are refused unless ``overwrite``.

    ``options`` are fields of :class:`~sagkit.guidance.config.GuidanceConfig`, over the
    ``preset`` and the pipeline's defaults, resolved as the pipeline resolves them
    (:func:`_generate`). ``seed``: :func:`_checked_seed`; ``dtype``: :func:`_checked_dtype`.
    """
    seed = _checked_seed(seed)
    check_count(num_images, "--num-images")
    sizes = _video_sizes(num_frames, decode_chunk_size, video=video)
    device = resolve_device(device)
    guidance, reference = _guidance_and_style(options.get("guidance"), preset, style)
    dtype = _checked_dtype(dtype, device)
    weights = None if tiny else _local_weights(sd, clip, video=video)
    stems = [f"{guidance or preset}-seed{seed}-{i:03d}" for i in range(num_images)]
    names = [stem + ext for stem in stems for ext in (_suffix(video), ".json")]
    out = output_folder(out, names, overwrite=overwrite)
    guided, vision = _components(weights, video=video, dtype=getattr(torch, dtype), device=device)
    loss, loss_entry = _style_loss(vision, reference, device=device, guidance=guidance, video=video)
    request = _Request(
        prompt, negative_prompt, seed, num_images, preset, style, weights, dtype, device
    )
    config, result = _generate(
        guided, request, loss, sizes=sizes, progress=progress, options=options
    )
    samples = result.frames if video else result.images
    frames = {**sizes, "num_frames": len(samples[0]), "fps": FPS} if video else None
    record = request.record(config, loss_entry, frames)
    return _write_samples(out, stems, samples, record, video=video)


def _checked_seed(seed) -> int:
    """``seed`` as an int: an integer in [0, 2**64) (what ``torch.Generator.manual_seed``
    takes)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"--seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _video_sizes(num_frames: int | None, decode_chunk_size: int | None, *, video: bool) -> dict:
    """The sizes a video pipeline takes (checked there): ``num_frames`` (``None``: the
    pipeline's) and ``decode_chunk_size`` (default :data:`~sagkit.sd.video.DECODE_CHUNK_SIZE`);
    none for images, which refuse them."""
    if not video:
        if num_frames is not None or decode_chunk_size is not None:
            raise ValueError("--num-frames and --decode-chunk-size need --video")
        return {}
    from ..sd.video import DECODE_CHUNK_SIZE

    chunk = DECODE_CHUNK_SIZE if decode_chunk_size is None else decode_chunk_size
    return {"num_frames": num_frames, "decode_chunk_size": chunk}


def _guidance_and_style(guidance: str | None, preset: str | None, style: str | None) -> tuple:
    """(guidance, style image): the guidance option, "sag" where neither it nor a ``preset`` is
    given, and the image file ``style`` as (3, H, W) in [-1, 1] (``None`` without one, which
    only ``guidance="none"`` may run without)."""
    if guidance is None and preset is None:
        guidance = "sag"
    if guidance != "none" and style is None:
        raise ValueError(f"--style is required for guidance {guidance!r} (or use --guidance none)")
    return guidance, None if style is None else read_image(style)


def _checked_dtype(dtype: str | None, device: torch.device) -> str:
    """The weights' dtype: "float16" (default on CUDA), "bfloat16" or "float32" (default on the
    CPU); sagkit's latents and gradients stay float32."""
    dtype = dtype or ("float16" if device.type == "cuda" else "float32")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"--dtype must be float16, bfloat16 or float32, got {dtype!r}")
    return dtype


def _local_weights(sd: str | None, clip: str | None, *, video: bool) -> tuple[Path, Path]:
    """The local folders (pipeline, CLIP vision model): ``sd`` (else ``$SAGKIT_SD_PATH``, or
    ``$SAGKIT_VIDEO_PATH`` for ``video``) and ``clip`` (else ``$SAGKIT_CLIP_PATH``)."""
    variable = VIDEO_PATH_VARIABLE if video else SD_PATH_VARIABLE
    pipeline = "a diffusers AnimateDiff or TextToVideoSD pipeline" if video else None
    sd_path = local_folder(sd, variable, "--sd", pipeline or "a diffusers StableDiffusionPipeline")
    clip_path = local_folder(clip, CLIP_PATH_VARIABLE, "--clip", "a transformers CLIP model")
    return sd_path, clip_path


def _components(weights: tuple[Path, Path] | None, *, video: bool, dtype, device):
    """(guided pipeline, CLIP vision model): the tiny random ones (``weights`` None;
    AnimateDiff's for ``video``) or loaded from the local folders ``weights`` = (pipeline,
    CLIP), the pipeline class read from its folder for ``video``; the pipeline as a
    :class:`~sagkit.sd.video.GuidedVideo` for ``video``, else a
    :class:`~sagkit.sd.pipeline.GuidedStableDiffusion`."""
    from ..sd.pipeline import GuidedStableDiffusion
    from ..sd.video import GuidedVideo

    guided = GuidedVideo if video else GuidedStableDiffusion
    if weights is None:
        from ..sd.tiny import tiny_clip_vision, tiny_pipeline
        from ..sd.tiny_video import tiny_animatediff

        pipe = (tiny_animatediff if video else tiny_pipeline)(dtype=dtype)
        return guided.from_pipe(pipe.to(device)), tiny_clip_vision(dtype=dtype).to(device)
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    pipe = (
        (DiffusionPipeline if video else StableDiffusionPipeline)
        .from_pretrained(weights[0], torch_dtype=dtype, local_files_only=True)
        .to(device)
    )
    vision = CLIPVisionModelWithProjection.from_pretrained(
        weights[1], torch_dtype=dtype, local_files_only=True
    )
    return guided.from_pipe(pipe), vision.to(device).eval().requires_grad_(False)


def _style_loss(vision, reference, *, device, guidance: str | None, video: bool) -> tuple:
    """(loss, its sidecar entry): :class:`~sagkit.sd.clip.StyleLoss` against ``reference``
    (3, H, W), on every frame for ``video`` (:class:`~sagkit.sd.video_losses.FrameAverage`);
    (None, None) without a reference or with guidance "none"."""
    if reference is None or guidance == "none":
        return None, None
    from ..sd.clip import StyleLoss
    from ..sd.video_losses import FrameAverage

    style_loss = StyleLoss(vision, reference.to(device))
    name = "FrameAverage(StyleLoss)" if video else "StyleLoss"
    loss = FrameAverage(style_loss) if video else style_loss
    return loss, {"name": name, "layer": style_loss.layer}


@dataclass(frozen=True)
class _Request:
    """What a run draws and where: the prompts, the seed and the number of samples drawn from
    it, the preset, the style image's file, the weights' folders (``None``: the tiny random
    components), the weights' dtype and the device."""

    prompt: str
    negative_prompt: str | None
    seed: int
    num_images: int
    preset: str | None
    style: str | None
    weights: tuple[Path, Path] | None
    dtype: str
    device: torch.device

    def record(self, config, loss: dict | None, frames: dict | None) -> dict:
        """What reproduces the run, for its sidecars: the prompts, the seed and ``num_images``
        (the batch drawn from the seed), the preset, every field of the resolved
        :class:`~sagkit.guidance.config.GuidanceConfig` ``config``, the ``loss`` entry, the
        style image, the weights, a video's ``frames`` (their number, decode chunk and rate;
        ``None`` for images), the dtype, the device and the sagkit version."""
        weights = "tiny"
        if self.weights is not None:
            weights = {"sd": _absolute(self.weights[0]), "clip": _absolute(self.weights[1])}
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "num_images": self.num_images,
            "preset": self.preset,
            "guidance": config.describe(),
            "loss": loss,
            "style": None if self.style is None else _absolute(self.style),
            "weights": weights,
            **({} if frames is None else {"frames": frames}),
            "dtype": self.dtype,
            "device": self.device.type,
            "sagkit": __version__,
        }


def _suffix(video: bool) -> str:
    """The samples' file suffix: animated GIF for videos, PNG for images."""
    return ".gif" if video else ".png"


def _write_samples(out: Path, stems: list[str], samples: list, record: dict, *, video: bool):
    """Sample i (a PIL image, or a video's list of frames) as ``out/<stems[i]>.png`` (``.gif``)
    beside ``out/<stems[i]>.json``: its file name, i and ``record``; returns the samples'
    paths."""
    paths = []
    for i, (stem, item) in enumerate(zip(stems, samples, strict=True)):
        paths.append(out / f"{stem}{_suffix(video)}")
        if video:
            save_gif(item, paths[-1])
        else:
            item.save(paths[-1])
        sidecar = {"video" if video else "image": paths[-1].name, "index": i, **record}
        (out / f"{stem}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return paths


def _generate(guided, request: _Request, loss, *, sizes: dict, progress: bool, options: dict):
    """(configuration, the pipeline's output) of one run of ``guided`` on ``request``.

    The prompts are encoded once, here: the configuration is resolved with their embeddings,
    and the pipeline samples from those embeddings as given (its ``encode`` passes
    ``prompt_embeds`` and ``negative_prompt_embeds`` through, without the text encoder).
    ``options`` are fields of :class:`~sagkit.guidance.config.GuidanceConfig`, over the
    ``preset`` and the pipeline's defaults (:meth:`sagkit.sd.pipeline.GuidedPipeline.defaults`:
    SAG with a style image, the pipeline's scheduler and guidance scale), resolved as the
    pipeline resolves them. ``sizes``: the video's (:func:`_video_sizes`).
    """
    cond, null = guided.encode(
        request.prompt,
        negative_prompt=request.negative_prompt,
        num_images_per_prompt=request.num_images,
    )
    config = GuidanceConfig.coerce(
        preset=request.preset,
        model=guided.model(null),
        cond=cond,
        defaults=guided.defaults(loss),
        **options,
    )
    result = guided(
        prompt_embeds=cond,
        negative_prompt_embeds=null,
        loss_fn=loss,
        config=config,
        generator=torch.Generator(request.device).manual_seed(request.seed),
        output_type="pil",
        progress=progress,
        **sizes,
    )
    return config, result
