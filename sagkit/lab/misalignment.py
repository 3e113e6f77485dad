"""Misalignment: how far the n-step estimates of x₀ along a sampling run sit from its output.

At time t the misalignment of the n-step estimate is ‖x̂0^{(n)}(x_t) − x_final‖ (RMS per
sample), x_final being what the sampler makes of x_t (docs/maths.md §3.3). It is the
quantity SAG's n-step estimate reduces; notebook 01 shows it. On a Gaussian mixture,
:func:`commitment` says what the distance means in pictures: whether an estimate already shows
the final sample's class, and how much of its contrast.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..core.checks import check_count, check_inputs, check_time
from ..core.estimates import estimate_x0, rms_distance
from ..core.schedules import nearest_index, time_grid
from ..core.solvers import solve

__all__ = ["misalignment", "commitment"]


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
    for n in ns:
        check_count(n, "ns entries")
    ts = time_grid(model.schedule, t_start, 0.0, check_count(steps, "steps"))
    wanted = [nearest_index(ts, t) for t in times]
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
