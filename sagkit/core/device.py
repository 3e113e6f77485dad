"""Where tensors go: CUDA when it is available, else the CPU, unless the caller says."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device=None) -> torch.device:
    """``None`` or "auto" → CUDA when available, else CPU; a name or ``torch.device`` as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
