"""``benchmarks/sd_memory.py``: the AnimateDiff-sized model's wiring on a tiny configuration, the
table of the runs, and the extrapolation of a peak to another video size."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


@pytest.fixture(scope="module")
def sd_memory():
    path = ROOT / "benchmarks" / "sd_memory.py"
    spec = importlib.util.spec_from_file_location("sd_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extrapolate_peak_scales_what_lies_above_the_fixed_part(sd_memory):
    # 8 frames of 32×32 → 16 frames of 64×64: 8 times the voxels; 6 GiB above 4 GiB fixed
    voxels, to_voxels = 8 * 32 * 32, 16 * 64 * 64
    got = sd_memory.extrapolate_peak(10 * GIB, 4 * GIB, voxels=voxels, to_voxels=to_voxels)
    assert got == (4 + 6 * 8) * GIB
    assert (
        sd_memory.extrapolate_peak(10 * GIB, 4 * GIB, voxels=voxels, to_voxels=voxels) == 10 * GIB
    )
    assert sd_memory.extrapolate_peak(4 * GIB, 4 * GIB, voxels=1, to_voxels=8) == 4 * GIB


def run(method, n, round_, time_s, peak, before=4 * GIB):
    return {
        "method": method, "n": n, "round": round_, "time_s": time_s, "peak_rss_bytes": peak,
        "rss_before_bytes": before, "cuda_peak_bytes": None,
    }  # fmt: skip


def test_table_takes_ratios_within_rounds_and_leaves_out_what_was_not_run(sd_memory):
    runs = [
        run("backprop", 1, 0, 10.0, 9 * GIB), run("symplectic", 1, 0, 15.0, 8 * GIB),
        run("budgeted", 1, 0, 20.0, 8 * GIB), run("backprop", 1, 1, 20.0, 10 * GIB),
        run("symplectic", 1, 1, 20.0, 8 * GIB), run("budgeted", 1, 1, 30.0, 8 * GIB),
        run("symplectic", 2, 0, 30.0, 8 * GIB), run("budgeted", 2, 0, 30.0, 8 * GIB),
    ]  # fmt: skip
    one, two = sd_memory.table(runs)
    assert one["time_ratio"] == (1.5 + 1.0) / 2  # the median of the two rounds' ratios
    assert one["budgeted_time_ratio"] == (2.0 + 1.5) / 2
    assert one["backprop_peak_rss_bytes"] == 10 * GIB  # the largest over rounds
    assert two["backprop_peak_rss_bytes"] is None and two["time_ratio"] is None
    (extra,) = sd_memory.extrapolated([two], (1, 4, 8, 32, 32), (1, 4, 16, 64, 64))
    assert extra["backprop_peak_rss_bytes"] is None
    assert extra["symplectic_peak_rss_bytes"] == (4 + 4 * 8) * GIB


def test_animatediff_worker_on_a_tiny_motion_unet(sd_memory):
    """Every engine's gradient through a tiny UNetMotionModel on a video latent (B, 4, F, h, w),
    as the full-size run does it (in this process: the wiring, not the memory)."""
    tiny = ["--model", "animatediff", "--channels", "32", "32", "64", "64", "--latent", "8"]
    runs = []
    for method in sd_memory.METHODS:
        argv = [*tiny, "--frames", "2", "--worker", "--method", method, "--n", "1"]
        args = sd_memory.parser().parse_args(argv)
        runs.append({**sd_memory.worker(args), "round": 0})
    assert {(r["network"], tuple(r["latent_shape"])) for r in runs} == {
        ("UNetMotionModel", (1, 4, 2, 8, 8))
    }
    # peak ≥ the RSS before holds in the benchmark's fresh worker processes; in this long-lived
    # one the garbage freed between the two readings can put the reset high-water mark lower
    assert all(r["time_s"] > 0 for r in runs)
    assert all(r["peak_rss_bytes"] is None or r["peak_rss_bytes"] > 0 for r in runs)
    rows = sd_memory.table(runs)
    extra = sd_memory.extrapolated(rows, (1, 4, 2, 8, 8), (1, 4, 16, 64, 64))
    text = sd_memory.render(rows, runs, extra)
    assert text.startswith("UNetMotionModel") and "latent 1×4×16×64×64" in text


def test_sd3_worker_on_a_tiny_transformer(sd_memory, monkeypatch):
    """Every engine's gradient through an SD3Transformer2DModel (the velocity frame of the
    rectified flow, the text packed with the pooled embedding), on a tiny configuration."""
    tiny = dict(
        sd_memory.SD3_MEDIUM, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        in_channels=4, out_channels=4, pos_embed_max_size=8,
    )  # fmt: skip
    monkeypatch.setattr(sd_memory, "SD3_MEDIUM", tiny)
    runs = []
    for method in sd_memory.METHODS:
        argv = ["--model", "sd3", "--latent", "8", "--t5-tokens", "3", "--worker"]
        args = sd_memory.parser().parse_args([*argv, "--method", method, "--n", "2"])
        runs.append({**sd_memory.worker(args), "round": 0})
    assert {(r["network"], tuple(r["latent_shape"]), r["text_tokens"]) for r in runs} == {
        ("SD3Transformer2DModel", (1, 4, 8, 8), 77 + 3 + 1)  # CLIP, T5 and the pooled row
    }
    assert all(r["time_s"] > 0 for r in runs)
    text = sd_memory.render(sd_memory.table(runs), runs)
    assert text.startswith("SD3Transformer2DModel") and "latent 1×4×8×8" in text
