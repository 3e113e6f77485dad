"""Data-parallel guidance sweeps: sharding, gathering, and a 2-rank torchrun run that equals
the single-process one exactly and resumes from the shard files it finds."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sagkit as sk
from sagkit.lab.distributed import gather, init_distributed, rank_and_world, shard
from sagkit.lab.evaluation import default_tasks, evaluate_guidance, initial_noise

ROOT = Path(__file__).resolve().parents[2]


def test_shards_partition_the_items():
    items = list(range(11))
    shares = [shard(items, rank=r, world=3) for r in range(3)]
    assert sorted(sum(shares, [])) == items
    assert [len(s) for s in shares] == [4, 4, 3]
    assert shard(items) == items  # a single process: everything
    with pytest.raises(ValueError):
        shard(items, rank=3, world=3)


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
    assert rank_and_world() == (0, 1) and gather({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize(("device", "backend", "gpu"), [("cpu", "gloo", None), ("cuda", "nccl", 1)])
def test_backend_and_gpu_follow_the_device(monkeypatch, device, backend, gpu):
    """Under torchrun (its env vars): gloo on the CPU; NCCL on CUDA, local rank 3 of 2 GPUs
    on GPU 1. The process group itself is not started here (the torchrun test below does)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    ctx = init_distributed(device=device)
    assert (ctx.rank, ctx.world_size, ctx.backend) == (3, 4, backend)
    assert ctx.device == (torch.device(device, gpu) if gpu is not None else torch.device("cpu"))
    assert calls[-1]["backend"] == backend and calls[-1]["rank"] == 3
    assert calls[-1]["world_size"] == 4


def test_initial_noise_depends_on_seed_and_index_only():
    a = initial_noise(0, 5, (1, 4, 4))
    assert torch.equal(a, initial_noise(0, 5, (1, 4, 4))) and a.shape == (1, 1, 4, 4)
    assert not torch.equal(a, initial_noise(0, 6, (1, 4, 4)))
    assert not torch.equal(a, initial_noise(1, 5, (1, 4, 4)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process_and_resume(tmp_path):
    """4 samples × {none, freedom} in shards of 1: 8 shards. A single process writes them all;
    six are deleted; 2 ranks under torchrun load the other two (one each) and compute the six.
    The gathered rows equal the single-process rows exactly, and only the six were written."""
    settings = {"num_samples": 4, "steps": 4, "seed": 0, "batch_size": 1}
    model = sk.digits.load_pretrained("digits", device="cpu")
    classifier = sk.digits.load_classifier("digits", device="cpu")
    tasks = [default_tasks(classifier)[0]]  # "class"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1)
    try:
        rows = evaluate_guidance(
            model,
            classifier,
            tasks=tasks,
            methods=("none", "freedom"),
            out_dir=tmp_path / "shards",
            **settings,
        )
    finally:
        torch.set_num_threads(threads)
    files = sorted((tmp_path / "shards").glob("*.json"))
    assert len(files) == 8
    kept = {files[0].name, files[5].name}  # shards 0 and 5 of the 8: one for each rank
    for f in files:
        if f.name not in kept:
            f.unlink()
    mtimes = {name: (tmp_path / "shards" / name).stat().st_mtime_ns for name in kept}

    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), str(ROOT / "benchmarks" / "guidance_eval.py"),
        "--tasks", "class", "--methods", "none", "freedom", "--presets", "--num-samples", "4",
        "--steps", "4", "--batch-size", "1", "--seed", "0", "--verbose",
        "--out-dir", str(tmp_path / "shards"), "--json", str(tmp_path / "rows.json"),
    ]  # fmt: skip
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"torchrun: {time.perf_counter() - start:.1f} s")

    log = [line for line in run.stderr.splitlines() if " computed " in line or " loaded " in line]
    loaded = {line.split()[-1] for line in log if " loaded " in line}
    computed = [line.split()[-1] for line in log if " computed " in line]
    assert loaded == kept and sorted(computed) == sorted({f.name for f in files} - kept)
    assert {line.split()[1] for line in log} == {"0", "1"}  # both ranks worked
    assert all((tmp_path / "shards" / n).stat().st_mtime_ns == m for n, m in mtimes.items())
    assert len(list((tmp_path / "shards").glob("*.json"))) == 8

    result = json.loads((tmp_path / "rows.json").read_text())
    assert result["args"]["world_size"] == 2
    gathered = result["rows"]
    assert [r["method"] for r in gathered] == [r["method"] for r in rows]
    for one, two in zip(rows, gathered, strict=True):
        assert one["per_sample"].tolist() == two["per_sample"]  # exactly, sample by sample
        for column in ("loss", "loss_se", "fd"):
            assert one[column] == two[column], column
        assert one["accuracy"] == two["accuracy"] or math.isnan(one["accuracy"])
    assert run.stdout.count("task      method") == 2  # rank 0 alone prints (two tables)
