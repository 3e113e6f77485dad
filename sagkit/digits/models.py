"""The shipped models: a class-conditional digits UNet and a digits classifier, with their data.

    model = sk.digits.load_pretrained("digits")           # a DigitsModel (a sk.DiffusersModel)
    clf = sk.digits.load_classifier("digits")              # a DigitsClassifier, frozen
    x = sample_digits(model, [3, 7], scale=2.0)     # (2, 1, 16, 16) in about [-1, 1]

Both were trained by ``sagkit train digits`` on ``digits_dataset("train")``,
scikit-learn's 8×8 digits upsampled to 16×16. The UNet is conditioned through a continuous
embedding vector (``class_embed_type="identity"``), so gradients with respect to the
conditioning exist; a learned table holds one vector per digit plus a null class for
unconditional sampling and classifier-free guidance.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch
from torch import nn

from ..core.checks import check_count, check_scale
from ..core.device import resolve_device
from ..core.models import ClassifierFreeGuidance, DiffusersModel
from ..core.registry import Registry
from ..core.schedules import time_grid
from ..core.solvers import solve
from .classifier import DigitsClassifier

__all__ = [
    "DATA_DIR",
    "PRETRAINED",
    "CLASSIFIERS",
    "DigitsModel",
    "load_pretrained",
    "load_classifier",
    "sample_digits",
]

# The weights are package data of sagkit.digits (weights/<folder>/), so a wheel carries them.
DATA_DIR = Path(str(files("sagkit.digits") / "weights"))
EMBEDDINGS_NAME = "class_embeddings.safetensors"


class DigitsModel(DiffusersModel):
    """A class-conditional ``UNet2DModel`` with a table of conditioning embeddings.

    Args:
        unet: a ``UNet2DModel`` with ``class_embed_type="identity"``.
        scheduler: the diffusers scheduler it was trained with.
        embeddings: (classes + 1, E) conditioning vectors; the last row is the null class.
            E is the UNet's time-embedding width.
    The network parameters and the table are frozen (requires_grad False); differentiate
    with respect to ``cond`` (a tensor from :meth:`cond_for`, made to require grad) or call
    ``requires_grad_()``.
    """

    def __init__(self, unet: nn.Module, scheduler, embeddings: torch.Tensor):
        super().__init__(unet, scheduler)
        self.scheduler = scheduler
        self.register_buffer("embeddings", torch.as_tensor(embeddings).detach().clone())
        self.classes = self.embeddings.shape[0] - 1

    def cond_for(self, labels) -> torch.Tensor:
        """The conditioning vectors (B, E) for integer labels (B,) in 0..classes (classes = null)."""
        labels = torch.atleast_1d(torch.as_tensor(labels, device=self.embeddings.device))
        if labels.is_floating_point() or labels.ndim != 1:
            raise ValueError(
                f"labels must be a 1-D integer tensor, got {labels.dtype}, {tuple(labels.shape)}"
            )
        if labels.numel() and not bool(((labels >= 0) & (labels <= self.classes)).all()):
            raise ValueError(f"labels must lie in 0..{self.classes}, got {labels.tolist()}")
        return self.embeddings[labels]

    @property
    def null_cond(self) -> torch.Tensor:
        """The null-class (unconditional) vector, (1, E)."""
        return self.embeddings[self.classes :]

    def save_pretrained(self, path) -> None:
        """Write the UNet (``save_pretrained``), the scheduler config and the table to ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        self.unet.save_pretrained(path)
        self.scheduler.save_pretrained(path)
        save_file({"embeddings": self.embeddings.detach().float().cpu()}, path / EMBEDDINGS_NAME)

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=torch.float32) -> DigitsModel:
        """Load what :meth:`save_pretrained` wrote, with diffusers' ``from_pretrained``, offline."""
        from diffusers import DDPMScheduler, UNet2DModel
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / EMBEDDINGS_NAME).is_file():
            raise FileNotFoundError(f"no saved digits model in {path}")
        unet = UNet2DModel.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(path, local_files_only=True)
        model = cls(unet, scheduler, load_file(path / EMBEDDINGS_NAME)["embeddings"])
        return model.to(device=resolve_device(device), dtype=dtype).eval().requires_grad_(False)


PRETRAINED: Registry[tuple[type, str]] = Registry("pretrained model")
"""Shipped diffusion models: name → (class, folder under :data:`DATA_DIR`)."""
PRETRAINED.register("digits", (DigitsModel, "digits-unet"))
CLASSIFIERS: Registry[tuple[type, str]] = Registry("classifier")
"""Shipped classifiers: name → (class, folder under :data:`DATA_DIR`)."""
CLASSIFIERS.register("digits", (DigitsClassifier, "digits-classifier"))


def _load(registry: Registry, name: str, device, dtype, path):
    cls, folder = registry[name]
    folder = DATA_DIR / folder if path is None else path
    return cls.from_pretrained(folder, device=resolve_device(device), dtype=dtype)


def load_pretrained(name: str, *, device=None, dtype=torch.float32, path=None) -> DigitsModel:
    """A shipped diffusion model (``"digits"``), in eval mode with frozen parameters.

    Args:
        name: the model's name.
        device: where to put it; ``None`` means CUDA when available, else CPU.
        dtype: float32 or float64.
        path: load from this directory instead of the shipped weights (``DATA_DIR``).
    """
    return _load(PRETRAINED, name, device, dtype, path)


def load_classifier(name: str, *, device=None, dtype=torch.float32, path=None) -> DigitsClassifier:
    """A shipped classifier (``"digits"``), in eval mode with frozen parameters.

    Arguments as for :func:`load_pretrained`.
    """
    return _load(CLASSIFIERS, name, device, dtype, path)


@torch.no_grad()
def sample_digits(
    model: DigitsModel, labels, *, scale: float = 1.0, steps: int = 50, generator=None
) -> torch.Tensor:
    """Class-conditional samples with classifier-free guidance and DDIM.

    Args:
        model: a :class:`DigitsModel`.
        labels: (B,) digits (``model.classes`` samples unconditionally).
        scale: the guidance scale w (1: the conditional model).
        steps: DDIM steps from t = 1 to the schedule's ``t_min``.
        generator: a CPU ``torch.Generator`` for the initial noise.
    Returns:
        (B, 1, S, S) samples in the model's dtype and device.
    """
    scale = check_scale(scale, "scale")
    check_count(steps, "steps")
    if torch.as_tensor(labels).numel() < 1:
        raise ValueError("labels must hold at least one digit (an empty batch was given)")
    cond = model.cond_for(labels)
    size = model.unet.config.sample_size
    x = torch.randn((cond.shape[0], 1, size, size), generator=generator, dtype=torch.float64)
    guided = ClassifierFreeGuidance(model, model.null_cond, scale)
    ts = time_grid(model.schedule, 1.0, model.schedule.t_min, steps)
    return solve(guided, x.to(cond), ts, solver="ddim", cond=cond)
