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


@pytest.fixture
def mixture(request):
    """A 3-component Gaussian mixture on 2×2 images, float64, under the linear VP schedule.

    A test whose code runs differently under the rectified flow (the velocity frame of the
    ODE, α = 0 at t = 1) runs under both with ``helpers.BOTH_SCHEDULES`` (or parametrizes
    ``mixture`` indirectly with "vp" and "flow"): the same tests pass under both (docs/maths.md
    §1.5). Elsewhere the flow would run the same code on other numbers."""
    return mixture_under(SCHEDULES[getattr(request, "param", "vp")])


@pytest.fixture
def digits_mixture():
    return sk.digits.digits_mixture(n_components=64)


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
    return sk.digits.DigitsModel(unet.requires_grad_(False), scheduler, embeddings)


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


def pytest_collection_modifyitems(config, items):
    """Run the files holding a ``slow`` test first, each file's tests still together and in
    order (module fixtures are built once): the longest tests then start first, so that the
    workers of ``pytest -n`` (``make test``) do not wait at the end for one of them."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order otherwise kept
