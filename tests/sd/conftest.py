"""Fixtures shared by the Stable Diffusion tests: the tiny random CLIP vision model."""

import pytest
import torch

from sagkit.sd.tiny import tiny_clip_vision


@pytest.fixture(scope="session")
def vision():
    """A tiny random CLIP vision model, float64 (sagkit.sd.tiny)."""
    return tiny_clip_vision(dtype=torch.float64)
