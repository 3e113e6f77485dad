"""Shared fixtures: a small exact mixture and a tiny random diffusers UNet, both float64."""

import pytest
import torch
from helpers import (  # tiny_unet: also importable from here
    SCHEDULES,
    mixture_under,
    tiny_unet,
    write_style_image,
)

import sagkit as sk
from sagkit.digits.classifier import DigitsClassifier


@pytest.fixture(scope="session")
def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False)


@pytest.fixture
def unet_model(scheduler):
    """A tiny random UNet2DModel as a float64 model of the protocol, input (B, 1, 8, 8)."""
    return sk.DiffusersModel(tiny_unet().double().eval(), scheduler)


@pytest.fixture(params=list(SCHEDULES))
def mixture(request):
    """A 3-component Gaussian mixture on 2×2 images, float64, under the linear VP schedule and
    under the rectified flow (the same tests pass under both: docs/maths.md §1.5)."""
    return mixture_under(SCHEDULES[request.param])


@pytest.fixture
def digits_mixture():
    return sk.digits_mixture(n_components=64)


@pytest.fixture
def register_temporarily(request):
    """``register_temporarily(registry, name, entry)``: registered for this test only."""

    def register(registry, name, entry):
        registry.register(name, entry)
        request.addfinalizer(lambda: registry.unregister(name))

    return register


@pytest.fixture(scope="session")
def digits_model(scheduler):
    """A tiny random class-conditional UNet with an embedding table (float64, 16×16 images)."""
    unet = tiny_unet(class_embed_type="identity", sample_size=16).double().eval()
    embeddings = torch.randn(
        11, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    return sk.DigitsModel(unet.requires_grad_(False), scheduler, embeddings)


@pytest.fixture(scope="session")
def classifier():
    """A tiny random digits classifier (float64); tests of the shipped one override it."""
    torch.manual_seed(0)
    return DigitsClassifier(channels=(4, 8, 8), features=8).double().eval().requires_grad_(False)


@pytest.fixture(scope="session")
def x_T():
    """Three 16×16 noises for the tiny digits model (float64)."""
    return torch.randn(
        3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )


@pytest.fixture
def style(tmp_path):
    """A style image file for ``sagkit sample`` (:func:`helpers.write_style_image`)."""
    return write_style_image(tmp_path / "style.png")
