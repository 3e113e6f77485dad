"""A small CNN digit classifier on 16×16 images in [-1, 1], for guidance losses and evaluation.

Three stages of two 3×3 convolutions (GroupNorm, SiLU), the first two followed by 2×2
average pooling, then global average pooling, one hidden layer (the feature vector) and
the logits. SiLU and average pooling keep the network smooth, so its gradients are
useful to guidance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["DigitsClassifier"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    groups = min(8, c_out)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.SiLU(),
    )


class DigitsClassifier(nn.Module):
    """A CNN classifier of (B, 1, size, size) images in [-1, 1].

    Args:
        channels: output channels of the three stages; stage i works at size / 2^i.
        features: width of the penultimate (feature) layer.
        classes: number of classes.
        size: image side length (for the config and input checks).
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 64),
        features: int = 64,
        classes: int = 10,
        size: int = 16,
    ):
        super().__init__()
        self.config = {
            "channels": list(channels),
            "features": features,
            "classes": classes,
            "size": size,
        }
        widths = (1, *channels)
        self.stages = nn.ModuleList(
            _stage(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = nn.Sequential(nn.Linear(channels[-1], features), nn.SiLU())
        self.out = nn.Linear(features, classes)

    def _check(self, x: torch.Tensor) -> None:
        size = self.config["size"]
        if x.ndim != 4 or x.shape[1:] != (1, size, size):
            raise ValueError(f"x must have shape (B, 1, {size}, {size}), got {tuple(x.shape)}")

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations after each stage: (B, C_i, size / 2^i, size / 2^i), i = 0, 1, 2."""
        self._check(x)
        maps = []
        h = x
        for i, stage in enumerate(self.stages):
            if i:
                h = nn.functional.avg_pool2d(h, 2)
            h = stage(h)
            maps.append(h)
        return maps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate feature vector, (B, features)."""
        return self.head(self.feature_maps(x)[-1].mean(dim=(2, 3)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (B, classes)."""
        return self.out(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`logits`."""
        return self.logits(x)

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (float32) to the directory ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, path / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=torch.float32) -> DigitsClassifier:
        """Load a saved classifier in eval mode with frozen parameters (requires_grad False)."""
        from safetensors.torch import load_file

        path = Path(path)
        model = cls(**json.loads((path / CONFIG_NAME).read_text()))
        model.load_state_dict(load_file(path / WEIGHTS_NAME))
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
