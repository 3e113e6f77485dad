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
    result = sk.lab.misalignment(
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


def _rows():
    rows = []
    for n, a, b, c in ((2, 1.0, 1.0, 5.0), (4, 2.0, 2.0 + 1e-12, 3.0)):
        rows += [
            {"n": n, "method": "a", "v": a},
            {"n": n, "method": "b", "v": b},
            {"n": n, "method": "c", "v": c},
        ]
    return rows


def test_agreeing_groups_joins_methods_equal_at_every_n():
    assert plotting.agreeing_groups(_rows(), "v") == [["a"], ["b"], ["c"]]
    assert plotting.agreeing_groups(_rows(), "v", rtol=1e-9) == [["a", "b"], ["c"]]
    assert plotting.agreeing_groups(_rows(), "v", atol=10.0) == [["a", "b", "c"]]


def test_method_curves_draws_one_line_per_group_with_floor_and_unit():
    fig, ax = matplotlib.pyplot.subplots()
    drawn = plotting.method_curves(
        ax, _rows(), "v", groups=[["a", "b"], ["c"]], floor=0.75, unit=2.0
    )
    matplotlib.pyplot.close(fig)
    assert len(ax.lines) == 2
    ns, ys = drawn["a = b"]
    assert ns == [2, 4] and ys == [0.75, (2.0 + 1e-12) / 2]  # floored; the max of the group
    assert drawn["c"] == ([2, 4], [2.5, 1.5])


def test_method_curves_skips_groups_without_data():
    fig, ax = matplotlib.pyplot.subplots()
    drawn = plotting.method_curves(ax, _rows(), "v", groups=[["zzz"], ["c"]])
    matplotlib.pyplot.close(fig)
    assert list(drawn) == ["c"] and len(ax.lines) == 1


def test_method_curves_labels_approximate_groups_with_sep():
    fig, ax = matplotlib.pyplot.subplots()
    drawn = plotting.method_curves(ax, _rows(), "v", groups=[["a", "c"]], sep=" ≈ ")
    matplotlib.pyplot.close(fig)
    assert list(drawn) == ["a ≈ c"] and drawn["a ≈ c"][1] == [5.0, 3.0]


def test_plot_convergence_labels_its_guides_and_hides_no_line():
    from sagkit.lab.convergence import plot_convergence

    study = {
        "steps": [10, 20, 40],
        "errors": {
            "adjointdeis-1 (eps)": [0.4, 0.2, 0.1],
            "adjoint (vanilla)": [0.41, 0.2, 0.1],  # nearly the same curve
            "backprop (ddim)": [0.2, 0.1, 0.05],
        },
        "slopes": {"adjointdeis-1 (eps)": 1.0, "adjoint (vanilla)": 1.0, "backprop (ddim)": 1.0},
    }
    fig = plot_convergence(study, title="t")
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.lines]
    matplotlib.pyplot.close(fig)
    assert "guide: error ∝ M^-1" in labels and "guide: error ∝ M^-2" in labels
    vanilla = next(line for line in ax.lines if line.get_label().startswith("adjoint (vanilla)"))
    assert vanilla.get_linestyle() == "None" and vanilla.get_marker() == "x"  # crosses on top


def test_method_curves_styles_override_a_line():
    fig, ax = matplotlib.pyplot.subplots()
    plotting.method_curves(
        ax, _rows(), "v", groups=[["a"], ["c"]], styles={"c": {"marker": "x", "linestyle": "none"}}
    )
    matplotlib.pyplot.close(fig)
    a_line, c_line = ax.lines
    assert c_line.get_marker() == "x" and c_line.get_linestyle() == "None"
    assert a_line.get_marker() == "s" and a_line.get_linestyle() == "--"
