"""The distribution study (docs/maths.md §14.7): the oracle reaches the noise floor and the
unguided sampler does not, the network calls are counted as the methods spend them, the
frontier, the figures, and benchmarks/distribution_study.py at a toy size."""

import dataclasses
import json
import math

import matplotlib
import pytest
from helpers import load_benchmark

from sagkit.core.tilted import LinearLoss, TiltedMixture
from sagkit.guidance.config import GuidanceConfig
from sagkit.lab import distribution as dist
from sagkit.lab.distances import mean_and_error, noise_floor, sliced_w2

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def vp():
    """64 components under the DDPM schedule, with diffusers' DDPMScheduler."""
    return dist.study_mixture("vp", n_components=64)


def test_the_oracle_reaches_the_noise_floor_and_unguided_sampling_does_not(vp):
    """DDPM, 100 steps, the broad inpainting target: the oracle's mean sliced W₂ over 4
    batches of 200 lies within 2 standard errors (of the difference of the two means) of the
    floor of two exact sets of 200; the unguided sampler's, at the same size, lies more than 10
    above it: the check can fail."""
    mixture, settings = vp
    settings = dataclasses.replace(settings, steps=100)
    task = dist.study_tasks(mixture, names=["inpaint-broad"])[0]
    exact = task.exact(mixture)
    network = TiltedMixture.of(mixture)
    oracle, unguided = dist.methods_for(task, mixture, [dist.METHODS[0]])[::-1]
    size, batches = 200, 4
    values = {"oracle": [], "unguided": []}
    for r in range(batches):
        reference = dist.exact_sets(exact.target, size, 100 + r)
        for tunable in (oracle, unguided):
            run = dist.sample_method(
                network, task.loss, tunable.fields({}), size, settings=settings, seed=r
            )
            values[tunable.label].append(sliced_w2(run.samples, reference))
    floor, floor_se = noise_floor(
        lambda n, g: exact.target.sample(n, generator=g), size, repeats=batches, seed=7
    )
    mean, se = mean_and_error(values["oracle"])
    assert abs(mean - floor) <= 2 * math.hypot(se, floor_se)
    far, far_se = mean_and_error(values["unguided"])
    assert far - floor > 10 * math.hypot(far_se, floor_se)


@pytest.mark.parametrize("window", [(0.0, 1.0), (0.3, 0.7)])
def test_calls_are_counted_as_the_methods_spend_them(vp, window):
    """FreeDoM: one call per step (the gradient's first call is the base step's ε); SAG n: n
    per guided step with the default (budgeted) engine and with backprop, one per other step;
    the oracle: one per step (its exact shift is not a network call)."""
    mixture, settings = vp
    steps = 10
    settings = dataclasses.replace(settings, steps=steps, window=window)
    task = dist.study_tasks(mixture, names=["class"])[0]
    network = TiltedMixture.of(mixture)
    guided = sum(GuidanceConfig(steps=steps, window=window).guided_steps())
    assert 0 < guided <= steps

    def calls(fields):
        return dist.sample_method(network, task.loss, fields, 3, settings=settings, seed=0).calls

    assert calls({"guidance": "freedom"}) == steps
    for n in (2, 4):
        assert calls({"guidance": "sag", "n": n}) == steps - guided + n * guided
        assert calls({"guidance": "sag", "n": n, "gradient": "backprop"}) == (
            steps - guided + n * guided
        )
    oracle = dist.methods_for(task, mixture, [])[0]
    assert calls(oracle.fields({})) == steps


def test_dps_is_left_out_on_the_linear_loss_and_the_oracle_is_added(vp):
    mixture, _ = vp
    for task in dist.study_tasks(mixture):
        labels = [t.label for t in dist.methods_for(task, mixture)]
        assert labels[-1] == "oracle"
        assert ("dps" in labels) == (not isinstance(task.loss, LinearLoss))


def test_the_reference_digit_is_no_mean_and_the_seeds_are_disjoint(vp):
    mixture, _ = vp
    ref = dist.reference_image(mixture)
    assert ref.shape == (1, 8, 8)
    assert float((mixture.means.detach() - ref).flatten(1).norm(dim=1).min()) > 0
    tuning = {dist.split_seed("tuning", "class", 0)}
    evaluation = {dist.split_seed("evaluation", "class", r, 0) for r in range(8)}
    assert not tuning & evaluation and len(evaluation) == 8


def test_the_search_starts_below_the_defaults_and_the_edge_is_flagged():
    """Every step scale starts at its default times START_FACTOR, TFG's smoothing radius at
    its default; a chosen value is at the edge when it is the smallest or largest tried."""
    by = {m.label: m for m in dist.METHODS}
    assert dist.study_start(by["freedom"]) == {"scale": 2.0 * dist.START_FACTOR}
    tfg = dist.study_start(by["tfg"], 1 / 8)
    assert tfg == {"rho": 2.0 / 8, "mu": 1.0 / 8, "gamma": 0.1}
    history = [
        {"values": {"a": 1.0, "b": 1.0}},
        {"values": {"a": 0.25, "b": 1.0}},
        {"values": {"a": 4.0, "b": 1.0}},
        {"values": {"a": 1.0, "b": 0.25}},
        {"values": {"a": 1.0, "b": 4.0}},
        {"values": {"a": 2.0, "b": 2.0}},
    ]
    assert dist.at_edge(history, {"a": 1.0, "b": 1.0}) == []
    assert dist.at_edge(history, {"a": 4.0, "b": 1.0}) == ["a"]
    assert dist.at_edge(history, {"a": 1.0, "b": 0.25}) == ["b"]
    assert dist.at_edge(history, {"a": 2.0, "b": 2.0}) == []
    with pytest.raises(ValueError, match="factor must be"):
        dist.study_start(by["freedom"], 0.0)


def toy_study():
    """A study dict of two tasks, made up (the figures and the frontier read only these keys)."""
    rows = []
    for task in ("a", "b"):
        for method, calls, sec, d in [
            ("unguided", 10, 1e-4, 0.5),
            ("freedom", 10, 2e-4, 0.3),
            ("sag n=2", 20, 3e-4, 0.2),
            ("sag n=4", 40, 5e-4, 0.25),
            ("oracle", 10, 2e-4, 0.05),
        ]:
            rows.append(
                {
                    "task": task,
                    "method": method,
                    "calls_per_sample": calls,
                    "sec_per_sample": sec,
                    "sliced_w2": d,
                    "sliced_w2_se": 0.01,
                    "energy": d,
                    "energy_se": 0.01,
                }
            )
    floors = {t: {"sliced_w2": [0.05, 0.002], "energy": [0.01, 0.002]} for t in ("a", "b")}
    return {"floors": floors, "rows": rows}


def with_reference(study):
    """``study`` with an SMC reference row per task, nearer and cheaper than every method."""
    rows = [r | {"method": "smc", "reference": True, "sliced_w2": 0.01, "calls_per_sample": 1}
            for r in study["rows"] if r["method"] == "oracle"]  # fmt: skip
    return study | {"rows": study["rows"] + rows}


def test_the_frontier_keeps_the_undominated_methods_in_order_of_cost():
    study = toy_study()
    line = dist.frontier(study, "a")
    # unguided is dominated by freedom (same calls, nearer), sag n=4 by sag n=2
    assert [p["method"] for p in line] == ["freedom", "sag n=2"]
    with_oracle = dist.frontier(study, "a", without=())
    assert [p["method"] for p in with_oracle] == ["oracle"]
    timed = dist.frontier(study, "a", cost="sec_per_sample")
    assert [p["method"] for p in timed] == ["unguided", "freedom", "sag n=2"]
    # a reference row (SMC) would dominate everything, and is left out like the oracle
    assert dist.frontier(with_reference(study), "a") == line


def test_the_figures_draw_a_panel_per_task_and_a_point_per_method():
    study = toy_study()
    fig = dist.plot_distances(study)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(ax.containers) == 1 and len(ax.containers[0].lines[0].get_xdata()) == 5
        assert ax.get_yscale() == "log" and ax.get_ylabel()
        assert len(ax.patches) == 1  # the floor band
    fig = dist.plot_frontier(study)
    assert len(fig.axes) == 4
    for i, ax in enumerate(fig.axes):  # calls, seconds; calls, seconds
        assert len(ax.containers) == 5  # one point per method
        assert ax.get_xscale() == "log" and ax.get_xlabel()
        frontier_lines = [line for line in ax.lines if line.get_label() == "frontier"]
        assert len(frontier_lines) == 1 and len(frontier_lines[0].get_xdata()) == 2 + i % 2
    # the reference rows: a second series in the distances, and their own line in the frontier
    study = with_reference(study)
    for ax in dist.plot_distances(study).axes:
        assert [len(c.lines[0].get_xdata()) for c in ax.containers] == [5, 1]
    for ax in dist.plot_frontier(study).axes:
        assert len(ax.containers) == 6
        labels = [line.get_label() for line in ax.lines]
        assert labels.count("reference (SMC)") == 1 and labels.count("frontier") == 1


def test_the_toy_benchmark(tmp_path):
    module = load_benchmark("distribution_study")
    out = tmp_path / "d.json"
    result = module.main(["--fast", "--quiet", "--schedules", "vp", "--json", str(out)])
    stored = json.loads(out.read_text())
    assert stored["studies"]["vp"]["floors"] == result["studies"]["vp"]["floors"]
    rows = stored["studies"]["vp"]["rows"]
    assert [r["method"] for r in rows] == ["unguided", "freedom", "sag n=2", "oracle"]
    for r in rows:
        assert r["sliced_w2"] > 0 and r["sliced_w2_se"] > 0 and r["sec_per_sample"] > 0
        assert r["calls_per_sample"] == (8 if r["method"] == "sag n=2" else 4)
        assert len(r["tuning_history"]) == (3 if r["scales"] else 0)
        if r["scales"]:  # the best candidate of the search, by its tuning score
            best = min(r["tuning_history"], key=lambda h: h["score"])
            assert (r["scales"], r["tuning_score"]) == (best["values"], best["score"])
            assert r["start"] == dist.study_start(dist.METHODS[1])  # 1 scale, default 2
            assert r["tuning_history"][0]["values"] == r["start"]
            assert r["edge_scales"] == dist.at_edge(r["tuning_history"], r["scales"])
        assert r["edge"] == bool(r["edge_scales"])
    assert "noise floor" in out.with_suffix(".md").read_text()
    for kind in ("distances", "frontier"):
        assert (tmp_path / f"d_vp_{kind}.png").stat().st_size > 0
    # --add-smc: the SMC reference rows appended, the stored rows kept as they were
    argv = ["--fast", "--quiet", "--add-smc", "--particles", "2", "3", "--json", str(out)]
    added = module.main(argv)["studies"]["vp"]
    same = json.dumps  # NaN (the tuning score of a method without scales) is no NaN's equal
    assert same(json.loads(out.read_text())["studies"]["vp"]) == same(added)
    assert same(added["rows"][: len(rows)]) == same(rows)
    assert added["floors"] == stored["studies"]["vp"]["floors"]
    smc = added["rows"][len(rows) :]
    assert [r["method"] for r in smc] == [dist.smc_label(2), dist.smc_label(3)]
    freedom = next(r for r in rows if r["method"] == "freedom")
    for r in smc:
        assert r["reference"] and r["task"] == "inpaint-broad" and r["scales"] == {}
        assert r["proposal_scale"] in (freedom["scales"]["scale"], dist.SMC_FALLBACK_SCALE)
        assert r["calls_per_sample"] == r["particles"] * freedom["calls_per_sample"]
        assert r["sliced_w2"] > 0 and r["sliced_w2_se"] > 0 and r["sec_per_sample"] > 0
        assert 1 <= r["ess_mean"] <= r["particles"]
    for cost in ("calls_per_sample", "sec_per_sample"):
        line = dist.frontier(added, "inpaint-broad", cost=cost)
        assert line and not {p["method"] for p in line} & {r["method"] for r in smc}
    assert "(reference)" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dist.study_mixture("ve"), "schedule must be"),
        (lambda: dist.study_tasks(dist.study_mixture()[0], names=["x"]), "names must be"),
        (lambda: dist.quick_study(size=3), "sizes must be"),
        (lambda: dist.quick_study(methods=("sag",)), "methods must be labels"),
        (lambda: dist.frontier(toy_study(), "a", distance="w1"), "distance must be"),
        (lambda: dist.frontier(toy_study(), "c"), "no task"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
