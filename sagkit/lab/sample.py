"""``sagkit sample``: guided Stable Diffusion from local weights, images written as PNG.

The pipeline and the CLIP vision model are read from local folders (``--sd`` / ``--clip``,
or the environment variables ``SAGKIT_SD_PATH`` / ``SAGKIT_CLIP_PATH``), never downloaded;
``--tiny`` uses the random tiny components of :mod:`sagkit.sd.tiny` instead, to try the
command offline. The loss is :class:`sagkit.sd.clip.StyleLoss` against ``--style``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..core.device import resolve_device

__all__ = ["SD_PATH_VARIABLE", "CLIP_PATH_VARIABLE", "local_folder", "read_image", "sample"]

SD_PATH_VARIABLE = "SAGKIT_SD_PATH"
CLIP_PATH_VARIABLE = "SAGKIT_CLIP_PATH"


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


def _components(*, sd: str | None, clip: str | None, tiny: bool, dtype, device):
    """(pipeline, CLIP vision model): the tiny random ones or loaded from local folders."""
    if tiny:
        from ..sd.tiny import tiny_clip_vision, tiny_pipeline

        return tiny_pipeline(dtype=dtype).to(device), tiny_clip_vision(dtype=dtype).to(device)
    sd_path = local_folder(sd, SD_PATH_VARIABLE, "--sd", "a diffusers StableDiffusionPipeline")
    clip_path = local_folder(clip, CLIP_PATH_VARIABLE, "--clip", "a transformers CLIP model")
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(
        sd_path, torch_dtype=dtype, local_files_only=True
    ).to(device)
    vision = CLIPVisionModelWithProjection.from_pretrained(
        clip_path, torch_dtype=dtype, local_files_only=True
    )
    return pipe, vision.to(device).eval().requires_grad_(False)


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
    dtype: str | None = None,
    device=None,
    progress: bool = True,
    **options,
) -> list[Path]:
    """Sample ``num_images`` images of ``prompt`` guided towards the style of the image file
    ``style`` (no file for ``guidance="none"``); write them as PNG to ``out``; return the paths.

    ``options`` are fields of :class:`~sagkit.guidance.config.GuidanceConfig`, over the
    ``preset`` and the pipeline's defaults (:meth:`sagkit.sd.GuidedStableDiffusion.defaults`:
    SAG with a style image).

    ``dtype``: "float16" (default on CUDA), "bfloat16" or "float32" (default on the CPU), the
    weights' dtype; sagkit's latents and gradients stay float32.
    """
    from ..sd.clip import StyleLoss
    from ..sd.pipeline import GuidedStableDiffusion

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
    pipe, vision = _components(
        sd=sd, clip=clip, tiny=tiny, dtype=getattr(torch, dtype), device=device
    )
    loss = (
        None if reference is None or guidance == "none" else StyleLoss(vision, reference.to(device))
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = GuidedStableDiffusion.from_pipe(pipe)(
        prompt,
        negative_prompt,
        loss_fn=loss,
        preset=preset,
        num_images_per_prompt=num_images,
        generator=torch.Generator(device).manual_seed(seed),
        progress=progress,
        **options,
    )
    paths = []
    for i, image in enumerate(result.images):
        paths.append(out / f"{guidance or preset}-seed{seed}-{i:03d}.png")
        image.save(paths[-1])
    return paths
