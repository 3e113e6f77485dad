"""``benchmarks/shared_machine.py``'s wiring: what each workload runs, with which environment,
and that a loaded run stops its competitor (the timings themselves are the benchmark's)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "shared_machine.py"
    spec = importlib.util.spec_from_file_location("shared_machine", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_workloads_start_as_a_student_would(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SAGKIT_THREADS", "7")
    jobs = bench.workloads(["04_guided_sampling.ipynb"], ["full", "fast"], tmp_path)
    names = [job.name for job in jobs]
    assert names[2:] == ["report --fast", "notebook 04 full", "notebook 04 fast"]
    for job in jobs:
        assert "OMP_NUM_THREADS" not in job.env
    assert [job.env.get("SAGKIT_THREADS") for job in jobs] == [
        None,
        str(bench.CORES),
        None,
        None,
        None,
    ]
    assert [job.env.get("SAGKIT_FAST") for job in jobs[3:]] == [None, "1"]
    assert jobs[3].argv[-1] == str(ROOT / "notebooks" / "04_guided_sampling.ipynb")


def test_a_loaded_run_kills_its_competitor(bench, monkeypatch):
    started, real = [], subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)  # subprocess.run's child is recorded too
    job = bench.Workload("echo", [sys.executable, "-c", "print(0.25)"], dict(os.environ), True)
    assert bench.timed(job, loaded=True) == 0.25
    loops = [p for p in started if "while True: pass" in p.args]
    assert len(loops) == 1 and loops[0].poll() is not None  # the busy loop has ended


def test_a_failing_workload_says_which(bench):
    job = bench.Workload("broken", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    with pytest.raises(RuntimeError, match="broken failed"):
        bench.timed(job, loaded=False)
