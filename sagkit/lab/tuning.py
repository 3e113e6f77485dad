"""One tuning procedure for every guidance method: a beam search over its scales.

    tuned = tune_methods(model, classifier, tunables, tasks=tasks, budget=10, num_samples=12)
    save_tuned(path, tuned, settings)                # benchmarks/results/tuned.json
    variants = tuned_variants(tunables, load_tuned(path), "class")
    rows = evaluate_guidance(model, classifier, tasks=[...], methods=(), variants=variants)

A method's scales are named in a :class:`Tunable`: fields of its configured object
(``TFG(rho=..., mu=..., gamma=...)``) or the configuration's ``scale`` (the built-in methods'
c or ζ). :func:`beam_search` (docs/maths.md §8.13):

1. Round 0 evaluates the start point (the method's defaults) and, for each scale alone, the
   start value times each factor of ``grid`` (default 1/4 and 4: a log grid of three points
   a factor 4 apart, the start in the middle): 1 + S·len(grid) candidates for S scales.
2. It keeps the ``beam`` best (default 2; lowest score, ties in the order evaluated).
3. Each later round evaluates, for each kept candidate and each scale, that scale times and
   divided by φ (first ``refine``, default 2), the candidates not yet evaluated, in order,
   and keeps the ``beam`` best of all evaluated.
4. φ stays while a round lowers the best score, and becomes √φ after a round that does not
   (or that finds every neighbour evaluated already). The search stops when ``budget``
   candidates are evaluated (round 0 included; never more), or when φ < refine^(1/8). Every
   method gets the same budget (default 10): round 0 takes 3, 5 or 7 of it for 1, 2 or 3
   scales, the refinements the rest.

Each candidate is scored by the mean final loss of ``num_samples`` samples of
:func:`sagkit.lab.evaluation.evaluate_guidance` with ``split="tuning"``: tuning samples whose
seeds are derived under other tags than the evaluation's, so no tuning sample is an
evaluation sample (:data:`sagkit.lab.evaluation.SPLITS`, tested). A round's candidates are
one call of ``evaluate_guidance`` (as variants), so the sweep runs under its torchrun
sharding and resumes from its shard files (``out_dir``). The loss alone is the score: it does
not see sample quality, so the leaderboard reports the Fréchet distance beside it. Another score
is a ``measure`` of each candidate's row, samples included (``benchmarks/judged_leaderboard.py``:
an independent judge's accuracy under a realism constraint).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.checks import check_count, check_scale
from ..guidance.methods import GUIDANCE, GuidanceMethod
from .evaluation import GuidanceTask, evaluate_guidance

__all__ = [
    "Tunable",
    "BeamResult",
    "beam_search",
    "tune_methods",
    "save_tuned",
    "load_tuned",
    "tuned_variants",
]


@dataclass(frozen=True)
class Tunable:
    """A method and the scales the tuning searches.

    Attributes:
        label: its name in rows and files (no "/" or "\\").
        guidance: a name in :data:`sagkit.GUIDANCE` or a configured method object.
        scales: the names searched: fields of the method object, or else fields of the
            configuration ("scale": the built-in methods' step constant).
        options: other :class:`~sagkit.guidance.config.GuidanceConfig` fields it runs with
            (e.g. ``{"n": 3}`` for SAG).
    """

    label: str
    guidance: str | GuidanceMethod
    scales: tuple[str, ...]
    options: Mapping = field(default_factory=dict)

    @property
    def method(self) -> GuidanceMethod:
        return GUIDANCE[self.guidance] if isinstance(self.guidance, str) else self.guidance

    def own(self, name: str) -> bool:
        """Whether ``name`` is a field of the method object (else the configuration's)."""
        method = self.method
        return dataclasses.is_dataclass(method) and name in {
            f.name for f in dataclasses.fields(method)
        }

    def start(self) -> dict[str, float]:
        """The method's default value of each scale (the configuration's ``scale``: the step
        rule's default without CFG)."""
        return {
            s: getattr(self.method, s) if self.own(s) else self.method.default_scale(None)
            for s in self.scales
        }

    def fields(self, values: Mapping[str, float]) -> dict:
        """The :class:`~sagkit.guidance.config.GuidanceConfig` fields of the method with
        ``values`` of its scales."""
        own = {s: v for s, v in values.items() if self.own(s)}
        method = dataclasses.replace(self.method, **own) if own else self.guidance
        extra = {s: v for s, v in values.items() if not self.own(s)}
        return {"guidance": method, **dict(self.options), **extra}


@dataclass(frozen=True)
class BeamResult:
    """The search's best values and score, and every candidate evaluated, in order, with its
    score and round: ``history`` = [(values, score, round), ...]."""

    best: dict[str, float]
    score: float
    history: list[tuple[dict[str, float], float, int]]


def beam_search(
    score: Callable[[list[dict[str, float]]], Sequence[float]],
    start: Mapping[str, float],
    *,
    budget: int = 10,
    beam: int = 2,
    grid: Sequence[float] = (1 / 4, 4),
    refine: float = 2.0,
) -> BeamResult:
    """The beam search of the module docstring: lowest ``score`` over positive scales.

    ``score(candidates)`` returns one number per candidate (a round at a time, so a caller
    can evaluate them together); ``start`` {name: value > 0}. NaN scores rank last; a
    search whose every score is NaN is refused (``ValueError``), not returned as tuned.
    """
    _check_search(start, budget=budget, beam=beam, refine=refine)
    start = {k: float(v) for k, v in start.items()}
    first = [start] + [{**start, name: start[name] * f} for name in start for f in grid if f != 1]
    if len(first) > budget:
        raise ValueError(
            f"budget {budget} is below round 0's {len(first)} candidates (1 + scales × "
            f"{len(grid)} grid factors)"
        )
    history: list[tuple[dict[str, float], float, int]] = []
    seen: set[tuple] = set()

    def run(candidates, round_):
        fresh = []
        for c in candidates:
            key = tuple(sorted((k, round(math.log2(v), 9)) for k, v in c.items()))
            if key not in seen and len(history) + len(fresh) < budget:
                seen.add(key)
                fresh.append(c)
        if fresh:
            values = list(score(fresh))
            history.extend((c, float(v), round_) for c, v in zip(fresh, values, strict=True))
        return len(fresh)

    def kept():
        order = sorted(range(len(history)), key=lambda i: (_rank(history[i][1]), i))
        return [history[i][0] for i in order[:beam]]

    run(first, 0)
    phi, round_ = float(refine), 1
    while len(history) < budget and phi >= refine ** (1 / 8):
        before = min(_rank(v) for _, v, _ in history)
        neighbours = [
            {**c, name: c[name] * f} for c in kept() for name in start for f in (phi, 1 / phi)
        ]
        added = run(neighbours, round_)
        round_ += bool(added)
        if not added or min(_rank(v) for _, v, _ in history) >= before:
            phi = math.sqrt(phi)
    if all(math.isnan(v) for _, v, _ in history):  # the start point would look tuned
        raise ValueError(
            f"every one of the {len(history)} candidates scored NaN (from start {start}): "
            "nothing was tuned; check the score (a loss or a sample holding NaN)"
        )
    best = kept()[0]
    return BeamResult(best, next(s for c, s, _ in history if c is best), history)


def _check_search(start: Mapping[str, float], *, budget: int, beam: int, refine: float) -> None:
    """Refuses a budget or beam < 1, a start without scales or with a value <= 0, and a
    ``refine`` <= 1."""
    check_count(budget, "budget")
    check_count(beam, "beam")
    if not start:
        raise ValueError("start must name at least one scale")
    for name, value in start.items():
        if check_scale(value, f"start[{name!r}]") == 0:
            raise ValueError(f"start[{name!r}] must be > 0 (the search is on a log scale)")
    if check_scale(refine, "refine") <= 1:
        raise ValueError(f"refine must be > 1, got {refine!r}")


def _rank(value: float) -> float:
    return math.inf if math.isnan(value) else value


def tune_methods(
    model,
    classifier,
    tunables: Sequence[Tunable],
    *,
    tasks: Sequence[GuidanceTask],
    num_samples: int = 12,
    budget: int = 10,
    beam: int = 2,
    grid: Sequence[float] = (1 / 4, 4),
    refine: float = 2.0,
    seed: int = 0,
    batch_size: int = 64,
    out_dir: str | Path | None = None,
    measure: Callable[[dict], Mapping[str, float]] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **options,
) -> dict[str, dict[str, dict]]:
    """Each method's scales tuned on each task by :func:`beam_search`.

    Every candidate runs through :func:`~sagkit.lab.evaluation.evaluate_guidance` on
    ``num_samples`` samples of the tuning split (``seed``), with the shared configuration of
    the ``options`` (fields of :class:`~sagkit.guidance.config.GuidanceConfig`, e.g.
    ``steps``) over :data:`~sagkit.lab.evaluation.EVALUATION_DEFAULTS`; its score is their
    mean final loss, or a ``measure`` of its row (:func:`_score_round`). ``out_dir`` keeps
    the shards (resume, torchrun); ``log`` is called with one line per method and task.

    Returns {task: {label: {"values": {scale: value}, "score": float, "history": [...]}}}.
    """
    evaluate = functools.partial(
        evaluate_guidance,
        model,
        classifier,
        methods=(),
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        out_dir=out_dir,
        split="tuning",
        keep_samples=measure is not None,
        progress=progress,
        **options,
    )
    tuned: dict[str, dict[str, dict]] = {}
    for task in tasks:
        for tunable in tunables:
            measured: dict[str, Mapping[str, float]] = {}  # {candidate's label: its measures}
            score = functools.partial(
                _score_round, evaluate, task, tunable, measured=measured, measure=measure
            )
            result = beam_search(
                score, tunable.start(), budget=budget, beam=beam, grid=grid, refine=refine
            )
            tuned.setdefault(task.name, {})[tunable.label] = _tuned_entry(result, measured, tunable)
            if log is not None:
                shown = ", ".join(f"{k}={v:.4g}" for k, v in result.best.items())
                what = "loss" if measure is None else "score"
                log(f"{task.name:9s} {tunable.label:14s} {shown}  ({what} {result.score:.4g})")
    return tuned


def _score_round(evaluate, task, tunable: Tunable, candidates, *, measured: dict, measure):
    """The scores of one round's ``candidates`` of ``tunable`` on ``task``, evaluated together
    as variants (``evaluate``: :func:`~sagkit.lab.evaluation.evaluate_guidance` with the
    tuning's settings); each candidate's measures are kept in ``measured`` by label. The
    score is the mean final loss, or ``measure(row)["score"]`` (lower is better) where
    ``measure`` maps a candidate's row (with its ``"samples"``) to ``{"score": ..., other:
    ...}``: the other numbers go into the candidate's history entry."""
    variants = {_candidate_label(tunable, c): tunable.fields(c) for c in candidates}
    by = {r["method"]: r for r in evaluate(tasks=[task], variants=variants)}
    measured |= {
        label: {"score": by[label]["loss"]} if measure is None else measure(by[label])
        for label in variants
    }
    return [measured[label]["score"] for label in variants]


def _tuned_entry(result: BeamResult, measured: Mapping[str, Mapping], tunable: Tunable) -> dict:
    """A method's stored tuning: the best values and score, and every candidate's values,
    score and round with its other measures (``measured``, by candidate label)."""
    history = []
    for values, score, round_ in result.history:
        extra = measured[_candidate_label(tunable, values)]
        history.append({"values": values, "score": score, "round": round_})
        history[-1] |= {k: v for k, v in extra.items() if k != "score"}
    return {"values": result.best, "score": result.score, "history": history}


def _candidate_label(tunable: Tunable, values: Mapping[str, float]) -> str:
    """The label of a candidate's row and shard files: the method and its values."""
    return f"{tunable.label}[{','.join(f'{k}={v:.6g}' for k, v in values.items())}]"


def save_tuned(path: str | Path, tuned: Mapping, settings: Mapping) -> None:
    """Write the tuned values with the settings that made them (JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": dict(settings), "tasks": tuned}, indent=1) + "\n")


def load_tuned(path: str | Path) -> dict:
    """The stored tuning: {"settings": ..., "tasks": {task: {label: {"values": ...}}}}."""
    stored = json.loads(Path(path).read_text())
    if not isinstance(stored, dict) or not isinstance(stored.get("tasks"), dict):
        raise ValueError(f"{path} is not a stored tuning (no 'tasks' object)")
    return stored


def tuned_variants(tunables: Sequence[Tunable], stored: Mapping, task: str) -> dict[str, dict]:
    """The :func:`~sagkit.lab.evaluation.evaluate_guidance` variants of ``task``: each
    method with its stored tuned values (a ``ValueError`` names one that is missing)."""
    values = stored["tasks"].get(task)
    if values is None:
        raise ValueError(f"the stored tuning has no task {task!r}")
    missing = [t.label for t in tunables if t.label not in values]
    if missing:
        raise ValueError(f"the stored tuning of {task!r} has no {', '.join(missing)}")
    return {t.label: t.fields(values[t.label]["values"]) for t in tunables}
