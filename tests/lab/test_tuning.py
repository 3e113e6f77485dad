"""The tuning (sagkit.lab.tuning): the beam search finds a synthetic objective's best scale on a
known grid within its budget, and the tuning samples are disjoint from the evaluation's."""

import itertools
import math

import pytest
import torch

from sagkit.guidance.family import TFG
from sagkit.lab.evaluation import SPLITS, evaluate_guidance, initial_noise
from sagkit.lab.tuning import Tunable, beam_search, load_tuned, save_tuned, tuned_variants


def _counting(objective):
    """A batched score of ``objective`` that records every candidate it is asked for."""
    asked = []

    def score(candidates):
        asked.extend(candidates)
        return [objective(**c) for c in candidates]

    return score, asked


def _reachable(start, exponents):
    """The known grid: start · 2^e for the exponents e (the search's factors 4^±1, 2^±1,
    2^±½, … are all powers of 2 from a power-of-2 start)."""
    return [start * 2.0**e for e in exponents]


def test_finds_the_best_scale_on_a_known_grid():
    """f(s) = (log2 s − 3)² + sin(log2 s)/10 (one minimum on the grid 2^j, at s = 8): the
    search from s = 1 with budget 6 returns the grid's minimiser, found by brute force over
    the whole grid of 2^-6 … 2^6 (13 points, more than the budget)."""

    def f(scale):
        e = math.log2(scale)
        return (e - 3) ** 2 + math.sin(e) / 10

    known = _reachable(1.0, range(-6, 7))
    best = min(known, key=lambda s: f(s))
    assert best == 8.0  # the objective's minimiser on the grid, by brute force
    score, asked = _counting(f)
    result = beam_search(score, {"scale": 1.0}, budget=6)
    assert result.best == {"scale": best}
    assert result.score == f(best)
    assert len(asked) <= 6 and len(result.history) == len(asked)


def test_finds_the_best_of_three_scales_within_the_budget():
    """A separable objective of three scales, minimum at (4, 1/2, 2) on the grid of powers of
    2: found with budget 22 of the 13³ = 2197 grid points (7 in round 0, 12 in round 1, the
    third scale's move in round 2), and never more than 22 asked."""
    target = {"rho": 2.0, "mu": -1.0, "gamma": 1.0}

    def f(**values):
        return sum((math.log2(values[k]) - e) ** 2 for k, e in target.items())

    grid = _reachable(1.0, range(-6, 7))
    best = min(itertools.product(grid, grid, grid), key=lambda v: f(rho=v[0], mu=v[1], gamma=v[2]))
    score, asked = _counting(f)
    result = beam_search(score, {"rho": 1.0, "mu": 1.0, "gamma": 1.0}, budget=22)
    assert tuple(result.best.values()) == best == (4.0, 0.5, 2.0)
    assert len(asked) <= 22
    assert len({tuple(c.items()) for c in asked}) == len(asked)  # no candidate twice


@pytest.mark.parametrize("budget", [3, 4, 7, 10])
def test_respects_its_budget_exactly(budget):
    """A strictly convex objective never converges in a few rounds: every budget is spent,
    never exceeded."""
    score, asked = _counting(lambda scale: (math.log2(scale) - 40) ** 2)
    result = beam_search(score, {"scale": 1.0}, budget=budget)
    assert len(asked) == budget == len(result.history)
    rounds = [r for _, _, r in result.history]
    assert rounds == sorted(rounds) and rounds[:3] == [0, 0, 0]


def test_bad_settings():
    score, _ = _counting(lambda **v: 0.0)
    with pytest.raises(ValueError, match="round 0"):
        beam_search(score, {"a": 1.0, "b": 1.0}, budget=4)  # round 0 needs 1 + 2·2
    with pytest.raises(ValueError, match="> 0"):
        beam_search(score, {"a": 0.0})
    with pytest.raises(ValueError, match="refine"):
        beam_search(score, {"a": 1.0}, refine=1.0)


def test_a_search_whose_every_score_is_nan_is_refused():
    """Not its start point returned as tuned; one NaN among real scores still ranks last."""
    nan_everywhere, _ = _counting(lambda **v: math.nan)
    with pytest.raises(ValueError, match="every one of the 5 candidates scored NaN"):
        beam_search(nan_everywhere, {"a": 1.0}, budget=5)
    nan_at_start, _ = _counting(lambda **v: math.nan if v["a"] == 1.0 else abs(v["a"] - 4))
    assert beam_search(nan_at_start, {"a": 1.0}, budget=5).best == {"a": 4.0}


def test_tuning_seeds_are_disjoint_from_the_evaluations():
    """The split is part of every derived seed: no tuning sample's initial noise is an
    evaluation sample's, for the same seed or another, at any index."""
    assert SPLITS == ("evaluation", "tuning")
    shape = (1, 4, 4)
    evaluation = {initial_noise(s, i, shape).numpy().tobytes() for s in range(3) for i in range(64)}
    tuning = {
        initial_noise(s, i, shape, split="tuning").numpy().tobytes()
        for s in range(3)
        for i in range(64)
    }
    assert len(evaluation) == len(tuning) == 3 * 64
    assert not evaluation & tuning
    # the default split is the evaluation's, the noise of earlier runs
    assert torch.equal(initial_noise(0, 5, shape), initial_noise(0, 5, shape, split="evaluation"))


def test_tuning_runs_its_own_samples(digits_model, classifier):
    """An evaluation on the tuning split has other samples than the evaluation's, and a shard
    key that says so."""
    options = {"methods": ("none",), "num_samples": 2, "steps": 2, "batch_size": 2}
    tasks = [t for t in _tasks(classifier) if t.name == "inpaint"]
    a = evaluate_guidance(digits_model, classifier, tasks=tasks, **options)[0]
    b = evaluate_guidance(digits_model, classifier, tasks=tasks, split="tuning", **options)[0]
    assert not torch.equal(a["per_sample"], b["per_sample"])
    with pytest.raises(ValueError, match="split"):
        evaluate_guidance(digits_model, classifier, tasks=tasks, split="test", **options)


def _tasks(classifier):
    from sagkit.lab.evaluation import default_tasks

    return default_tasks(classifier)


def test_tuned_values_round_trip(tmp_path):
    """Stored per task, read back as the evaluation's variants: the method with its values."""
    tunables = [Tunable("tfg", TFG(), ("rho", "mu")), Tunable("dps", "dps", ("scale",))]
    tuned = {"class": {"tfg": {"values": {"rho": 0.5, "mu": 4.0}, "score": 1.0, "history": []},
                       "dps": {"values": {"scale": 6.0}, "score": 2.0, "history": []}}}  # fmt: skip
    save_tuned(tmp_path / "tuned.json", tuned, {"budget": 10})
    stored = load_tuned(tmp_path / "tuned.json")
    variants = tuned_variants(tunables, stored, "class")
    assert variants["tfg"]["guidance"] == TFG(rho=0.5, mu=4.0)
    assert variants["dps"] == {"guidance": "dps", "scale": 6.0}
    assert tunables[0].start() == {"rho": 2.0, "mu": 1.0}
    assert tunables[1].start() == {"scale": 3.0}
    with pytest.raises(ValueError, match="style"):
        tuned_variants(tunables, stored, "style")
