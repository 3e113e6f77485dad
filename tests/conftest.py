"""Shared fixtures: a small exact mixture and a tiny random diffusers UNet, both float64."""

import pytest
import torch
from helpers import tiny_unet, write_style_image  # tiny_unet: also importable from here

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


@pytest.fixture
def mixture():
    """A 3-component Gaussian mixture on 2×2 images, float64, linear schedule."""
    means = torch.tensor(
        [[[1.0, -0.5], [0.3, 0.8]], [[-1.0, 0.2], [0.5, -0.7]], [[0.0, 0.9], [-0.8, 0.1]]]
    )
    return sk.GaussianMixture(
        means[:, None].double(), 0.3, sk.VPSchedule.linear(), weights=[0.5, 0.3, 0.2]
    )


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
