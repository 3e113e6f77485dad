"""The functions behind notebook 04's figures and widgets, and the guidance evaluation table."""

import math

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

from sagkit.guidance import losses
from sagkit.lab.evaluation import (
    GuidanceTask,
    evaluate_guidance,
    guidance_table,
    paired_comparison,
)
from sagkit.lab.guidance_figures import (
    guided_grid,
    loss_after_window,
    loss_curves,
    method_grid,
    observed_view,
    paired_differences,
    run_methods,
)

METHODS = ("none", "freedom", "dps", "sag")


def test_widgets_return_figures(digits_model, classifier, x_T):
    fig = guided_grid(digits_model, classifier, target=2, n=2, scale=1.0, num=2, steps=4)
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * 2
    results = run_methods(
        digits_model, losses.target_class(classifier, 1), x_T, steps=4, window=(0.0, 1.0)
    )
    assert list(results) == ["none", "freedom", "sag n=3"]
    assert isinstance(method_grid(results), Figure)
    assert isinstance(loss_curves(results, window=(0.0, 1.0)), Figure)
    plt.close("all")


def test_evaluation_rows_and_table(digits_model, classifier):
    tasks = [GuidanceTask("class", losses.target_class(classifier, 3), 3)]
    rows = evaluate_guidance(
        digits_model, classifier, tasks=tasks, ns=(1, 2), num_samples=4, steps=3, batch_size=2
    )
    assert [r["method"] for r in rows] == ["none", "freedom", "dps", "sag n=1", "sag n=2"]
    for r in rows:
        assert r["per_sample"].shape == (4,) and 0 <= r["accuracy"] <= 1 and r["sec_per_sample"] > 0
        assert math.isfinite(r["loss"]) and math.isfinite(r["fd"])
    by = {r["method"]: r for r in rows}
    assert torch.equal(by["freedom"]["per_sample"], by["sag n=1"]["per_sample"])
    table = guidance_table(rows)
    assert "sag n=2" in table and len(table.splitlines()) == 2 + len(rows)


def test_evaluation_resumes_from_shard_files(digits_model, classifier, tmp_path, caplog):
    """Shard files are written as shards finish; a rerun loads them and recomputes only the
    missing one, with the same rows; files of other settings are refused, not mixed in."""
    tasks = [GuidanceTask("class", losses.target_class(classifier, 3), 3)]
    options = {"tasks": tasks, "methods": ("none", "freedom"), "num_samples": 4, "steps": 3}
    options |= {"batch_size": 2}
    fresh = evaluate_guidance(digits_model, classifier, **options)
    first = evaluate_guidance(digits_model, classifier, out_dir=tmp_path, **options)
    files = sorted(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [
        f"class__{g}-n1__{lo:06d}-{lo + 2:06d}.json" for g in ("none", "rms") for lo in (0, 2)
    ]
    files[1].unlink()
    mtimes = {f.name: f.stat().st_mtime_ns for f in files if f.exists()}
    with caplog.at_level("INFO", logger="sagkit.lab.evaluation"):
        again = evaluate_guidance(digits_model, classifier, out_dir=tmp_path, **options)
    computed = [r.getMessage() for r in caplog.records if "computed" in r.getMessage()]
    assert computed == [f"rank 0 computed {files[1].name}"]
    assert sum("loaded" in r.getMessage() for r in caplog.records) == 3
    assert all(f.stat().st_mtime_ns == mtimes[f.name] for f in files if f.name in mtimes)
    for a, b, c in zip(fresh, first, again, strict=True):
        assert torch.equal(a["per_sample"], b["per_sample"])
        assert torch.equal(a["per_sample"], c["per_sample"])
        assert (a["fd"], a["accuracy"]) == (c["fd"], c["accuracy"])
        assert c["sec_per_sample"] > 0
    with pytest.raises(ValueError, match=r"other settings \(stored vs now: seed: 0 vs 1\)"):
        evaluate_guidance(digits_model, classifier, out_dir=tmp_path, **options | {"seed": 1})


def test_a_shard_depends_on_its_samples_only(digits_model, classifier):
    """Shard [0, 2) is the same computation in a run of 2 samples and in one of 6 (noise and
    time travel seeded by (seed, sample indices), never by the other shards or the rank)."""
    tasks = [GuidanceTask("class", losses.target_class(classifier, 3), 3)]
    options = {"tasks": tasks, "methods": ("freedom",), "steps": 3, "batch_size": 2}
    two = evaluate_guidance(digits_model, classifier, num_samples=2, **options)[0]
    six = evaluate_guidance(digits_model, classifier, num_samples=6, **options)[0]
    assert torch.equal(two["per_sample"], six["per_sample"][:2])
    assert not torch.equal(six["per_sample"][:2], six["per_sample"][2:4])


def test_guided_grid_refuses_an_empty_window_before_sampling(digits_model, classifier):
    with pytest.raises(ValueError, match="holds none of the 4 steps"):
        guided_grid(digits_model, classifier, window=(0.3, 0.45), num=1, steps=4)


def test_guided_grid_defaults_guide_some_steps():
    import inspect

    from sagkit.guidance.travel import guidance_window

    params = inspect.signature(guided_grid).parameters
    steps, window = params["steps"].default, params["window"].default
    assert any(guidance_window(steps, window))


def test_paired_differences_are_per_sample_and_paired():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 2.5, 2.0, 3.0])
    rows = [
        {"task": "t", "method": "freedom", "per_sample": a},
        {"task": "t", "method": "sag n=2", "per_sample": b},
    ]
    fig, stats = paired_differences(rows, tasks=["t"], method="sag n=2")
    plt.close(fig)
    d = (b - a).double()
    assert stats["t"] == (pytest.approx(float(d.mean())), pytest.approx(float(d.std() / 2)))


@pytest.mark.parametrize(
    ("shift", "verdict"), [(-1.0, "lower"), (1.0, "higher"), (0.0, "no different")]
)
def test_paired_comparison_calls_a_difference_beyond_two_standard_errors(shift, verdict):
    base = torch.tensor([1.0, 5.0, 2.0, 8.0, 3.0])
    noise = torch.tensor([0.1, -0.2, 0.15, -0.1, 0.05])  # mean 0, s.e. 0.061: 2 s.e. < 1
    rows = [
        {"task": "t", "method": "freedom", "per_sample": base},
        {"task": "t", "method": "m", "per_sample": (base + shift + noise).tolist()},
    ]
    mean, se, word = paired_comparison(rows, "t", "m")
    d = (shift + noise).double()
    # the rows hold base + shift + noise rounded to float32: each value (< 16) is off by at
    # most half an ulp, 2^-21, and so are the mean and the s.e. (std/√N moves by ≤ 2^-21/√(N−1));
    # 2^-20 allows twice that
    assert mean == pytest.approx(float(d.mean()), rel=0, abs=2**-20)
    assert se == pytest.approx(float(d.std() / math.sqrt(5)), rel=0, abs=2**-20)
    assert word == verdict
    with pytest.raises(ValueError, match="no row for task 't' and method 'dps'"):
        paired_comparison(rows, "t", "dps")


def test_loss_after_window_divides_the_final_loss_by_the_loss_after_the_last_guided_step():
    # 10 steps, window (0.3, 0.7): steps 3..6 guided, so the window ends at grid point 7
    curve = torch.arange(1.0, 12.0)[:, None].expand(11, 2)  # (steps + 1, B): loss k + 1
    results = {"none": {"losses": curve}, "freedom": {"losses": curve.flip(0)}}
    ratios = loss_after_window(results, window=(0.3, 0.7))
    assert list(ratios) == ["freedom"]  # unguided sampling has no window to end
    assert ratios["freedom"] == pytest.approx(1 / 4)  # final 1, grid point 7: 11 − 7 = 4
    with pytest.raises(ValueError, match="holds none of the 10 steps"):
        loss_after_window(results, window=(0.31, 0.39))


def test_observed_view_keeps_the_observed_pixels_and_greys_the_rest():
    ref = torch.rand(1, 4, 4) * 2 - 1
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    view = observed_view(ref, mask)
    assert torch.equal(view[:, :2], ref[:, :2]) and bool((view[:, 2:] == 0).all())


def test_the_inpaint_task_carries_the_mask_its_loss_observes(classifier):
    from sagkit.lab.evaluation import default_tasks

    task = next(t for t in default_tasks(classifier) if t.name == "inpaint")
    ref, mask = task.reference, task.mask
    noise = torch.randn((2, *ref.shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert bool((task.loss(ref + (1 - mask) * noise) == 0).all())  # unobserved: free
        assert bool((task.loss(ref + mask * noise) > 0).all())  # observed: penalised
