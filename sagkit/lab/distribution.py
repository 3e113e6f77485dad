"""The distribution study: each guidance method's samples against exact samples of the target.

On the exact digits mixture p_0 (:func:`sagkit.digits_mixture`) and a closed-form loss L
(:mod:`sagkit.core.tilted`), the distribution every training-free method aims at is the tilt
p̃_0 = p_0 e^{−L}/Z, with exact samples. A method at given scales is run on the mixture
(the exact network) and its samples are compared with exact samples of p̃_0 by two
two-sample distances (:mod:`sagkit.lab.distances`), read against the noise floor (two exact
sets of the same size) (docs/maths.md §14.7):

    d(method) = mean over R evaluation batches of D(guided batch_r, exact set_r),
    floor     = mean over R pairs of D(exact set, exact set'),           each ± its s.e.

- Every method runs on the same base sampler, steps, guidance window and repeats
  (:class:`StudySettings`), so rows differ in the method and its scales only. The window is
  (0, 1): the tilt's exact guidance is nonzero at every step, so a method allowed only part of
  the trajectory cannot reach the target; repeats 1 (no time travel): the exact guidance needs
  none, and it would double every method's calls.
- The network is the mixture evaluated in closed form (:class:`~sagkit.core.tilted.TiltedMixture`
  of the mixture: the same ε as :class:`~sagkit.GaussianMixture`'s to rounding, computed
  without its (B, K, D) tensor, ~50× faster at K = 512), wrapped in a call counter
  (:class:`~sagkit.lab.profiling.CountingModel`): "calls per sample" counts the batched
  network evaluations a sample costs. The oracle's exact shift evaluates the tilted mixture
  outside the counter: it is ground truth, not a network call (its seconds include it).
- Tuning: each method's scales (the :class:`~sagkit.lab.tuning.Tunable` names) by
  :func:`~sagkit.lab.tuning.beam_search`, minimising the sliced W₂ of ``tune_samples`` guided
  samples from the tuning seeds to as many exact samples; evaluation on disjoint seeds
  (:func:`split_seed`). The standard errors are over the R independent evaluation batches.
- The search's start (:func:`study_start`): one rule for every method, each step scale (every
  tuned scale but those of :data:`UNSCALED`, TFG's smoothing radius γ, which is no step) at
  its default times :data:`START_FACTOR` (1/16). The defaults were chosen for the guidance
  window (0.3, 0.7), and over the window (0, 1) they overshoot: on a probe (VP, 50 steps,
  512 components, 128 samples, defaults × 1, 1/4, …, 1/64) FreeDoM's, UGD's and TFG's best
  factor was 1/32–1/64 on the broad inpainting and the linear loss and 1/4–1/8 on the class
  loss, so 1/16 with round 0's grid ×1/4, ×4 brackets all of them.
- Convergence: a row's ``edge`` names the scales whose chosen value is the smallest or the
  largest value of that scale tried (:func:`at_edge`): there the search may not have reached
  the optimum, which may lie further out.
- Reference rows (:func:`smc_rows`): twisted SMC (:func:`~sagkit.guidance.smc.sample_smc`)
  with a method's tuned step as the proposal and the exact twisting function, one draw per
  run of N particles: asymptotically exact in N, so a reference line, not a heuristic; their
  rows carry ``"reference": True`` and stay out of :func:`frontier`.
- Timing: within a task the evaluation runs batch by batch, every method per batch, so the
  methods' seconds are interleaved in time and share the machine's load as measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import NullFormatter
from tqdm.auto import tqdm

from ..core.schedules import FlowSchedule, VPSchedule
from ..core.tilted import ClassLoss, ExactGuidance, LinearLoss, QuadraticLoss, TiltedMixture
from ..digits.data import digit_images, digits_mixture
from ..guidance.family import LGD, MPGD, TFG, UGD
from ..guidance.oracle import Oracle
from ..guidance.sampler import guided_sample
from ..guidance.smc import ExactTwist, sample_smc
from .distances import DISTANCES, mean_and_error, noise_floor
from .profiling import CountingModel
from .tuning import Tunable, beam_search

__all__ = [
    "METHODS",
    "StudyTask",
    "StudySettings",
    "Sampled",
    "QUICK",
    "study_mixture",
    "study_tasks",
    "reference_image",
    "split_seed",
    "START_FACTOR",
    "UNSCALED",
    "study_start",
    "at_edge",
    "methods_for",
    "sample_method",
    "exact_sets",
    "tune_method",
    "run_study",
    "quick_study",
    "SMC_PARTICLES",
    "SMC_FALLBACK_SCALE",
    "SMC_COLLAPSE_ESS",
    "smc_label",
    "smc_rows",
    "frontier",
    "plot_distances",
    "plot_frontier",
]

METHODS: tuple[Tunable, ...] = (
    Tunable("unguided", "none", ()),
    Tunable("freedom", "freedom", ("scale",)),
    Tunable("dps", "dps", ("scale",)),
    Tunable("sag n=2", "sag", ("scale",), {"n": 2}),
    Tunable("sag n=4", "sag", ("scale",), {"n": 4}),
    Tunable("backward", "backward", ("scale",)),
    Tunable("lgd", LGD(), ("scale",)),
    Tunable("mpgd", MPGD(), ("scale",)),
    Tunable("ugd", UGD(), ("forward", "backward")),
    Tunable("tfg", TFG(), ("rho", "mu", "gamma")),
    Tunable("tfg estimate=3", TFG(estimate=3), ("rho", "mu", "gamma")),
)
"""The methods of the study and the scales tuned (the oracle is added per task by
:func:`methods_for`: it needs the task's exact guidance)."""


START_FACTOR: float = 1 / 16
"""Each step scale's start in the study's search: its default times this (module docstring)."""

UNSCALED: tuple[str, ...] = ("gamma",)
"""Tuned scales that are no step size (TFG's smoothing radius γ): they start at their default."""


def study_start(tunable: Tunable, factor: float = START_FACTOR) -> dict[str, float]:
    """The search's start for ``tunable`` in the study: every scale at its default
    (:meth:`Tunable.start`) times ``factor``, but those of :data:`UNSCALED` (their default).
    (docs/maths.md §14.7)"""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor!r}")
    return {k: (v if k in UNSCALED else v * factor) for k, v in tunable.start().items()}


def at_edge(history: Sequence[Mapping], values: Mapping[str, float]) -> list[str]:
    """The scales whose value in ``values`` (the chosen candidate) is the smallest or the
    largest value of that scale among the candidates of ``history`` ([{"values": ...}, ...]):
    where the search may not have converged (it may lie beyond what was tried)."""
    edge = []
    for name, value in values.items():
        tried = [h["values"][name] for h in history]
        if any(math.isclose(value, t, rel_tol=1e-9) for t in (min(tried), max(tried))):
            edge.append(name)
    return edge


@dataclass(frozen=True)
class StudyTask:
    """A closed-form loss on the mixture: ``name``, ``loss`` (a :class:`QuadraticLoss`,
    :class:`LinearLoss` or :class:`ClassLoss`) and a one-line ``description``."""

    name: str
    loss: object
    description: str

    def exact(self, mixture) -> ExactGuidance:
        return ExactGuidance(mixture, self.loss)

    @property
    def nonnegative(self) -> bool:
        """Whether L ≥ 0 everywhere (DPS's ζ/sqrt(L) step needs it): not the linear loss."""
        return not isinstance(self.loss, LinearLoss)


@dataclass(frozen=True)
class StudySettings:
    """The base sampler every method shares: ``sampler`` ("ddim" or a diffusers scheduler),
    ``steps``, the guidance ``window`` and ``repeats`` (time travel)."""

    sampler: object = "ddim"
    steps: int = 50
    window: tuple[float, float] = (0.0, 1.0)
    repeats: int = 1

    def describe(self) -> dict:
        sampler = self.sampler if isinstance(self.sampler, str) else type(self.sampler).__name__
        return {
            "sampler": sampler,
            "steps": self.steps,
            "window": list(self.window),
            "repeats": self.repeats,
        }


@dataclass(frozen=True)
class Sampled:
    """One guided run: ``samples`` (B, ...), network ``calls`` (each on the whole batch, so
    also per sample) and wall ``seconds`` (time.perf_counter)."""

    samples: torch.Tensor
    calls: int
    seconds: float


def study_mixture(schedule: str = "vp", *, n_components: int | None = 512):
    """``(mixture, settings)``: the digits mixture and its base sampler.

    "vp": the linear DDPM schedule of 1000 steps (``VPSchedule.from_diffusers``) with diffusers'
    ancestral ``DDPMScheduler`` as the sampler; "flow": the rectified flow with shift 3 and
    sagkit's deterministic Euler sampler ("ddim"). Steps: 50 for both (change with
    ``dataclasses.replace``).
    """
    if schedule == "vp":
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="linear", clip_sample=False
        )
        mixture = digits_mixture(
            n_components=n_components, schedule=VPSchedule.from_diffusers(scheduler)
        )
        return mixture, StudySettings(sampler=scheduler)
    if schedule == "flow":
        mixture = digits_mixture(
            n_components=n_components, schedule=FlowSchedule.rectified(shift=3.0)
        )
        return mixture, StudySettings(sampler="ddim")
    raise ValueError(f"schedule must be 'vp' or 'flow', got {schedule!r}")


def reference_image(mixture) -> torch.Tensor:
    """The first of scikit-learn's 8×8 digits that is no mean of ``mixture``, (1, 8, 8)."""
    images, _ = digit_images(8)
    means = mixture.means.detach().reshape(mixture.means.shape[0], -1).to(images)
    if means.shape[1] != 64:
        raise ValueError(
            f"the mixture must be on 8×8 digits, got event shape {mixture.event_shape}"
        )
    gaps = torch.cdist(images.reshape(len(images), -1), means).min(1).values
    return images[int(torch.nonzero(gaps > 0)[0])]


def study_tasks(
    mixture,
    *,
    sharp_tau: float = 0.1,
    broad_tau: float = 1.0,
    label: int = 3,
    strength: float = 5.0,
    linear: float = 2.0,
    names: Sequence[str] | None = None,
) -> list[StudyTask]:
    """The study's losses on ``mixture`` (a digits mixture), optionally only ``names``:

    - "inpaint-sharp" / "inpaint-broad": :meth:`QuadraticLoss.masked` on the top half of
      :func:`reference_image` with τ = ``sharp_tau`` (0.1: one component holds the posterior)
      and ``broad_tau`` (1.0: ~50 components by effective sample size, at 512 components);
    - "class": :meth:`ClassLoss.for_label` of ``label`` with ``strength`` β (5: 95 % of the
      target's mass on the label);
    - "linear": :class:`LinearLoss` with w = −``linear`` · u, u the unit difference of the
      mean 0 and the mean 1 over all digits (2: the target leans to 0's, ~30 components).
    """
    ref = reference_image(mixture)
    mask = torch.zeros_like(ref)
    mask[:, : ref.shape[1] // 2] = 1
    images, labels = digit_images(8)
    u = images[labels == 0].mean(0) - images[labels == 1].mean(0)
    build = {
        "inpaint-sharp": lambda: StudyTask(
            "inpaint-sharp",
            QuadraticLoss.masked(ref, mask, tau=sharp_tau),
            f"top half of a held-out digit, tau={sharp_tau:g}",
        ),
        "inpaint-broad": lambda: StudyTask(
            "inpaint-broad",
            QuadraticLoss.masked(ref, mask, tau=broad_tau),
            f"top half of a held-out digit, tau={broad_tau:g}",
        ),
        "class": lambda: StudyTask(
            "class",
            ClassLoss.for_label(mixture, label, strength=strength),
            f"the mixture's classifier, label {label}, strength {strength:g}",
        ),
        "linear": lambda: StudyTask(
            "linear",
            LinearLoss(-linear * u / u.norm()),
            f"<w, x>, w = -{linear:g} (mean 0 - mean 1)/norm",
        ),
    }
    chosen = list(build) if names is None else list(names)
    unknown = [n for n in chosen if n not in build]
    if unknown:
        raise ValueError(f"names must be among {list(build)}, got {unknown}")
    return [build[n]() for n in chosen]


def split_seed(*parts) -> int:
    """A seed from a hash of ``parts`` (e.g. ("evaluation", task, r, seed)): the tuning's and
    the evaluation's seeds come from different tags, so no tuning run is an evaluation run."""
    digest = hashlib.sha256(repr(("distribution", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def methods_for(task: StudyTask, mixture, methods: Sequence[Tunable] = METHODS) -> list[Tunable]:
    """``methods`` that apply to ``task`` (DPS needs L ≥ 0: not on the linear loss), then the
    oracle with the task's exact guidance."""
    kept = [m for m in methods if task.nonnegative or m.method.name != "dps"]
    return [*kept, Tunable("oracle", Oracle(task.exact(mixture)), ())]


def sample_method(
    network,
    loss,
    fields: Mapping,
    n: int,
    *,
    settings: StudySettings,
    seed: int,
) -> Sampled:
    """n samples of a method (``fields``: :meth:`Tunable.fields` of its scales) on ``network``
    (a model of the protocol), with x_T and the sampler's noise from one generator seeded by
    ``seed``; the network's calls counted and the run timed. (docs/maths.md §14.7)"""
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, *network.event_shape), generator=generator, dtype=torch.float64)
    counting = CountingModel(network)
    start = time.perf_counter()
    samples = guided_sample(
        counting,
        loss,
        x_T,
        steps=settings.steps,
        window=tuple(settings.window),
        repeats=settings.repeats,
        sampler=settings.sampler,
        generator=generator,
        progress=False,
        **fields,
    )
    return Sampled(samples.detach(), counting.calls, time.perf_counter() - start)


def exact_sets(target: TiltedMixture, n: int, seed: int) -> torch.Tensor:
    """n exact samples of the target, (n, ...), from a generator seeded by ``seed``.

    (docs/maths.md §14.7)
    """
    return target.sample(n, generator=torch.Generator().manual_seed(seed))


def _network(mixture) -> TiltedMixture:
    """The mixture in closed form: ε of :class:`GaussianMixture` without its (B, K, D) tensor."""
    return TiltedMixture.of(mixture)


def tune_method(
    mixture,
    task: StudyTask,
    tunable: Tunable,
    *,
    settings: StudySettings,
    samples: int,
    budget: int,
    beam: int = 2,
    seed: int = 0,
    projections: int = 256,
    start_factor: float = START_FACTOR,
) -> dict:
    """The beam search of ``tunable``'s scales minimising the sliced W₂ of ``samples`` guided
    samples (tuning seed) to as many exact samples (docs/maths.md §14.7), from
    :func:`study_start` with ``start_factor``. A candidate whose run fails (a non-finite
    state) scores NaN (ranked last). Returns {"values", "score", "start", "edge" (the scales
    of :func:`at_edge`), "history"}; a method without scales gets its (empty) values and no
    search."""
    if not tunable.scales:
        return {"values": {}, "score": math.nan, "start": {}, "edge": [], "history": []}
    network, exact = _network(mixture), task.exact(mixture)
    reference = exact_sets(exact.target, samples, split_seed("exact-tuning", task.name, seed))
    run_seed = split_seed("tuning", task.name, seed)

    def score(candidates):
        values = []
        for c in candidates:
            try:
                run = sample_method(
                    network, task.loss, tunable.fields(c), samples, settings=settings, seed=run_seed
                )
                values.append(
                    DISTANCES["sliced_w2"](run.samples, reference, projections=projections)
                )
            except ValueError:  # a non-finite state or gradient: the scales are too large
                values.append(math.nan)
        return values

    start = study_start(tunable, start_factor)
    result = beam_search(score, start, budget=budget, beam=beam)
    history = [{"values": c, "score": s, "round": r} for c, s, r in result.history]
    return {
        "values": result.best,
        "score": result.score,
        "start": start,
        "edge": at_edge(history, result.best),
        "history": history,
    }


def run_study(
    mixture,
    settings: StudySettings,
    *,
    tasks: Sequence[StudyTask] | None = None,
    methods: Sequence[Tunable] = METHODS,
    samples: int = 500,
    batches: int = 4,
    tune_samples: int = 256,
    budget: int = 12,
    beam: int = 2,
    seed: int = 0,
    projections: int = 512,
    start_factor: float = START_FACTOR,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Tune every method on every task, then evaluate it on ``batches`` evaluation batches of
    ``samples`` (docs/maths.md §14.7), every search started at :func:`study_start` with
    ``start_factor``.

    Returns {"settings", "floors": {task: {distance: [mean, se]}}, "rows": [...]}, each row
    {"task", "method", "scales", "start", "edge" (bool), "edge_scales" (:func:`at_edge`),
    "tuning_score", "tuning_history", "sliced_w2", "sliced_w2_se", "energy", "energy_se",
    "calls_per_sample", "sec_per_sample"}.
    """
    if samples < 2 or batches < 2:
        raise ValueError(
            f"samples and batches must be ≥ 2 (standard errors), got {samples}, {batches}"
        )
    tasks = study_tasks(mixture) if tasks is None else list(tasks)
    network = _network(mixture)
    sizes = {"samples": samples, "batches": batches, "tune_samples": tune_samples}
    sizes |= {"budget": budget, "beam": beam, "start_factor": start_factor, "seed": seed}
    tuning = {k: sizes[k] for k in ("budget", "beam", "seed", "start_factor")}
    tuning |= {"settings": settings, "samples": tune_samples}
    evaluation = {"settings": settings, "samples": samples, "batches": batches, "seed": seed}
    rows, floors = [], {}
    for task in tasks:
        tunables = methods_for(task, mixture, methods)
        tuned = _tune_task(mixture, task, tunables, tuning, progress=progress, log=log)
        exact = task.exact(mixture)
        options = evaluation | {"projections": projections, "progress": progress}
        measured = _evaluate_task(network, task, tunables, tuned, exact, **options)
        floors[task.name] = _task_floors(task, samples, batches=batches, seed=seed, mixture=mixture)
        rows += [_study_row(task, t, tuned[t.label], measured[t.label]) for t in tunables]
        if log is not None:
            log(_task_table(rows, floors, task.name))
    described = {"components": mixture.means.shape[0], "schedule": mixture.schedule.name}
    described |= sizes | {"projections": projections}
    described["tasks"] = {t.name: t.description for t in tasks}
    return {"settings": settings.describe() | described, "floors": floors, "rows": rows}


def _tune_task(mixture, task, tunables, tuning: dict, *, progress: bool, log) -> dict:
    """{label: :func:`tune_method`'s result} for every method of ``task``, a line each to
    ``log``; ``tuning`` holds tune_method's options."""
    tuned = {}
    for tunable in tqdm(tunables, desc=f"tuning {task.name}", disable=not progress, leave=False):
        tuned[tunable.label] = tune_method(mixture, task, tunable, **tuning)
        if log is not None:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in tuned[tunable.label]["values"].items())
            edge = tuned[tunable.label]["edge"]
            log(
                f"{task.name:14s} {tunable.label:15s} {shown} "
                f"(SW2 {tuned[tunable.label]['score']:.4g})"
                + (f" at the edge: {', '.join(edge)}" if edge else "")
            )
    return tuned


def _evaluate_task(
    network,
    task,
    tunables,
    tuned,
    exact,
    *,
    settings,
    samples,
    batches,
    seed,
    projections,
    progress,
) -> dict:
    """{label: {"distances": {name: [per batch]}, "calls", "seconds"}}: every tuned method on
    ``batches`` evaluation batches, each against its own exact set; every method per batch,
    so the timings interleave."""
    measured = {
        t.label: {"distances": {d: [] for d in DISTANCES}, "calls": 0, "seconds": 0.0}
        for t in tunables
    }
    sets = [
        exact_sets(exact.target, samples, split_seed("exact-evaluation", task.name, r, seed))
        for r in range(batches)
    ]
    bar = tqdm(range(batches), desc=f"evaluating {task.name}", disable=not progress, leave=False)
    for r in bar:
        for tunable in tunables:
            run = sample_method(
                network,
                task.loss,
                tunable.fields(tuned[tunable.label]["values"]),
                samples,
                settings=settings,
                seed=split_seed("evaluation", task.name, r, seed),
            )
            out = measured[tunable.label]
            for name, distance in DISTANCES.items():
                options = {"projections": projections} if name == "sliced_w2" else {}
                out["distances"][name].append(distance(run.samples, sets[r], **options))
            out["calls"] = run.calls
            out["seconds"] += run.seconds
    for out in measured.values():
        out["seconds"] /= batches * samples
    return measured


def _task_floors(task, samples: int, *, batches: int, seed: int, mixture) -> dict:
    """{distance: [mean, se]}: the noise floor of ``task`` at the evaluation's size."""
    exact = task.exact(mixture)
    return {
        name: list(
            noise_floor(
                lambda n, g: exact.target.sample(n, generator=g),
                samples,
                distance=name,
                repeats=batches,
                seed=split_seed("floor", task.name, seed),
            )
        )
        for name in DISTANCES
    }


def _study_row(task, tunable, tuned: dict, measured: dict) -> dict:
    """One row of :func:`run_study`: the tuned values, the search's record, the distances
    (mean and s.e. over the batches) and the costs."""
    row = {
        "task": task.name,
        "method": tunable.label,
        "scales": tuned["values"],
        "start": tuned["start"],
        "edge": bool(tuned["edge"]),
        "edge_scales": tuned["edge"],
        "tuning_score": tuned["score"],
        "tuning_history": tuned["history"],
    }
    for name in DISTANCES:
        mean, se = mean_and_error(measured["distances"][name])
        row |= {name: mean, f"{name}_se": se}
    return row | {"calls_per_sample": measured["calls"], "sec_per_sample": measured["seconds"]}


def _task_table(rows, floors, task) -> str:
    lines = [
        f"{task}: floor SW2 {floors[task]['sliced_w2'][0]:.4f} ± {floors[task]['sliced_w2'][1]:.4f}"
    ]
    for r in rows:
        if r["task"] == task:
            lines.append(
                f"  {r['method']:15s} SW2 {r['sliced_w2']:.4f} ± {r['sliced_w2_se']:.4f}  "
                f"calls {r['calls_per_sample']}  s/sample {r['sec_per_sample']:.2e}"
            )
    return "\n".join(lines)


QUICK: dict = {
    "n_components": 64,
    "steps": 20,
    "names": ("inpaint-broad",),
    "methods": ("unguided", "freedom", "dps", "sag n=2", "sag n=4", "mpgd"),
    "samples": 128,
    "batches": 2,
    "tune_samples": 64,
    "budget": 3,
}
"""The small size of :func:`quick_study` (a notebook's: under a minute on 2 cores). Its 20
steps are too few for the oracle to reach the floor (it does at the stored size)."""


def quick_study(schedule: str = "vp", **sizes) -> dict:
    """:func:`run_study` at the small size :data:`QUICK` (any of its keys overridden by
    ``sizes``; "methods" are labels of :data:`METHODS`) on ``schedule``'s mixture: for
    notebooks. The oracle is always added."""
    unknown = set(sizes) - set(QUICK)
    if unknown:
        raise ValueError(f"sizes must be among {list(QUICK)}, got {sorted(unknown)}")
    size = QUICK | sizes
    by = {m.label: m for m in METHODS}
    missing = [m for m in size["methods"] if m not in by]
    if missing:
        raise ValueError(f"methods must be labels of METHODS {list(by)}, got {missing}")
    mixture, settings = study_mixture(schedule, n_components=size["n_components"])
    settings = dataclasses.replace(settings, steps=size["steps"])
    return run_study(
        mixture,
        settings,
        tasks=study_tasks(mixture, names=size["names"]),
        methods=[by[m] for m in size["methods"]],
        samples=size["samples"],
        batches=size["batches"],
        tune_samples=size["tune_samples"],
        budget=size["budget"],
        progress=False,
    )


SMC_PARTICLES: tuple[int, ...] = (4, 16)
"""The particle counts N of :func:`smc_rows`."""

SMC_FALLBACK_SCALE: float = 0.2
"""The proposal's scale c when the tuned one collapses the particle weights (:func:`smc_rows`)."""

SMC_COLLAPSE_ESS: float = 1.5
"""A proposal collapses when its mean effective sample size (over steps and runs, before
resampling) is below this many particles: the weights sit on about one particle throughout."""


def smc_label(n: int, proposal: str = "freedom") -> str:
    """The method label of :func:`smc_rows`' row with n particles, e.g.
    "smc N=4 (freedom, exact twist)"."""
    return f"smc N={n} ({proposal}, exact twist)"


def smc_rows(
    mixture,
    settings: StudySettings,
    study: Mapping,
    *,
    tasks: Sequence[str] | None = None,
    particles: Sequence[int] = SMC_PARTICLES,
    proposal: str = "freedom",
    fallback: float = SMC_FALLBACK_SCALE,
    progress: bool = False,
) -> list[dict]:
    """Reference rows for a stored ``study`` (:func:`run_study`'s dict, on ``mixture`` and
    ``settings``): twisted SMC (docs/maths.md §14.7, §14.8) with ``proposal``'s step at the
    scale c it was tuned to on each task (its row of ``study``), the exact twisting function
    (:class:`~sagkit.guidance.smc.ExactTwist`) and N of ``particles`` per run, one draw per run:

        w = p(x_s | x_t) φ_s(x_s) / (q_c(x_s | x_t) φ_t(x_t)),   φ_t = E[e^{−L(x_0)} | x_t],

    on the study's evaluation batches (same sizes, sampler seeds and exact sets, so the
    distances and their standard errors compare with the other rows'). A task whose proposal
    collapses at the tuned c (a mean ESS below :data:`SMC_COLLAPSE_ESS` at some N on the first
    batch) runs at c = ``fallback``; ``proposal_scale`` and ``proposal_scale_source`` record which. Calls per
    sample: N × the proposal's calls (the exact twisting makes none). Rows of
    :func:`run_study`'s keys with ``"reference": True``, ``particles`` and the weights'
    ``ess_mean``, ``final_ess`` and ``resampling_rate`` (means over the batches)."""
    st = study["settings"]
    names = list(st["tasks"]) if tasks is None else list(tasks)
    size = {k: st[k] for k in ("samples", "batches", "seed", "projections")}
    network, rows = _network(mixture), []
    for task in study_tasks(mixture, names=names):
        tuned = [r for r in study["rows"] if r["task"] == task.name and r["method"] == proposal]
        if len(tuned) != 1:
            raise ValueError(f"the study has no row of {proposal!r} on {task.name!r}")
        scale, source = tuned[0]["scales"]["scale"], "tuned"
        size["progress"] = progress
        check = _smc_task(
            network, task, mixture, settings, particles, proposal, scale, size | {"batches": 1}
        )
        tuned_ess = min(m["ess_mean"] for m in check.values())
        if tuned_ess < SMC_COLLAPSE_ESS:
            scale, source = fallback, f"fallback (tuned c = {scale:.4g}: mean ESS {tuned_ess:.3g})"
        measured = _smc_task(network, task, mixture, settings, particles, proposal, scale, size)
        for n in particles:
            row = _study_row(
                task, Tunable(smc_label(n, proposal), proposal, ()), _UNTUNED, measured[n]
            )
            rows.append(
                row
                | {"reference": True, "particles": n, "twist": "exact"}
                | {"proposal": proposal, "proposal_scale": scale}
                | {"proposal_scale_source": source}
                | {k: measured[n][k] for k in ("ess_mean", "final_ess", "resampling_rate")}
            )
    return rows


_UNTUNED = {"values": {}, "start": {}, "edge": [], "score": math.nan, "history": []}


def _smc_task(network, task, mixture, settings, particles, proposal, scale, size) -> dict:
    """{N: {"distances", "calls", "seconds", "ess_mean", "final_ess", "resampling_rate"}}:
    twisted SMC on ``task``'s evaluation batches (``size``: samples, batches, seed,
    projections, progress), every N per batch, x_T and the kernels' noise from the batch's evaluation
    seed, each batch against the study's exact set. (docs/maths.md §14.7)"""
    exact = task.exact(mixture)
    samples, batches, seed = size["samples"], size["batches"], size["seed"]
    stats = ("ess_mean", "final_ess", "resampling_rate")
    out = {
        n: {"distances": {d: [] for d in DISTANCES}, "seconds": 0.0} | dict.fromkeys(stats, 0.0)
        for n in particles
    }
    for r in tqdm(range(batches), desc=f"smc {task.name}", disable=not size["progress"]):
        reference = exact_sets(
            exact.target, samples, split_seed("exact-evaluation", task.name, r, seed)
        )
        for n in particles:
            generator = torch.Generator().manual_seed(split_seed("evaluation", task.name, r, seed))
            x_T = torch.randn(
                (samples, n, *network.event_shape), generator=generator, dtype=torch.float64
            )
            counting = CountingModel(network)
            start = time.perf_counter()
            result = sample_smc(
                counting, task.loss, x_T, twist=ExactTwist(exact), guidance=proposal,
                steps=settings.steps, sampler=settings.sampler, window=tuple(settings.window),
                scale=scale, generator=generator, progress=False,
            )  # fmt: skip
            draws = result.draw(generator=generator)
            m = out[n]
            m["seconds"] += (time.perf_counter() - start) / (batches * samples)
            m["calls"] = n * counting.calls
            for name, distance in DISTANCES.items():
                options = {"projections": size["projections"]} if name == "sliced_w2" else {}
                m["distances"][name].append(distance(draws, reference, **options))
            m["ess_mean"] += float(result.ess[:-1].mean()) / batches
            m["final_ess"] += float(result.ess[-1].mean()) / batches
            m["resampling_rate"] += float(result.resampled.double().mean()) / batches
    return out


def frontier(
    study: Mapping,
    task: str,
    *,
    distance: str = "sliced_w2",
    cost: str = "calls_per_sample",
    without: Sequence[str] = ("oracle",),
) -> list[dict]:
    """The quality–cost frontier of ``task``: the rows (but the methods ``without``, default
    the oracle, which is ground truth, not a method, and the reference rows of :func:`smc_rows`,
    ``"reference": True``, exact in the limit) not dominated in (``cost``, ``distance``):
    no other row at most as costly and at most as far, one of them strictly. Sorted by cost,
    each {"method", cost, distance, distance + "_se"}. (docs/maths.md §14.7)"""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {list(DISTANCES)}, got {distance!r}")
    if cost not in ("calls_per_sample", "sec_per_sample"):
        raise ValueError(f"cost must be 'calls_per_sample' or 'sec_per_sample', got {cost!r}")
    rows = [r for r in study["rows"] if r["task"] == task and r["method"] not in without]
    if not any(r["task"] == task for r in study["rows"]):
        raise ValueError(f"the study has no task {task!r}")
    rows, kept = [r for r in rows if not r.get("reference")], []
    for r in rows:
        dominated = any(
            o[cost] <= r[cost]
            and o[distance] <= r[distance]
            and (o[cost] < r[cost] or o[distance] < r[distance])
            for o in rows
        )
        if not dominated:
            kept.append(
                {
                    "method": r["method"],
                    cost: r[cost],
                    distance: r[distance],
                    f"{distance}_se": r[f"{distance}_se"],
                }
            )
    return sorted(kept, key=lambda p: (p[cost], p[distance]))


def _floor_band(ax, floor, *, horizontal: bool = True) -> None:
    """The noise floor: its mean (dashed) and ± 2 standard errors (shaded)."""
    mean, se = floor
    ax.axhspan(mean - 2 * se, mean + 2 * se, color="0.8", zorder=0, label="noise floor ± 2 s.e.")
    ax.axhline(mean, color="0.4", ls="--", lw=1)


def plot_distances(study: Mapping, *, distance: str = "sliced_w2"):
    """One panel per task: each method's tuned ``distance`` to exact samples (± 2 s.e. over
    the evaluation batches) on a log axis, with the noise floor's band; the reference rows
    (:func:`smc_rows`) as red diamonds after the methods (docs/maths.md §14.7)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {list(DISTANCES)}, got {distance!r}")
    tasks = list(study["floors"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [r for r in study["rows"] if r["task"] == task]
        rows = [r for r in rows if not r.get("reference")] + [r for r in rows if r.get("reference")]
        x = range(len(rows))
        for reference, style in ((False, {"fmt": "o"}), (True, _REFERENCE_STYLE)):
            shown = [(i, r) for i, r in enumerate(rows) if bool(r.get("reference")) == reference]
            if shown:
                ax.errorbar(
                    [i for i, _ in shown],
                    [r[distance] for _, r in shown],
                    yerr=[2 * r[f"{distance}_se"] for _, r in shown],
                    capsize=3,
                    label="reference (SMC) ± 2 s.e." if reference else "method ± 2 s.e.",
                    **style,
                )
        _floor_band(ax, study["floors"][task][distance])
        ax.set_xticks(list(x), [r["method"] for r in rows], rotation=60, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_ylabel(f"{_NAMES[distance]} to exact samples (log)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


_REFERENCE_STYLE = {"fmt": "D", "color": "tab:red", "mfc": "none", "ms": 7}
"""How the reference rows (:func:`smc_rows`) are drawn: open red diamonds."""
_NAMES = {"sliced_w2": "sliced W2", "energy": "energy distance"}
_COSTS = {"calls_per_sample": "network calls per sample", "sec_per_sample": "seconds per sample"}


def _polyline(ax, rows: Sequence[Mapping], cost: str, distance: str, style: str, **line) -> None:
    """The rows' (cost, distance) points joined by one thin line of ``style``."""
    ax.plot([r[cost] for r in rows], [r[distance] for r in rows], style, lw=1, **line)


def _frontier_point(ax, r: Mapping, cost: str, distance: str, *, colour) -> None:
    """One row of :func:`plot_frontier`: a method in ``colour``, the oracle a black star, a
    reference row an open red diamond, each ± 2 s.e."""
    oracle = r["method"] == "oracle"
    style = (
        _REFERENCE_STYLE
        if r.get("reference")
        else {
            "fmt": "*" if oracle else "o",
            "ms": 10 if oracle else 5,
            "color": "k" if oracle else colour,
        }
    )
    ax.errorbar(
        [r[cost]],
        [r[distance]],
        yerr=[2 * r[f"{distance}_se"]],
        capsize=2,
        label=r["method"],
        **style,
    )


def plot_frontier(study: Mapping, *, distance: str = "sliced_w2"):
    """Distance against cost, a row of two panels per task (network calls per sample, and
    seconds per sample as measured), log axes: each method a point (± 2 s.e.), the frontier of
    :func:`frontier` a line, the noise floor a band, the oracle a star, the reference rows
    (:func:`smc_rows`) open red diamonds joined by a dotted "reference (SMC)" line
    (docs/maths.md §14.7)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {list(DISTANCES)}, got {distance!r}")
    tasks = list(study["floors"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.8 * len(tasks)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    methods = list(dict.fromkeys(r["method"] for r in study["rows"]))  # one colour per method

    def cmap_index(method):
        j = methods.index(method)
        return cmap((2 * j + j // 10) % 20)

    for i, task in enumerate(tasks):
        rows = [r for r in study["rows"] if r["task"] == task]
        for ax, cost in zip(axes[i], _COSTS, strict=True):
            for r in rows:
                _frontier_point(ax, r, cost, distance, colour=cmap_index(r["method"]))
            line = frontier(study, task, distance=distance, cost=cost)
            _polyline(ax, line, cost, distance, "-", color="0.3", drawstyle="steps-post",
                      label="frontier")  # fmt: skip
            refs = sorted((r for r in rows if r.get("reference")), key=lambda r: r[cost])
            if refs:
                _polyline(ax, refs, cost, distance, ":", color="tab:red", label="reference (SMC)")
            _floor_band(ax, study["floors"][task][distance])
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # 2×10², 3×10², … overlap
            ax.set_yscale("log")
            ax.set_xlabel(_COSTS[cost] + " (log)")
            ax.set_ylabel(f"{_NAMES[distance]} (log)")
            ax.set_title(task)
        axes[i][1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig
