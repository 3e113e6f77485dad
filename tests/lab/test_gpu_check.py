"""``make gpu-check``'s script, in its CPU dry run: every part runs and lands in the JSON and
the markdown (on a GPU the same script runs at full size)."""

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_every_part(tmp_path, capsys, monkeypatch):
    gpu_check = load_script()
    dry_run_sizes = gpu_check.sizes

    def two_engines(dry_run):
        # sd_memory runs a process per engine: here backprop and symplectic (the two that the
        # markdown compares), not the budgeted one too, whose worker (the same code for every
        # network and engine) tests/lab/test_sd_memory.py runs on two networks
        size = dry_run_sizes(dry_run)
        return size | {"sd_args": [*size["sd_args"], "--methods", "backprop", "symplectic"]}

    monkeypatch.setattr(gpu_check, "sizes", two_engines)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert set(parts) == {"tests", "bench", "guided", "sd_memory"}  # compile: GPU only
    assert not [name for name, part in parts.items() if "error" in part]
    assert "collected" in parts["tests"]["summary"]
    weights = {(r["weights"], r["guidance"], r["n"]) for r in parts["guided"]}
    cases = {(g, n) for g, n in gpu_check.GUIDED_CASES}
    assert weights == {(w, g, n) for w in ("float32", "bfloat16") for g, n in cases}
    assert all(r["images_per_s"] > 0 for r in parts["guided"])
    assert [r["n"] for r in parts["sd_memory"]] == [1]
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## Guided sampling" in text and "## Stable-Diffusion-sized" in text
    assert "Failed parts" not in text


def test_without_cuda_it_asks_for_the_dry_run(tmp_path, monkeypatch, capsys):
    gpu_check = load_script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())
