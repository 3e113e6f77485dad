"""benchmarks/judged_leaderboard.py: at a toy size, the realism baseline measured on its own
(larger) unguided set, no infeasible candidate chosen where a feasible one was found, rows
infeasible at evaluation marked and ranked after the feasible ones, and the paired
comparisons of SAG against its one-step baseline; the stored results consistent with their
own rows; and the hooks it uses (``keep_samples``, ``measure``)."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import gamma, load_benchmark

from sagkit.lab.evaluation import default_tasks, evaluate_guidance
from sagkit.lab.tuning import Tunable, tune_methods

ROOT = Path(__file__).resolve().parents[2]
STORED = ROOT / "benchmarks" / "results" / "judged_leaderboard.json"
# 4 steps: few enough to be quick, enough that large scales fail the realism check
TOY = ["--steps", "4", "--num-samples", "3", "--tune-samples", "3", "--base-samples", "5",
       "--budget", "3", "--batch-size", "3", "--methods", "freedom", "sag n=3", "mpgd",
       "--quiet"]  # fmt: skip
ROW_FIELDS = {
    "judge_rank", "task", "method", "guidance", "scales", "tuned_feasible", "loss", "loss_se",
    "judge_accuracy", "judge_se", "classifier_accuracy", "realism", "feasible", "fd",
    "sec_per_sample", "loss_only_rank", "per_sample",
}  # fmt: skip
PAIR_FIELDS = {
    "task", "method", "baseline", "n", "mean", "se", "better", "worse", "method_feasible",
    "baseline_feasible",
}  # fmt: skip


@pytest.fixture(scope="module")
def judged():
    return load_benchmark("judged_leaderboard")


def check_result(judged, result: dict, loss_only: dict) -> None:
    """What every judged leaderboard satisfies, whatever its size."""
    s = result["settings"]
    n = s["num_samples"]
    t = s["tuning"]
    base_n = t["unguided_samples"]
    assert base_n >= t["tune_samples"]  # a superset of every candidate's tuning samples
    assert set(t["unguided_realism"]) == set(s["tasks"]) == set(result["tuning"])
    assert set(s["evaluation_unguided_realism"]) == set(s["tasks"])
    assert [r["task"] for r in result["rows"]] == sorted(
        (r["task"] for r in result["rows"]), key=s["tasks"].index
    )
    expected_loss_only = judged.loss_only_ranks(loss_only)
    for task in s["tasks"]:
        rows = [r for r in result["rows"] if r["task"] == task]
        assert {r["method"] for r in rows} == {"none", *result["tuning"][task]}
        none = next(r for r in rows if r["method"] == "none")
        assert none["realism"] == s["evaluation_unguided_realism"][task] and none["feasible"]
        good = [r for r in rows if r["feasible"]]
        for r in rows:
            assert set(r) == ROW_FIELDS
            correct, realistic = r["per_sample"]["judge_correct"], r["per_sample"]["realistic"]
            assert len(correct) == len(realistic) == len(r["per_sample"]["loss"]) == n
            assert r["judge_accuracy"] == sum(correct) / n and r["realism"] == sum(realistic) / n
            assert r["judge_se"] == pytest.approx(judged.standard_error(torch.tensor(correct)))
            losses = torch.tensor(r["per_sample"]["loss"], dtype=torch.float64)
            # the stored mean and this one sum the same n float64 values in other orders
            assert abs(r["loss"] - float(losses.mean())) <= 2 * gamma(n, torch.float64) * float(
                losses.abs().mean()
            )
            # the constraint at evaluation: against the unguided row on the same seeds
            assert r["feasible"] == judged.feasible(
                sum(realistic),
                n,
                sum(none["per_sample"]["realistic"]),
                n,
                slack=s["slack_points"],
            )
            # feasible rows first, each group ranked by the judge, ties sharing
            group = [o for o in rows if o["feasible"] == r["feasible"]]
            higher = sum(o["judge_accuracy"] > r["judge_accuracy"] for o in group)
            offset = 0 if r["feasible"] else len(good)
            assert r["judge_rank"] == 1 + offset + higher
            assert r["loss_only_rank"] == expected_loss_only.get((task, r["method"]))
        assert [r["judge_rank"] for r in rows] == sorted(r["judge_rank"] for r in rows)
        assert [r["feasible"] for r in rows] == sorted((r["feasible"] for r in rows), reverse=True)
        base = t["unguided_realism"][task]
        base_passed = round(base * base_n)
        assert base == base_passed / base_n
        for label, entry in result["tuning"][task].items():
            row = next(r for r in rows if r["method"] == label)
            assert row["scales"] == entry["values"]
            history = entry["history"]
            for h in history:  # the constraint as documented, and the score it gives
                ok = judged.feasible(
                    round(h["realism"] * t["tune_samples"]),
                    t["tune_samples"],
                    base_passed,
                    base_n,
                    slack=s["slack_points"],
                )
                assert h["feasible"] == ok
                tie = (1 - h["realism"]) / (s["tuning"]["tune_samples"] + 1)
                assert h["score"] == (
                    1 - h["judge_accuracy"] + tie if ok else 2 + (base - h["realism"])
                )
            chosen = next(h for h in history if h["values"] == entry["values"])
            assert row["tuned_feasible"] == chosen["feasible"]
            # never an infeasible candidate where a feasible one was evaluated
            assert chosen["feasible"] or not any(h["feasible"] for h in history)
            feasible = [h for h in history if h["feasible"]] or history
            assert chosen["score"] == min(h["score"] for h in feasible)
    expected_pairs = [
        (task, m, b)
        for task in s["tasks"]
        for m, b in judged.PAIRS
        if {m, b} <= set(result["tuning"][task])
    ]
    assert [(c["task"], c["method"], c["baseline"]) for c in result["paired"]] == expected_pairs
    for c in result["paired"]:
        assert set(c) == PAIR_FIELDS
        by = {r["method"]: r for r in result["rows"] if r["task"] == c["task"]}
        a, b = (by[c[k]]["per_sample"]["judge_correct"] for k in ("method", "baseline"))
        diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
        assert c["n"] == n and c["mean"] == pytest.approx(float(diff.mean()))
        assert c["mean"] == pytest.approx(
            by[c["method"]]["judge_accuracy"] - by[c["baseline"]]["judge_accuracy"]
        )
        assert c["se"] == pytest.approx(judged.standard_error(diff))
        assert (c["better"], c["worse"]) == (int((diff > 0).sum()), int((diff < 0).sum()))
        assert c["method_feasible"] == by[c["method"]]["feasible"]
        assert c["baseline_feasible"] == by[c["baseline"]]["feasible"]
    md = judged.markdown(result)
    for task in s["tasks"]:
        guided = [r for r in result["rows"] if r["task"] == task and r["method"] != "none"]
        met = sum(r["feasible"] for r in guided)
        assert f"- {task}: {met} of {len(guided)} guided methods met the constraint." in md
    assert md.count("| **infeasible** |") == sum(not r["feasible"] for r in result["rows"])


def test_toy_judged_leaderboard(judged, tmp_path):
    path = tmp_path / "judged.json"
    # with shard files: the unguided baseline's tuning shards ([0, 3), [3, 5)) must not meet
    # the evaluation's unguided shard ([0, 3)), a file of the same name but another split
    shards = ["--out-dir", str(tmp_path / "shards")]
    result = judged.main([*TOY, *shards, "--slack", "0", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "judged.md").read_text() == judged.markdown(result)
    loss_only = json.loads((ROOT / "benchmarks" / "results" / "leaderboard.json").read_text())
    check_result(judged, result, loss_only)
    s = result["settings"]
    assert s["tasks"] == ["class", "inpaint"]
    assert s["tuning"]["unguided_samples"] == 5 and s["tuning"]["tune_samples"] == 3
    histories = [h for t in result["tuning"].values() for e in t.values() for h in e["history"]]
    assert len(histories) == 2 * 3 * 3  # tasks × methods × budget
    assert any(not h["feasible"] for h in histories)  # slack 0: the constraint bites
    assert [c["method"] for c in result["paired"]] == ["sag n=3"] * 2  # one pair per task
    with pytest.raises(SystemExit):  # the baseline must cover the candidates' samples
        judged.main([*TOY, "--base-samples", "2", "--json", str(path)])


def test_feasibility_and_score(judged):
    # 10 points of 12 samples: 1 sample short (8.3 points) is feasible, 2 (16.7) are not
    assert judged.feasible(11, 12, 12, 12, slack=10)
    assert not judged.feasible(10, 12, 12, 12, slack=10)
    # exactly at the bound (1 of 10 samples = 10 points) is feasible, with no rounding
    assert judged.feasible(9, 10, 10, 10, slack=10) and judged.feasible(13, 12, 12, 12, slack=0)
    # a baseline on more samples than the candidate's: 0.75 of 128 against 0.65 of 20 is
    # exactly 10 points (feasible), 0.60 is 15 (not); 0.70 of 24 is 5 points below
    assert judged.feasible(13, 20, 96, 128, slack=10)
    assert not judged.feasible(12, 20, 96, 128, slack=10)
    assert judged.feasible(17, 24, 96, 128, slack=10) == (100 * (0.75 - 17 / 24) <= 10)
    # a sample of accuracy outweighs any realism; realism breaks ties; infeasible ranks last
    score = judged.tuning_score
    assert score(11 / 12, 0.0, 1.0, ok=True, n=12) < score(10 / 12, 1.0, 1.0, ok=True, n=12)
    assert score(1.0, 0.9, 1.0, ok=True, n=12) < score(1.0, 0.8, 1.0, ok=True, n=12)
    assert score(0.0, 0.0, 0.0, ok=True, n=12) < score(1.0, 0.8, 0.95, ok=False, n=12)
    assert judged.ranks([0.5, 1.0, 0.5, 0.25], higher_first=True) == [2, 1, 2, 4]


def test_ranked_puts_feasible_rows_first(judged):
    """An infeasible row ranks after every feasible one, however accurate its judge."""
    rows = [
        {"task": "class", "method": m, "judge_accuracy": a, "feasible": ok}
        for m, a, ok in [
            ("none", 0.1, True),
            ("ugd", 0.95, False),
            ("tfg", 0.8, True),
            ("dps", 0.8, True),
            ("sag n=3", 0.9, False),
            ("mpgd", 0.6, False),
        ]
    ] + [{"task": "inpaint", "method": "none", "judge_accuracy": 0.1, "feasible": True}]
    out = judged.ranked(rows)
    assert [(r["task"], r["method"], r["judge_rank"]) for r in out] == [
        ("class", "tfg", 1),
        ("class", "dps", 1),
        ("class", "none", 3),
        ("class", "ugd", 4),
        ("class", "sag n=3", 5),
        ("class", "mpgd", 6),
        ("inpaint", "none", 1),
    ]


def test_paired_differences(judged):
    """Per-sample differences of the judge's verdicts, on the same seeds."""

    def row(method, correct, ok=True):
        return {
            "task": "class",
            "method": method,
            "feasible": ok,
            "per_sample": {"judge_correct": correct},
        }

    rows = [
        row("sag n=3", [1, 1, 0, 1]),
        row("freedom", [1, 0, 0, 0], ok=False),
        row("tfg", [1, 1, 1, 1]),  # no tfg+sag n=3: no such pair
    ]
    (c,) = judged.paired(rows)
    assert (c["method"], c["baseline"], c["n"], c["better"], c["worse"]) == (
        "sag n=3",
        "freedom",
        4,
        2,
        0,
    )
    assert c["mean"] == 0.5 and c["se"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert c["method_feasible"] and not c["baseline_feasible"]


def test_stored_results_match_their_rows(judged):
    result = json.loads(STORED.read_text())
    s = result["settings"]
    loss_only = json.loads((STORED.parent / s["loss_only_file"]).read_text())
    check_result(judged, result, loss_only)
    labels = [t.label for t in judged.TUNABLES]
    assert s["tasks"] == ["class", "inpaint"] and len(labels) == 9
    assert {r["method"] for r in result["rows"]} == {"none", *labels}
    assert STORED.with_suffix(".md").read_text() == judged.markdown(result)
    assert s["num_samples"] >= 32 and s["steps"] == 25 and s["tuning"]["budget"] >= 8
    # the realism baseline on a set of its own, larger than the candidates' samples
    assert s["tuning"]["unguided_samples"] >= 64 and s["tuning"]["tune_samples"] >= 24
    assert [(c["task"], c["method"], c["baseline"]) for c in result["paired"]] == [
        (task, m, b) for task in s["tasks"] for m, b in judged.PAIRS
    ]
    assert math.isfinite(s["wall_seconds"]) and s["wall_seconds"] > 0


def test_rows_keep_their_samples_and_measures_score_them(digits_model, classifier):
    """``keep_samples``: each row holds the samples its losses are of; ``measure``: the tuning
    minimises its "score" and keeps its other numbers in the history."""
    (task,) = [t for t in default_tasks(classifier) if t.name == "inpaint"]
    options = {"num_samples": 2, "steps": 2, "batch_size": 2}
    (row,) = evaluate_guidance(
        digits_model, classifier, tasks=[task], methods=("none",), keep_samples=True, **options
    )
    assert row["samples"].shape == (2, 1, 16, 16)
    assert torch.equal(task.loss(row["samples"]).double(), row["per_sample"])
    (plain,) = evaluate_guidance(
        digits_model, classifier, tasks=[task], methods=("none",), **options
    )
    assert "samples" not in plain

    def measure(row):  # prefer the largest mean pixel: not the loss
        return {"score": -float(row["samples"].mean()), "loss": row["loss"]}

    tunable = Tunable("freedom", "freedom", ("scale",))
    tuned = tune_methods(
        digits_model, classifier, [tunable], tasks=[task], budget=3, measure=measure, **options
    )["inpaint"]["freedom"]
    assert [set(h) for h in tuned["history"]] == [{"values", "score", "round", "loss"}] * 3
    assert tuned["score"] == min(h["score"] for h in tuned["history"])
