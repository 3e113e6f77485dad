"""The CPU thread policy applied by ``import sagkit`` (sagkit.core.device.cpu_threads)."""

import os
import subprocess
import sys

import pytest

from sagkit.core.device import THREADS_VARIABLE, cpu_threads


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (3, 1), (8, 4), (64, 32)])
def test_half_the_cores_by_default(cores, expected):
    assert cpu_threads({}, cores) == expected


def test_sagkit_threads_wins_over_omp_num_threads():
    assert cpu_threads({THREADS_VARIABLE: "3", "OMP_NUM_THREADS": "1"}, 2) == 3


def test_omp_num_threads_leaves_torch_alone():
    assert cpu_threads({"OMP_NUM_THREADS": "4"}, 16) is None


@pytest.mark.parametrize("given", ["0", "-1", "two", "1.5", ""])
def test_a_bad_sagkit_threads_names_the_variable(given):
    with pytest.raises(ValueError, match=THREADS_VARIABLE):
        cpu_threads({THREADS_VARIABLE: given}, 2)


def _threads_after_policy(env: dict) -> int:
    code = "import torch, sagkit; sagkit.apply_cpu_threads(); print(torch.get_num_threads())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_the_policy_applied():
    """A fresh process without OMP_NUM_THREADS gets half its cores; SAGKIT_THREADS overrides.
    (Importing sagkit changes nothing: tests/test_bridges.py.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", THREADS_VARIABLE)}
    cores = len(os.sched_getaffinity(0))
    assert _threads_after_policy(env) == max(1, cores // 2)
    assert _threads_after_policy({**env, THREADS_VARIABLE: "3"}) == 3
