"""The stored guidance evaluation (benchmarks/results/guidance_eval.*) and how a rerun updates it."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from sagkit.guidance.config import DEFAULTS
from sagkit.lab.evaluation import CLASS_TARGET

ROOT = Path(__file__).resolve().parents[2]
STORED = ROOT / "benchmarks" / "results" / "guidance_eval.json"


def benchmark():
    spec = importlib.util.spec_from_file_location(
        "guidance_eval", ROOT / "benchmarks" / "guidance_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stored():
    return json.loads(STORED.read_text())


def test_every_stored_row_names_the_run_that_computed_it(stored):
    runs = stored["runs"]
    for row in stored["rows"]:
        assert 0 <= row["run"] < len(runs) and row["task"] in runs[row["run"]]["tasks"]
    tasks = list(dict.fromkeys(r["task"] for r in stored["rows"]))
    for task in tasks:  # one run per task, so a task's paired differences are of one run
        assert len({r["run"] for r in stored["rows"] if r["task"] == task}) == 1, task
    methods = [r["method"] for r in stored["rows"] if r["task"] == tasks[0]]
    for task in tasks:
        assert [r["method"] for r in stored["rows"] if r["task"] == task] == methods


def test_the_stored_class_rows_have_the_class_target_and_sag_the_default_n(stored):
    for i in {r["run"] for r in stored["rows"] if r["task"] == "class"}:
        assert stored["runs"][i]["args"]["target"] == CLASS_TARGET
    assert all(run["args"]["ns"] == [DEFAULTS["n"]] for run in stored["runs"])


def test_the_text_file_is_the_json_as_text(stored):
    assert STORED.with_suffix(".txt").read_text() == benchmark().stored_text(stored)


def test_an_update_replaces_the_rows_of_the_tasks_it_ran(stored):
    bench = benchmark()
    run = copy.deepcopy(stored["runs"][-1]) | {"tasks": ["style"], "note": "new"}
    new_rows = [
        r | {"loss": -1.0} for r in stored["rows"] if r["task"] == "style"
    ]  # stand-ins for a rerun's rows
    for r in new_rows:
        del r["run"]
    updated = bench.updated(copy.deepcopy(stored), run, new_rows)
    index = len(stored["runs"])
    assert updated["runs"] == [*stored["runs"], run]
    assert [(r["task"], r["method"]) for r in updated["rows"]] == [
        (r["task"], r["method"]) for r in stored["rows"]
    ]  # the same rows in the same order
    for old, new in zip(stored["rows"], updated["rows"], strict=True):
        if old["task"] == "style":
            assert new["run"] == index and new["loss"] == -1.0
        else:
            assert new == old
    assert f"run {index}: " in bench.stored_text(updated)


def test_an_update_with_other_shared_arguments_is_refused(stored):
    run = copy.deepcopy(stored["runs"][-1])
    run["args"]["num_samples"] = 8
    with pytest.raises(ValueError, match="num_samples 64 vs 8"):
        benchmark().updated(copy.deepcopy(stored), run, [])
