"""benchmarks/leaderboard.py at a toy size: tuned rows, paired differences against the best,
the stored tuning read back, and the tiny Stable Diffusion wiring check."""

import json
import math

import pytest
from helpers import load_benchmark

TOY = ["--steps", "2", "--num-samples", "3", "--tune-samples", "2", "--budget", "3",
       "--batch-size", "3", "--memory-batch", "2", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def leaderboard():
    return load_benchmark("leaderboard")


def test_toy_leaderboard(leaderboard, tmp_path, monkeypatch):
    files = ["--json", str(tmp_path / "lb.json"), "--tuned", str(tmp_path / "tuned.json")]
    argv = [*TOY, "--tasks", "inpaint", "--methods", "freedom", "mpgd", *files]
    result = leaderboard.main(argv)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"none", "freedom", "mpgd"}
    tuned = json.loads((tmp_path / "tuned.json").read_text())
    for label in ("freedom", "mpgd"):
        stored = tuned["tasks"]["inpaint"][label]
        assert rows[label]["scales"] == stored["values"] and len(stored["history"]) <= 3
    best = min((r for r in rows.values() if r["guidance"] != "none"), key=lambda r: r["loss"])
    for r in rows.values():
        assert r["best"] == best["method"]
        if r is best:
            assert r["verdict"] == "best" and r["diff_vs_best"] == 0
        else:  # the paired difference of the stored per-sample losses
            d = [a - b for a, b in zip(r["per_sample"], best["per_sample"], strict=True)]
            assert r["diff_vs_best"] == pytest.approx(sum(d) / len(d), rel=1e-12)
        assert r["sec_per_sample"] > 0 and r["peak_saved_bytes"] is not None
    assert rows["freedom"]["peak_saved_bytes"] > rows["none"]["peak_saved_bytes"]
    assert json.loads((tmp_path / "lb.json").read_text())["settings"]["tuning"]["budget"] == 3
    assert "| inpaint | none |" in (tmp_path / "lb.md").read_text()

    # a second run reads the stored tuning back instead of tuning again
    def no_tuning(*args, **kwargs):
        raise AssertionError("tuned again")

    monkeypatch.setattr(leaderboard, "tune_methods", no_tuning)
    again = leaderboard.main(argv)
    assert [r["per_sample"] for r in again["rows"]] == [r["per_sample"] for r in result["rows"]]
    with pytest.raises(AssertionError, match="tuned again"):
        leaderboard.main([*argv, "--retune"])


def test_tiny_sd_is_labelled_a_wiring_check(leaderboard, tmp_path):
    argv = [*TOY, "--tiny-sd", "--methods", "freedom", "tfg", "--json", str(tmp_path / "sd.json")]
    result = leaderboard.main(argv)
    assert "wiring check only" in result["settings"]["model"]
    assert "wiring check only" in (tmp_path / "sd.md").read_text()
    assert {r["method"] for r in result["rows"]} == {"none", "freedom", "tfg"}
    assert all(math.isfinite(r["loss"]) for r in result["rows"])
