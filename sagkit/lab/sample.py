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
from pathlib import Path

import numpy as np
import torch

from ..core.checks import check_count, check_folder
from ..core.device import resolve_device

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


def _components(weights: tuple[Path, Path] | None, *, video: bool, dtype, device):
    """(pipeline, CLIP vision model): the tiny random ones (``weights`` None; AnimateDiff's for
    ``video``) or loaded from the local folders ``weights`` = (pipeline, CLIP), the pipeline
    class read from its folder for ``video``."""
    if weights is None:
        from ..sd.tiny import tiny_clip_vision, tiny_pipeline
        from ..sd.tiny_video import tiny_animatediff

        pipe = (tiny_animatediff if video else tiny_pipeline)(dtype=dtype)
        return pipe.to(device), tiny_clip_vision(dtype=dtype).to(device)
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
    return pipe, vision.to(device).eval().requires_grad_(False)


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
    of the same stem recording what reproduces it: the prompts, the seed, i and
    ``num_images`` (the batch drawn from the seed), the preset, every field of the resolved
    :class:`~sagkit.guidance.config.GuidanceConfig`, the style image, the weights, the video's
    ``frames`` (their number, decode chunk and rate), the dtype, the device and the sagkit
    version. Existing files of those names are
    refused unless ``overwrite``.

    ``options`` are fields of :class:`~sagkit.guidance.config.GuidanceConfig`, over the
    ``preset`` and the pipeline's defaults (:meth:`sagkit.sd.pipeline.GuidedPipeline.defaults`:
    SAG with a style image, the pipeline's scheduler and guidance scale), resolved as the
    pipeline resolves them.

    ``seed``: an integer in [0, 2**64) (what ``torch.Generator.manual_seed`` takes).
    ``dtype``: "float16" (default on CUDA), "bfloat16" or "float32" (default on the CPU), the
    weights' dtype; sagkit's latents and gradients stay float32.
    """
    from .. import __version__
    from ..guidance.config import GuidanceConfig
    from ..sd.clip import StyleLoss
    from ..sd.pipeline import GuidedStableDiffusion
    from ..sd.video import DECODE_CHUNK_SIZE, GuidedVideo
    from ..sd.video_losses import FrameAverage

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"--seed must be an integer in [0, 2**64), got {seed!r}")
    seed = int(seed)
    check_count(num_images, "--num-images")
    if not video and (num_frames is not None or decode_chunk_size is not None):
        raise ValueError("--num-frames and --decode-chunk-size need --video")
    sizes = {}  # the video's, checked by the pipeline
    if video:
        chunk = DECODE_CHUNK_SIZE if decode_chunk_size is None else decode_chunk_size
        sizes = {"num_frames": num_frames, "decode_chunk_size": chunk}
    device = resolve_device(device)
    guidance = options.get("guidance")
    if guidance is None and preset is None:
        guidance = "sag"
    if guidance != "none" and style is None:
        raise ValueError(f"--style is required for guidance {guidance!r} (or use --guidance none)")
    reference = None if style is None else read_image(style)
    dtype = dtype or ("float16" if device.type == "cuda" else "float32")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"--dtype must be float16, bfloat16 or float32, got {dtype!r}")
    weights = None
    if not tiny:
        pipeline = "a diffusers AnimateDiff or TextToVideoSD pipeline" if video else None
        sd_path = local_folder(
            sd,
            VIDEO_PATH_VARIABLE if video else SD_PATH_VARIABLE,
            "--sd",
            pipeline or "a diffusers StableDiffusionPipeline",
        )
        clip_path = local_folder(clip, CLIP_PATH_VARIABLE, "--clip", "a transformers CLIP model")
        weights = sd_path, clip_path
    stems = [f"{guidance or preset}-seed{seed}-{i:03d}" for i in range(num_images)]
    suffix = ".gif" if video else ".png"
    out = output_folder(
        out, [stem + ext for stem in stems for ext in (suffix, ".json")], overwrite=overwrite
    )
    pipe, vision = _components(weights, video=video, dtype=getattr(torch, dtype), device=device)
    style_loss = loss = None
    if reference is not None and guidance != "none":
        style_loss = StyleLoss(vision, reference.to(device))
        loss = FrameAverage(style_loss) if video else style_loss
    guided = (GuidedVideo if video else GuidedStableDiffusion).from_pipe(pipe)
    cond, null = guided.encode(
        prompt, negative_prompt=negative_prompt, num_images_per_prompt=num_images
    )
    config = GuidanceConfig.resolve(
        preset=preset,
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
        generator=torch.Generator(device).manual_seed(seed),
        output_type="pil",
        progress=progress,
        **sizes,
    )
    samples = result.frames if video else result.images
    loss_name = "FrameAverage(StyleLoss)" if video else "StyleLoss"
    record = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "num_images": num_images,
        "preset": preset,
        "guidance": config.describe(),
        "loss": None if loss is None else {"name": loss_name, "layer": style_loss.layer},
        "style": None if style is None else _absolute(style),
        "weights": "tiny" if tiny else {"sd": _absolute(sd_path), "clip": _absolute(clip_path)},
        **({"frames": {**sizes, "num_frames": len(samples[0]), "fps": FPS}} if video else {}),
        "dtype": dtype,
        "device": device.type,
        "sagkit": __version__,
    }
    paths = []
    for i, (stem, item) in enumerate(zip(stems, samples, strict=True)):
        paths.append(out / f"{stem}{suffix}")
        if video:
            save_gif(item, paths[-1])
        else:
            item.save(paths[-1])
        sidecar = {"video" if video else "image": paths[-1].name, "index": i, **record}
        (out / f"{stem}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return paths
