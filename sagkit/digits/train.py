"""Train the shipped digits models: ``sagkit train digits [--steps N] [--out DIR] [--seed S]``.

Targets: ``digits`` (both), ``digits-unet`` or ``digits-classifier``. The results go to
``DIR/digits-unet`` and ``DIR/digits-classifier``. ``--out`` is required, so that training never
overwrites the shipped weights (``sagkit.digits.models.DATA_DIR``) unless that folder is named.
Set ``OMP_NUM_THREADS`` to choose the CPU threads; training is seeded.

The UNet learns ε-prediction on continuous times: t uniform in [t_min, 1], the network
called at the float timestep t·N − 1 exactly as :class:`sagkit.DiffusersModel` calls it,
with the digit label replaced by the null class with probability ``p_uncond``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..bridges import moved_names
from ..core.checks import check_count
from ..core.models import DiffusersModel
from .classifier import DigitsClassifier
from .data import digits_dataset
from .models import DATA_DIR, DigitsModel

__all__ = ["UNET_CONFIG", "augment", "train_unet", "train_classifier"]

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D",) * 3,
    "up_block_types": ("UpBlock2D",) * 3,
    "norm_num_groups": 8,
    "class_embed_type": "identity",
}


def augment(
    x: torch.Tensor, generator: torch.Generator, rotate: float, scale: float, shift: float
) -> torch.Tensor:
    """Random affine maps of images (B, 1, S, S) in [-1, 1], background -1 outside.

    Per image: a rotation uniform in ±``rotate`` degrees, a zoom uniform in 1 ± ``scale``
    and a translation uniform in ±``shift`` pixels along each axis (bilinear resampling).
    """
    b, size = x.shape[0], x.shape[-1]

    def uniform(width, n=b):
        return (2 * torch.rand(n, generator=generator) - 1) * width

    angle, zoom = uniform(math.radians(rotate)), 1 + uniform(scale)
    cos, sin = zoom * torch.cos(angle), zoom * torch.sin(angle)
    offset = uniform(2 * shift / size, 2 * b).view(2, b)
    theta = torch.stack(
        [torch.stack([cos, -sin, offset[0]], -1), torch.stack([sin, cos, offset[1]], -1)], 1
    )
    grid = nn.functional.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x + 1, grid, align_corners=False) - 1


def _check_out(out, overwrite_shipped: bool) -> None:
    """Refuse to write into the shipped weights (``DATA_DIR``) unless asked explicitly."""
    if out is None or not str(out).strip():  # "" would be the current folder
        raise ValueError(f"out must name an output directory, got {out!r}")
    target = Path(out).resolve()
    shipped = DATA_DIR.resolve()
    if (target == shipped or shipped in target.parents) and not overwrite_shipped:
        raise ValueError(
            f"out={str(out)!r} would overwrite the shipped weights in {shipped}; pass "
            "overwrite_shipped=True (--overwrite-shipped) to do that on purpose"
        )


def _cosine_lr(optimizer, steps: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _optimiser_step(optimizer, lr_schedule, loss: torch.Tensor) -> None:
    """One update: the gradient of ``loss``, a step of ``optimizer``, then of its schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    lr_schedule.step()


def _random_batch(images: torch.Tensor, generator: torch.Generator, *, size: int, **augmentation):
    """``size`` indices drawn with replacement from ``images`` (N, 1, S, S) and those images
    through :func:`augment` with ``augmentation`` (rotate, scale, shift)."""
    idx = torch.randint(len(images), (size,), generator=generator)
    return idx, augment(images[idx], generator, **augmentation)


def _conditional_unet(config: dict, *, classes: int) -> tuple[DiffusersModel, nn.Parameter]:
    """A fresh UNet of ``config`` on the 1000-step linear DDPM schedule, and its table of class
    embeddings: one row per class and a last one, the null class."""
    from diffusers import DDPMScheduler, UNet2DModel

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    unet = UNet2DModel(**config)
    table = nn.Parameter(torch.randn(classes + 1, unet.config.block_out_channels[0] * 4))
    return DiffusersModel(unet, scheduler), table


def _denoising_loss(model, table, images, labels, generator, *, p_uncond: float, size: int):
    """The ε-prediction loss on a random augmented batch of ``size``: t uniform in [t_min, 1],
    each label replaced by the null class (the last row of ``table``) with probability
    ``p_uncond``."""
    idx, x0 = _random_batch(images, generator, size=size, rotate=5.0, scale=0.0, shift=1.0)
    null = len(table) - 1
    y = torch.where(torch.rand(size, generator=generator) < p_uncond, null, labels[idx])
    t_min = model.schedule.t_min
    t = t_min + (1 - t_min) * torch.rand(size, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator)
    alpha = model.schedule.alpha(t).float().view(-1, 1, 1, 1)
    sigma = model.schedule.sigma(t).float().view(-1, 1, 1, 1)
    return nn.functional.mse_loss(model.eps(alpha * x0 + sigma * noise, t, table[y]), noise)


@torch.no_grad()
def _update_ema(ema: list[torch.Tensor], params, *, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · params, in place."""
    torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)


def _ema_model(model: DiffusersModel, ema: list[torch.Tensor]) -> DigitsModel:
    """A copy of ``model``'s UNet with the ``ema`` weights (its last entry: the class table), as
    a :class:`~sagkit.DigitsModel` in eval mode."""
    ema_unet = copy.deepcopy(model.unet)
    with torch.no_grad():
        for p, e in zip(ema_unet.parameters(), ema[:-1], strict=True):
            p.copy_(e)
    return DigitsModel(ema_unet, model.scheduler, ema[-1]).eval()


def train_unet(
    out,
    *,
    steps: int = 3000,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    p_uncond: float = 0.12,
    ema_decay: float = 0.999,
    unet_config: dict | None = None,
    progress: bool = True,
    overwrite_shipped: bool = False,
) -> DigitsModel:
    """Train the class-conditional UNet and save its EMA weights to ``out/digits-unet``.

    Args:
        out: the output directory.
        steps: optimiser steps (AdamW, ``lr`` with 100 warm-up steps then cosine decay to 0).
        unet_config: overrides of :data:`UNET_CONFIG` (e.g. smaller channels for tests).
        overwrite_shipped: allow ``out`` to be the shipped weights' folder.
    Returns:
        The saved EMA model as a :class:`~sagkit.DigitsModel` (eval mode).
    """
    check_count(steps, "steps")
    check_count(batch_size, "batch_size")
    _check_out(out, overwrite_shipped)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = {**UNET_CONFIG, **(unet_config or {})}
    images, labels = digits_dataset("train", size=config["sample_size"])
    model, table = _conditional_unet(config, classes=int(labels.max()) + 1)
    params = [*model.unet.parameters(), table]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    lr_schedule = _cosine_lr(optimizer, steps, warmup=min(100, steps))
    ema = [p.detach().clone() for p in params]
    bar = tqdm(range(steps), desc="digits-unet", disable=not progress)
    for step in bar:
        loss = _denoising_loss(
            model, table, images, labels, gen, p_uncond=p_uncond, size=batch_size
        )
        _optimiser_step(optimizer, lr_schedule, loss)
        _update_ema(ema, params, decay=min(ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    result = _ema_model(model, ema)
    result.save_pretrained(Path(out) / "digits-unet")
    return result


def train_classifier(
    out,
    *,
    steps: int = 1000,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    config: dict | None = None,
    progress: bool = True,
    overwrite_shipped: bool = False,
) -> tuple[DigitsClassifier, float]:
    """Train the digit classifier on augmented clean images; save it to ``out/digits-classifier``.

    Args:
        out: the output directory.
        steps: optimiser steps (AdamW, ``lr`` with warm-up then cosine decay to 0).
        config: keyword arguments of :class:`~sagkit.DigitsClassifier`.
        overwrite_shipped: allow ``out`` to be the shipped weights' folder.
    Returns:
        ``(classifier, accuracy)``: the trained classifier (eval mode) and its accuracy on
        the held-out split.
    """
    check_count(steps, "steps")
    check_count(batch_size, "batch_size")
    _check_out(out, overwrite_shipped)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = digits_dataset("train")
    classifier = DigitsClassifier(**(config or {}))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.05)
    lr_schedule = _cosine_lr(optimizer, steps, warmup=min(100, steps))
    bar = tqdm(range(steps), desc="digits-classifier", disable=not progress)
    for _ in bar:
        idx, x = _random_batch(images, gen, size=batch_size, rotate=12.0, scale=0.1, shift=1.5)
        loss = nn.functional.cross_entropy(classifier(x), labels[idx], label_smoothing=0.05)
        _optimiser_step(optimizer, lr_schedule, loss)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    classifier.eval()
    test_x, test_y = digits_dataset("test")
    with torch.no_grad():
        accuracy = float((classifier(test_x).argmax(-1) == test_y).double().mean())
    classifier.save_pretrained(Path(out) / "digits-classifier")
    return classifier, accuracy


__getattr__ = moved_names(__name__)  # names that lived here in 0.2 (sagkit.bridges)
