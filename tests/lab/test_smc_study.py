"""benchmarks/smc_study.py and sagkit.lab.smc_study: a tiny run into tmp_path, its rows and
costs, the figure, and the stored result consistent with its own rows."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import gamma, load_benchmark

from sagkit.lab.smc_study import heldout_reference, plot_smc

ROOT = Path(__file__).resolve().parents[2]
STORED = ROOT / "benchmarks" / "results" / "smc.json"
TINY = ["--components", "16", "--steps", "6", "--runs", "6", "--groups", "2",
        "--particles", "1", "3", "--steps-sweep", "4", "--sweep-particles", "3", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("smc_study")


def check_result(result: dict) -> None:
    """What every stored study satisfies, whatever its size."""
    c = result["config"]
    for task in result["tasks"].values():
        assert [(r["twist"], r["particles"]) for r in task["rows"]] == [
            (t, n) for t in c["twists"] for n in c["particles"]
        ]
        for r in task["rows"]:
            d = torch.tensor(r["distances"], dtype=torch.float64)
            assert len(d) == c["groups"]
            # the mean of `groups` float64 values, summed in another order
            assert (
                abs(r["distance"] - float(d.mean()))
                <= gamma(c["groups"], torch.float64) * r["distance"]
            )
            assert r["error"] == pytest.approx(float(d.std()) / math.sqrt(c["groups"]), rel=1e-9)
            # one network call per particle and step for the proposal (differentiated), one
            # more per particle at every time but the last for the one-step twisting
            calls = c["steps"] * r["particles"] * (2 if r["twist"] == "one-step" else 1)
            assert r["calls_per_sample"] == calls
            assert r["graph_calls_per_sample"] == c["steps"] * r["particles"]
            assert 1 - 1e-9 <= r["final_ess"] <= r["particles"] + 1e-9
        sweep = task["steps_sweep"]
        assert [r["steps"] for r in sweep] == c["steps_sweep"]
        for r in sweep:
            assert r["twist"] == "exact" and r["particles"] == c["sweep_particles"]
            assert r["calls_per_sample"] == r["steps"] * r["particles"]
        # N = 1 never resamples and its weight is never read: the twisting does not matter
        ones = [r["distance"] for r in task["rows"] if r["particles"] == 1]
        assert len(set(ones)) == 1


def test_tiny_benchmark_run(bench, tmp_path):
    out = tmp_path / "smc.json"
    bench.main([*TINY, "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"inpaint", "class"}
    check_result(result)
    # 2 twistings × 2 N, then the sweep: 4 steps and the main 6 at N = 3
    assert out.with_suffix(".md").read_text().count("| inpaint |") == 4 + 2
    assert out.with_suffix(".png").stat().st_size > 0


def test_plot_draws_a_panel_per_task_and_a_line_per_twisting():
    rows = [
        {"twist": t, "particles": n, "distance": 1.0 / n, "error": 0.01}
        for t in ("exact", "one-step")
        for n in (1, 2, 4)
    ]
    result = {
        "tasks": {
            "a": {"floor": [0.1, 0.01], "rows": rows},
            "b": {"floor": [0.1, 0.01], "rows": rows[:3]},
        }
    }
    fig = plot_smc(result)
    axes = fig.axes
    assert len(axes) == 2
    assert len(axes[0].containers) == 2 and len(axes[1].containers) == 1
    assert axes[0].get_xscale() == "log"


def test_heldout_reference_is_not_a_mean():
    import sagkit as sk

    mixture = sk.digits.digits_mixture(n_components=16)
    image, label = heldout_reference(mixture)
    gaps = (mixture.means.detach().flatten(1) - image.flatten()).norm(dim=1)
    assert float(gaps.min()) > 0 and 0 <= label <= 9


@pytest.mark.skipif(not STORED.exists(), reason="no stored study")
def test_stored_result():
    result = json.loads(STORED.read_text())
    check_result(result)
    # the stored claim: with the exact twisting, the largest N closes more than 90 % of the gap
    # between the proposal alone (N = 1) and the noise floor, on every task
    for task in result["tasks"].values():
        floor = task["floor"][0]
        exact = [r for r in task["rows"] if r["twist"] == "exact"]
        assert exact[-1]["distance"] - floor < 0.1 * (exact[0]["distance"] - floor)
