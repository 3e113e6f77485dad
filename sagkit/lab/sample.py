"""``sagkit sample``: guided Stable Diffusion from local weights, images written as PNG.

The pipeline and the CLIP vision model are read from local folders (``--sd`` / ``--clip``,
or the environment variables ``SAGKIT_SD_PATH`` / ``SAGKIT_CLIP_PATH``), never downloaded;
``--tiny`` uses the random tiny components of :mod:`sagkit.sd.tiny` instead, to try the
command offline. The loss is :class:`sagkit.sd.clip.StyleLoss` against ``--style``. Each image
is written with a JSON sidecar that reproduces it; existing files are kept unless
``--overwrite``.
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
    "CLIP_PATH_VARIABLE",
    "local_folder",
    "read_image",
    "output_folder",
    "sample",
]

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


def _components(weights: tuple[Path, Path] | None, *, dtype, device):
    """(pipeline, CLIP vision model): the tiny random ones (``weights`` None) or loaded from
    the local folders ``weights`` = (pipeline, CLIP)."""
    if weights is None:
        from ..sd.tiny import tiny_clip_vision, tiny_pipeline

        return tiny_pipeline(dtype=dtype).to(device), tiny_clip_vision(dtype=dtype).to(device)
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(
        weights[0], torch_dtype=dtype, local_files_only=True
    ).to(device)
    vision = CLIPVisionModelWithProjection.from_pretrained(
        weights[1], torch_dtype=dtype, local_files_only=True
    )
    return pipe, vision.to(device).eval().requires_grad_(False)


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
    dtype: str | None = None,
    device=None,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> list[Path]:
    """Sample ``num_images`` images of ``prompt`` guided towards the style of the image file
    ``style`` (no file for ``guidance="none"``); write them as PNG to ``out``; return the paths.

    Image i is ``{guidance or preset}-seed{seed}-{i:03d}.png``, beside a JSON file of the same
    stem recording what reproduces it: the prompts, the seed, i and ``num_images`` (the batch
    drawn from the seed), the preset, every field of the resolved
    :class:`~sagkit.guidance.config.GuidanceConfig`, the style image, the weights, the dtype,
    the device and the sagkit version. Existing files of those names are refused unless
    ``overwrite``.

    ``options`` are fields of :class:`~sagkit.guidance.config.GuidanceConfig`, over the
    ``preset`` and the pipeline's defaults (:meth:`sagkit.sd.GuidedStableDiffusion.defaults`:
    SAG with a style image), resolved as the pipeline resolves them.

    ``seed``: an integer in [0, 2**64) (what ``torch.Generator.manual_seed`` takes).
    ``dtype``: "float16" (default on CUDA), "bfloat16" or "float32" (default on the CPU), the
    weights' dtype; sagkit's latents and gradients stay float32.
    """
    from .. import __version__
    from ..guidance.config import GuidanceConfig
    from ..sd.clip import StyleLoss
    from ..sd.pipeline import GuidedStableDiffusion

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"--seed must be an integer in [0, 2**64), got {seed!r}")
    seed = int(seed)
    check_count(num_images, "--num-images")
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
        sd_path = local_folder(sd, SD_PATH_VARIABLE, "--sd", "a diffusers StableDiffusionPipeline")
        clip_path = local_folder(clip, CLIP_PATH_VARIABLE, "--clip", "a transformers CLIP model")
        weights = sd_path, clip_path
    stems = [f"{guidance or preset}-seed{seed}-{i:03d}" for i in range(num_images)]
    out = output_folder(
        out, [stem + ext for stem in stems for ext in (".png", ".json")], overwrite=overwrite
    )
    pipe, vision = _components(weights, dtype=getattr(torch, dtype), device=device)
    loss = (
        None if reference is None or guidance == "none" else StyleLoss(vision, reference.to(device))
    )
    guided = GuidedStableDiffusion.from_pipe(pipe)
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
        progress=progress,
    )
    record = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "num_images": num_images,
        "preset": preset,
        "guidance": config.describe(),
        "loss": None if loss is None else {"name": "StyleLoss", "layer": loss.layer},
        "style": None if style is None else _absolute(style),
        "weights": "tiny" if tiny else {"sd": _absolute(sd_path), "clip": _absolute(clip_path)},
        "dtype": dtype,
        "device": device.type,
        "sagkit": __version__,
    }
    paths = []
    for i, (stem, image) in enumerate(zip(stems, result.images, strict=True)):
        paths.append(out / f"{stem}.png")
        image.save(paths[-1])
        sidecar = {"image": paths[-1].name, "index": i, **record}
        (out / f"{stem}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return paths
