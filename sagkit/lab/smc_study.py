"""How many particles make a heuristic exact: twisted SMC on the digits mixture.

Twisted sequential Monte Carlo (:func:`sagkit.guidance.smc.sample_smc`, docs/maths.md §14.8)
turns a guidance method's step into a proposal and reweights its particles; one draw per
independent run, resampled from its final weights, is a sample whose law tends to the model's
tilted path measure as the particle count N grows. :func:`smc_study` measures how fast on a
:class:`~sagkit.GaussianMixture` whose tilted target is exact (:mod:`sagkit.core.tilted`):

    d(N) = SW₂(one draw from each of m runs, m exact samples),

in ``groups`` independent groups (mean ± standard error over them), against the noise floor of
two exact sets of m samples (:func:`~sagkit.lab.distances.noise_floor`), for each twisting
function (the exact log E[e^{−L} | x_t], or the heuristic −L(x̂0(x_t))). N = 1 is the proposal
alone: the heuristic sampler. Each row also stores the cost of one final sample: its network
calls (of which differentiated, for the proposal's gradient) and wall seconds.

The network is the mixture's exact prediction in closed form (``TiltedMixture.of(mixture)``,
the same function as ``mixture.eps`` without its (B, K, D) intermediate).
"""

from __future__ import annotations

import math
import time

import matplotlib.pyplot as plt
import torch

from ..core.tilted import ClassLoss, ExactGuidance, QuadraticLoss, TiltedMixture
from ..digits.data import digit_images
from ..guidance.smc import EstimateTwist, ExactTwist, sample_smc
from .distances import mean_and_error, noise_floor, sliced_w2

__all__ = [
    "TWISTS",
    "heldout_reference",
    "smc_tasks",
    "make_twist",
    "smc_curve",
    "smc_study",
    "plot_smc",
]

TWISTS = ("exact", "one-step")
"""The twisting functions of the study: the exact one, and TDS's one-step heuristic."""


def heldout_reference(mixture, *, index: int = 0) -> tuple[torch.Tensor, int]:
    """The ``index``-th digits image (1, 8, 8) that is not a mean of ``mixture``, and its
    digit: an inpainting reference the mixture does not hold as a component."""
    images, labels = digit_images(8)
    means = mixture.means.detach().reshape(mixture.means.shape[0], -1).to(images)
    gap = torch.cdist(images.reshape(len(images), -1), means).min(1).values
    outside = torch.nonzero(gap > 0).flatten()
    if not 0 <= index < len(outside):
        raise ValueError(f"index must be in [0, {len(outside)}), got {index}")
    chosen = int(outside[index])
    return images[chosen], int(labels[chosen])


def smc_tasks(
    mixture,
    *,
    tau: float = 0.2,
    label: int = 3,
    strength: float = 5.0,
    index: int = 0,
) -> dict:
    """The study's losses on ``mixture`` (a digits mixture): "inpaint", the top half of a
    held-out digit (:func:`heldout_reference`) observed with noise τ (a sharp posterior), and
    "class", the mixture's exact classifier toward ``label``."""
    reference, _ = heldout_reference(mixture, index=index)
    mask = torch.zeros_like(reference)
    mask[..., : reference.shape[-2] // 2, :] = 1.0
    return {
        "inpaint": QuadraticLoss.masked(reference, mask, tau=tau),
        "class": ClassLoss.for_label(mixture, label, strength=strength),
    }


def make_twist(name: str, exact: ExactGuidance, loss):
    """The twisting function ``name`` of :data:`TWISTS` ("exact" or "one-step")."""
    if name == "exact":
        return ExactTwist(exact)
    if name == "one-step":
        return EstimateTwist(loss, n=1)
    raise ValueError(f"twist must be one of {list(TWISTS)}, got {name!r}")


class _Counted:
    """The network with its rows counted: ``rows`` evaluated, ``graph_rows`` of them with a
    graph (differentiated for the proposal's gradient)."""

    def __init__(self, model):
        self.model, self.schedule = model, model.schedule
        self.rows = self.graph_rows = 0

    def eps(self, x, t, cond=None):
        self.rows += x.shape[0]
        if torch.is_grad_enabled() and x.requires_grad:
            self.graph_rows += x.shape[0]
        return self.model.eps(x, t, cond)


def smc_curve(
    mixture,
    loss,
    *,
    twist: str = "exact",
    particles=(1, 2, 4, 8, 16, 32, 64),
    guidance="freedom",
    scale: float | None = None,
    steps: int = 100,
    sampler="ddim",
    runs: int = 64,
    groups: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """One row per particle count N: the distance d(N) of ``groups`` × ``runs`` draws (one
    per SMC run) to the exact tilted target, and the cost per draw.

    Row keys: ``twist``, ``particles``, ``distance`` and ``error`` (mean and standard error
    over the groups), ``distances`` (per group), ``calls_per_sample`` (network rows per
    draw), ``graph_calls_per_sample`` (of them differentiated), ``seconds_per_sample``,
    ``final_ess`` (mean, of N), ``resampling_rate`` (fraction of steps and runs resampled)
    and ``log_normaliser`` (log of the mean of Ẑ over runs; log Z of the exact tilt is the
    study's ``log_z``).
    """
    exact = ExactGuidance(mixture, loss)
    network = TiltedMixture.of(mixture)
    rows = []
    for n in particles:
        counted = _Counted(network)
        result, draws, seconds = _smc_draws(
            counted, mixture, loss, n, twist=make_twist(twist, exact, loss), guidance=guidance,
            scale=scale, steps=steps, sampler=sampler, size=groups * runs, seed=seed,
            progress=progress,
        )  # fmt: skip
        distances = _group_distances(draws, exact, runs=runs, groups=groups, seed=seed)
        rows.append(_curve_row(twist, n, result, counted, distances, seconds, size=groups * runs))
    return rows


def _smc_draws(
    counted, mixture, loss, n, *, twist, guidance, scale, steps, sampler, size, seed, progress
):
    """``size`` SMC runs of n particles from noise of the seed ``seed + 1000 n``, and one draw
    per run from its final weights: (result, draws (size, ...), wall seconds of both)."""
    generator = torch.Generator().manual_seed(seed + 1000 * n)
    shape = (size, n, *mixture.event_shape)
    x_T = torch.randn(shape, generator=generator, dtype=torch.float64)
    start = time.perf_counter()
    result = sample_smc(
        counted,
        loss,
        x_T,
        twist=twist,
        guidance=guidance,
        steps=steps,
        sampler=sampler,
        scale=scale,
        generator=generator,
        progress=progress,
    )
    draws = result.draw(generator=generator)
    return result, draws, time.perf_counter() - start


def _group_distances(draws, exact, *, runs: int, groups: int, seed: int) -> list[float]:
    """d = SW₂(one group of ``runs`` draws, ``runs`` exact samples) for each of the ``groups``
    consecutive groups of ``draws``; the exact sets are the same for every particle count."""
    references = torch.Generator().manual_seed(seed + 7)  # the same exact sets for every N
    return [
        sliced_w2(
            draws[g * runs : (g + 1) * runs],
            exact.target.sample(runs, generator=references),
            seed=seed + g,
        )
        for g in range(groups)
    ]


def _curve_row(twist, n, result, counted, distances, seconds, *, size: int) -> dict:
    """The row of :func:`smc_curve` for n particles: d(N) over the groups, and the costs per
    draw of the ``size`` (groups × runs) draws, one per run."""
    mean, error = mean_and_error(distances)
    log_z = torch.logsumexp(result.log_normaliser, 0) - math.log(size)
    return {
        "twist": twist,
        "particles": n,
        "distance": mean,
        "error": error,
        "distances": distances,
        "calls_per_sample": counted.rows / size,
        "graph_calls_per_sample": counted.graph_rows / size,
        "seconds_per_sample": seconds / size,
        "final_ess": float(result.ess[-1].mean()),
        "resampling_rate": float(result.resampled.double().mean()),
        "log_normaliser": float(log_z),
    }


def smc_study(
    mixture,
    tasks: dict,
    *,
    twists=TWISTS,
    particles=(1, 2, 4, 8, 16, 32, 64),
    guidance="freedom",
    scale: float | None = None,
    steps: int = 100,
    sampler="ddim",
    runs: int = 64,
    groups: int = 4,
    floor_repeats: int = 16,
    steps_sweep=(),
    sweep_particles: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """:func:`smc_curve` for every task (name → loss) and twisting function.

    Returns ``{"tasks": {name: {"floor": [mean, error], "log_z": log Z, "rows": [...],
    "steps_sweep": [...]}}, "config": {...}}``: the floor is the distance between two exact
    sets of ``runs`` samples over ``floor_repeats`` pairs, the rows those of
    :func:`smc_curve`; ``steps_sweep`` holds the exact twisting's row at ``sweep_particles``
    for each step count of ``steps_sweep`` (with a ``steps`` key): the DDPM discretisation,
    which SMC does not remove, against the steps.
    """
    curve = {
        "guidance": guidance, "scale": scale, "sampler": sampler, "runs": runs,
        "groups": groups, "seed": seed, "progress": progress,
    }  # fmt: skip
    out = {}
    for name, loss in tasks.items():
        out[name] = _smc_task(
            mixture, loss, twists=twists, particles=particles, steps=steps,
            floor_repeats=floor_repeats, steps_sweep=steps_sweep,
            sweep_particles=sweep_particles, curve=curve,
        )  # fmt: skip
    config = {
        "guidance": guidance if isinstance(guidance, str) else repr(guidance),
        "scale": scale,
        "steps": steps,
        "sampler": sampler if isinstance(sampler, str) else type(sampler).__name__,
        "runs": runs,
        "groups": groups,
        "floor_repeats": floor_repeats,
        "particles": list(particles),
        "steps_sweep": list(steps_sweep),
        "sweep_particles": sweep_particles,
        "twists": list(twists),
        "components": int(mixture.means.shape[0]),
        "std": mixture.std,
        "seed": seed,
    }
    return {"tasks": out, "config": config}


def _smc_task(
    mixture, loss, *, twists, particles, steps, floor_repeats, steps_sweep, sweep_particles, curve
) -> dict:
    """One task's entry of :func:`smc_study`: its noise floor, log Z, the rows of
    :func:`smc_curve` for each twisting function and the steps sweep; ``curve`` holds
    smc_curve's other options (``guidance``, ``scale``, ``sampler``, ``runs``, ``groups``,
    ``seed``, ``progress``)."""
    exact = ExactGuidance(mixture, loss)

    def exact_sample(size, generator, target=exact.target):
        return target.sample(size, generator=generator)

    floor = noise_floor(exact_sample, curve["runs"], repeats=floor_repeats, seed=curve["seed"] + 11)
    rows = []
    for twist in twists:
        rows += smc_curve(mixture, loss, twist=twist, particles=particles, steps=steps, **curve)
    sweep = []
    for count in steps_sweep:
        (row,) = smc_curve(
            mixture, loss, twist="exact", particles=(sweep_particles,), steps=count, **curve
        )
        sweep.append({"steps": count, **row})
    return {
        "floor": list(floor),
        "log_z": exact.target.log_normaliser,
        "rows": rows,
        "steps_sweep": sweep,
    }


def plot_smc(result: dict):
    """d(N) against the particle count N (log x), one panel per task, one line per twisting
    function with ± 2 standard errors, and the noise floor as a band (mean ± 2 standard
    errors)."""
    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items(), strict=True):
        floor, floor_error = task["floor"]
        ax.axhspan(
            floor - 2 * floor_error, floor + 2 * floor_error, color="0.85", label="noise floor"
        )
        twists = dict.fromkeys(row["twist"] for row in task["rows"])
        for twist in twists:
            rows = [row for row in task["rows"] if row["twist"] == twist]
            ax.errorbar(
                [row["particles"] for row in rows],
                [row["distance"] for row in rows],
                yerr=[2 * row["error"] for row in rows],
                marker="o",
                capsize=3,
                label=f"{twist} twisting",
            )
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("particles N per run")
        ax.set_ylabel("sliced W₂ to exact samples")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
