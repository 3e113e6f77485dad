"""The figure functions behind the notebooks' widgets."""

import matplotlib
import pytest
import torch

import sagkit as sk
from sagkit.lab import plotting

matplotlib.use("Agg")


def test_estimate_figure_gap_shrinks_with_n(digits_mixture):
    x_T = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gaps = []
    for n in (1, 8):
        fig, gap = plotting.estimate_figure(digits_mixture, x_T, t=0.8, n=n, steps=40)
        assert len(fig.axes) == 3 and f"{gap:.3f}" in fig._suptitle.get_text()
        gaps.append(gap)
        matplotlib.pyplot.close(fig)
    assert gaps[1] < gaps[0]


def test_estimate_figure_at_the_last_step_is_exact(digits_mixture):
    """One step before the end the sampler's final step *is* the one-step estimate."""
    x_T = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    fig, gap = plotting.estimate_figure(digits_mixture, x_T, t=0.0, n=1, steps=20)
    matplotlib.pyplot.close(fig)
    assert gap == pytest.approx(0.0, abs=1e-12)


def test_misalignment_curves_and_grid(digits_mixture):
    result = sk.misalignment(
        digits_mixture,
        torch.randn(4, 1, 8, 8, dtype=torch.float64),
        times=(0.8, 0.4),
        ns=(1, 2),
        steps=10,
    )
    fig = plotting.misalignment_curves(result)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2 and len(fig.axes[1].lines) == 2
    grid = plotting.image_grid(
        [[torch.zeros(1, 8, 8)] * 3, [torch.ones(1, 8, 8)]], col_labels=list("abc")
    )
    assert len(grid.axes) == 6
