"""The functions behind notebook 04's figures and widgets, and the guidance evaluation table."""

import math

import matplotlib.pyplot as plt
import pytest
import torch
from helpers import tiny_unet
from matplotlib.figure import Figure

import sagkit as sk
from sagkit.digits.classifier import DigitsClassifier
from sagkit.guidance import losses
from sagkit.lab.evaluation import GuidanceTask, evaluate_guidance, guidance_table
from sagkit.lab.guidance_figures import guided_grid, loss_curves, method_grid, run_methods

METHODS = ("none", "freedom", "dps", "sag")


@pytest.fixture(scope="module")
def digits_model(scheduler):
    """A tiny random class-conditional UNet with an embedding table (float64, 16×16 images)."""
    unet = tiny_unet(class_embed_type="identity", sample_size=16).double().eval()
    embeddings = torch.randn(
        11, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    return sk.DigitsModel(unet.requires_grad_(False), scheduler, embeddings)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return DigitsClassifier(channels=(4, 8, 8), features=8).double().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(
        3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )


def test_widgets_return_figures(digits_model, classifier, x_T):
    fig = guided_grid(digits_model, classifier, target=2, n=2, scale=1.0, num=2, steps=4)
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * 2
    results = run_methods(
        digits_model, losses.target_class(classifier, 1), x_T, steps=4, window=(0.0, 1.0)
    )
    assert list(results) == ["none", "freedom", "sag n=3"]
    assert isinstance(method_grid(results), Figure)
    assert isinstance(loss_curves(results, window=(0.0, 1.0)), Figure)
    plt.close("all")


def test_evaluation_rows_and_table(digits_model, classifier):
    tasks = [GuidanceTask("class", losses.target_class(classifier, 3), 3)]
    rows = evaluate_guidance(
        digits_model, classifier, tasks=tasks, ns=(1, 2), num_samples=4, steps=3, batch_size=2
    )
    assert [r["method"] for r in rows] == ["none", "freedom", "dps", "sag n=1", "sag n=2"]
    for r in rows:
        assert r["per_sample"].shape == (4,) and 0 <= r["accuracy"] <= 1 and r["sec_per_sample"] > 0
        assert math.isfinite(r["loss"]) and math.isfinite(r["fd"])
    by = {r["method"]: r for r in rows}
    assert torch.equal(by["freedom"]["per_sample"], by["sag n=1"]["per_sample"])
    table = guidance_table(rows)
    assert "sag n=2" in table and len(table.splitlines()) == 2 + len(rows)
