"""Misalignment: how far the n-step estimates of x₀ along a sampling run sit from its output.

At time t the misalignment of the n-step estimate is ‖x̂0^{(n)}(x_t) − x_final‖ (RMS per
sample), x_final being what the sampler makes of x_t (docs/maths.md §3.3). It is the
quantity SAG's n-step estimate reduces; notebook 01 shows it. On a Gaussian mixture,
:func:`commitment` says what the distance means in pictures: whether an estimate already shows
the final sample's class, and how much of its contrast.

Two schedules (a variance-preserving one and a rectified flow) run on different clocks: the same
t is a different noise level under each. :func:`misalignment_by_noise_level` compares them at
matched noise levels, the same λ = log(α/σ), and :func:`matched_window` moves a guidance window
from one schedule to the same noise levels under another (docs/maths.md §3.4).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from ..core.checks import check_count, check_inputs, check_time
from ..core.estimates import estimate_x0, rms_distance
from ..core.schedules import Schedule, nearest_index, time_grid
from ..core.solvers import solve
from ..guidance.travel import check_window

__all__ = ["misalignment", "misalignment_by_noise_level", "matched_window", "commitment"]


@torch.no_grad()
def misalignment(
    model,
    x_T: torch.Tensor,
    *,
    times=(0.9, 0.7, 0.5, 0.3, 0.1),
    ns=(1, 2, 4, 8),
    steps: int = 100,
    solver: str = "ddim",
    t_start: float = 1.0,
    cond=None,
    progress: bool = False,
) -> dict:
    """Distance between n-step estimates along a sampling run and the run's final sample.

    The sampler runs ``steps`` ``solver`` steps uniform in t from ``t_start`` to 0, starting at
    x_T (B, ...). At the grid point nearest each t in ``times``, every n in ``ns`` gives an
    estimate ``estimate_x0(model, x_t, t, n, solver)``, compared with the final sample.

    Returns a dict with ``times`` (the grid times used), ``ns``, ``rms`` (a float64 tensor of
    shape (len(times), len(ns)): mean over the batch of the per-sample RMS distance),
    ``final`` (B, ...), ``states`` {t: x_t} and ``estimates`` {(t, n): x̂0}. ``progress`` shows
    the sampler's bar, then one that advances per estimate.

    (docs/maths.md §3.3)
    """
    check_inputs(model, x_T, cond=cond, x_name="x_T")
    times, ns = tuple(times), tuple(ns)
    if not times or not ns:
        raise ValueError(f"times and ns must be non-empty, got times={times}, ns={ns}")
    check_time(times, "times")
    _check_ns(ns)
    ts = time_grid(model.schedule, t_start, 0.0, check_count(steps, "steps"))
    wanted = [nearest_index(ts, t) for t in times]
    return _estimates_along(model, x_T, ts, wanted, ns, solver, cond, progress)


def _check_ns(ns) -> None:
    for n in ns:
        check_count(n, "ns entries")


def _estimates_along(model, x_T, ts, wanted, ns, solver, cond, progress) -> dict:
    """The body of :func:`misalignment`: sample on the grid ``ts`` from x_T, and at the grid
    points ``wanted`` (indices into ts) make the n-step estimates for each n in ``ns``."""
    states = {}

    def keep(i, t, x):
        if i in wanted:
            states[t] = x.clone()

    final = solve(model, x_T, ts, solver=solver, cond=cond, callback=keep, progress=progress)
    used = [float(ts[i]) for i in wanted]
    rms = torch.zeros(len(used), len(ns), dtype=torch.float64)
    estimates = {}
    bar = tqdm(total=len(used) * len(ns), desc="estimates", disable=not progress)
    for i, t in enumerate(used):
        for j, n in enumerate(ns):
            bar.set_postfix_str(f"t={t:.2f}, n={n}")
            est = estimate_x0(model, states[t], t, n=n, solver=solver, cond=cond)
            estimates[(t, n)] = est
            rms[i, j] = rms_distance(est, final).mean().double()
            bar.update()
    bar.close()
    return {
        "times": used,
        "ns": list(ns),
        "rms": rms,
        "final": final,
        "states": states,
        "estimates": estimates,
    }


def _times_of(schedule: Schedule, lams, name: str, t_start: float = 1.0) -> list[float]:
    """t(λ) for each λ, checked to lie strictly inside (0, t_start)."""
    lam_start = schedule.lam(float(t_start))
    times = []
    for lam in lams:
        real = isinstance(lam, numbers.Real) and not isinstance(lam, bool)
        if not (real and math.isfinite(lam) and lam > lam_start):
            raise ValueError(
                f"{name} must be finite noise levels λ above λ(t = {t_start:g}) = "
                f"{lam_start:.3g} of {schedule!r} (reached by its sampler), got {lam!r}"
            )
        times.append(float(schedule.t_of_lam(float(lam))))
    return times


def _grid_through(ts: torch.Tensor, times: list[float]) -> tuple[torch.Tensor, list[int]]:
    """The decreasing grid ``ts`` with ``times`` inserted (a grid point equal to a time to
    float64 rounding, 1e-12, is used as it is), and the index of each time in it."""
    points = ts.tolist()
    for t in times:
        if min(abs(p - t) for p in points) > 1e-12:
            points.append(t)
    grid = torch.tensor(sorted(points, reverse=True), dtype=torch.float64)
    return grid, [nearest_index(grid, t) for t in times]


@torch.no_grad()
def misalignment_by_noise_level(
    models: Mapping[str, object],
    x_T: torch.Tensor,
    *,
    lams=(-3.0, -2.0, -1.0, 0.0, 1.0, 2.0),
    ns=(1, 2, 4, 8),
    steps: int = 100,
    solver: str = "ddim",
    progress: bool = False,
) -> dict:
    """The misalignment of :func:`misalignment` under several schedules, at matched noise levels.

    Each model (the same data under different schedules, e.g. ``digits_mixture(schedule=...)``)
    samples from the same x_T (B, ...) with its own sampler: ``steps`` ``solver`` steps uniform
    in its t from 1 to 0, with the times t_m(λ) of the noise levels λ in ``lams`` added to the
    grid, so that its state x_t is kept at exactly those noise levels. At each λ every n in
    ``ns`` gives the n-step estimate (its grid uniform in the model's t from t_m(λ) to 0),
    compared with the model's final sample:

        rms_m[i, j] = mean_b RMS(x̂0^{(n_j)}(x_{t_m(λ_i)}) − x_final),
        ratio_m = rms_first / rms_m   (elementwise; > 1: m is better aligned than the first).

    λ = log(α_t/σ_t) is the half log signal-to-noise ratio: at the same λ the state divided by
    α_t, x_t/α_t = x_0 + e^{−λ} ε, holds the same information under every schedule.

    Args:
        models: {name: model}, at least two; the first is the reference of ``ratio``.
        x_T: (B, ...) the initial noise, shared by every model.
        lams: the noise levels, each above λ(t = 1) of every schedule.
    Returns:
        {"lams": list, "ns": list, "times": {name: [t_m(λ) per λ]}, "rms": {name: (L, N)
        float64}, "ratio": {name: (L, N) float64}, "results": {name: the :func:`misalignment`
        dict of that model, keyed by its times}}.

    (docs/maths.md §3.4)
    """
    if not isinstance(models, Mapping) or len(models) < 2:
        raise TypeError("models must be a mapping {name: model} of at least two models")
    lams, ns = tuple(lams), tuple(ns)
    if not lams or not ns:
        raise ValueError(f"lams and ns must be non-empty, got lams={lams}, ns={ns}")
    _check_ns(ns)
    steps = check_count(steps, "steps")
    for model in models.values():
        check_inputs(model, x_T, x_name="x_T")
    times = {name: _times_of(m.schedule, lams, "lams") for name, m in models.items()}
    results = {}
    for name, model in tqdm(models.items(), desc="schedules", disable=not progress):
        ts, wanted = _grid_through(time_grid(model.schedule, 1.0, 0.0, steps), times[name])
        results[name] = _estimates_along(model, x_T, ts, wanted, ns, solver, None, progress)
    rms = {name: r["rms"] for name, r in results.items()}
    first = rms[next(iter(models))]
    return {
        "lams": list(lams),
        "ns": list(ns),
        "times": times,
        "rms": rms,
        "ratio": {name: first / value for name, value in rms.items()},
        "results": results,
    }


def matched_window(window, *, schedule: Schedule, reference: Schedule) -> tuple[float, float]:
    """The guidance window under ``schedule`` that guides the noise levels ``window`` guides
    under ``reference``.

    A window (lo, hi) guides step k of a run uniform in t from 1 to 0 when lo ≤ k/steps < hi,
    i.e. the states at t ∈ (1 − hi, 1 − lo] (:func:`sagkit.guidance.travel.guidance_window`).
    Each end moves to the same λ: f ↦ 1 − t_s(λ_r(1 − f)), with the ends of a run kept
    (0 ↦ 0, 1 ↦ 1: the start of a run is the start of a run, its end the clean image).

    Returns:
        (lo', hi') for ``schedule``.

    (docs/maths.md §3.4)
    """
    lo, hi = check_window(window)
    for name, value in (("schedule", schedule), ("reference", reference)):
        if not isinstance(value, Schedule):
            raise TypeError(f"{name} must be a Schedule, got {type(value).__name__}")

    def moved(f: float) -> float:
        if f in (0.0, 1.0):
            return f
        return 1.0 - float(schedule.t_of_lam(float(reference.lam(1.0 - f))))

    return moved(lo), moved(hi)


def _nearest_mean(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """k*(x_b) = argmin_k ‖x_b − μ_k‖ for each sample: x (B, ...) and means (K, ...) of the
    same trailing shape → indices (B,) (docs/maths.md §3.3)."""
    return torch.cdist(x.flatten(1), means.flatten(1).to(x)).argmin(1)


def commitment(result: dict, *, means, labels) -> dict:
    """What the misalignment of a :func:`misalignment` result means in pictures, on a mixture.

    For the estimate x̂ at times[i] with ns[j] steps and the final sample x_final:

        same_label[i, j] = mean_b 1[ℓ(k*(x̂_b)) = ℓ(k*(x_final,b))]
        contrast[i, j]   = mean_b std(x̂_b) / mean_b std(x_final,b)

    k*(x) = argmin_k ‖x − μ_k‖ the nearest mean, ℓ its label, std over the pixels of a sample.
    same_label is the fraction of estimates that already show the final sample's class (digit);
    a contrast below 1 is a greyer image than the final sample, the blur of an average.

    Args:
        result: the dict returned by :func:`misalignment` (``times``, ``ns``, ``final``,
            ``estimates``).
        means: (K, ...) the mixture's component means, the samples' shape after K.
        labels: (K,) the class of each mean (e.g. ``digits_mixture(...).labels``).
    Returns:
        {"same_label": (len(times), len(ns)), "contrast": (len(times), len(ns))}, float64.

    (docs/maths.md §3.3)
    """
    final = result["final"]
    means, labels = torch.as_tensor(means), torch.as_tensor(labels)
    if means.ndim != final.ndim or tuple(means.shape[1:]) != tuple(final.shape[1:]):
        raise ValueError(
            f"means must have shape (K, {', '.join(map(str, final.shape[1:]))}) (the samples' "
            f"shape), got {tuple(means.shape)}"
        )
    if labels.shape != means.shape[:1]:
        raise ValueError(
            f"labels must have shape ({means.shape[0]},) (one per mean), got {tuple(labels.shape)}"
        )
    labels = labels.to(final.device)
    final_label = labels[_nearest_mean(final, means)]
    final_std = final.flatten(1).std(1).mean().double()
    times, ns = result["times"], result["ns"]
    same = torch.zeros(len(times), len(ns), dtype=torch.float64)
    contrast = torch.zeros_like(same)
    for i, t in enumerate(times):
        for j, n in enumerate(ns):
            est = result["estimates"][(t, n)]
            same[i, j] = (labels[_nearest_mean(est, means)] == final_label).double().mean()
            contrast[i, j] = est.flatten(1).std(1).mean().double() / final_std
    return {"same_label": same, "contrast": contrast}
