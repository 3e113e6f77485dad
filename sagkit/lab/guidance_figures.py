"""Plain functions behind the guided-sampling notebook's figures and widgets.

Each returns data or a matplotlib Figure, so it can be tested and called without Jupyter;
the notebook wraps :func:`guided_grid` in ipywidgets controls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from ..guidance import losses
from ..guidance.config import DEFAULTS
from ..guidance.sampler import guided_sample
from ..guidance.travel import guidance_window
from .evaluation import CLASS_TARGET, method_label
from .plotting import image_grid

__all__ = [
    "run_methods",
    "method_grid",
    "loss_curves",
    "loss_after_window",
    "guided_grid",
    "paired_differences",
    "observed_view",
]

DEFAULT_METHODS = (("none", None), ("freedom", None), ("sag", 3))


def run_methods(
    model,
    loss_fn: Callable,
    x_T: torch.Tensor,
    *,
    methods: Sequence[tuple[str, int | None]] = DEFAULT_METHODS,
    seed: int = 0,
    progress: bool = False,
    **options,
) -> dict[str, dict]:
    """Run :func:`sagkit.guided_sample` once per (guidance, n) from the same x_T and seed.

    ``options`` (steps, scale, window, repeats, …) are shared by every method; ``progress``
    shows a bar over the methods and each sampler's bar over its steps. Returns {label: {"samples": (B, ...), "losses":
    (steps + 1, B)}} with labels from :func:`sagkit.lab.evaluation.method_label`.
    """
    results = {}
    for guidance, n in tqdm(methods, desc="methods", disable=not progress, leave=False):
        samples, curve = guided_sample(
            model,
            loss_fn,
            x_T,
            guidance=guidance,
            n=n or 1,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
            return_losses=True,
            **options,
        )
        results[method_label(guidance, n)] = {"samples": samples, "losses": curve}
    return results


def method_grid(results: dict[str, dict], *, classifier=None, per_row: int = 8):
    """One row of samples per method, labelled with its final mean loss; with a classifier,
    each image's title is the digit it predicts."""
    rows = [list(r["samples"][:per_row]) for r in results.values()]
    labels = [f"{name}\nL={float(r['losses'][-1].mean()):.3g}" for name, r in results.items()]
    fig = image_grid(rows, row_labels=labels)
    if classifier is not None:
        ncols = max(len(row) for row in rows)
        param = next(classifier.parameters())
        for i, row in enumerate(rows):
            with torch.no_grad():
                pred = classifier.logits(torch.stack(row).to(param)).argmax(-1)
            for j, digit in enumerate(pred.tolist()):
                fig.axes[i * ncols + j].set_title(str(digit), fontsize=8)
    return fig


def loss_curves(results: dict[str, dict], *, window=None):
    """The mean loss of the one-step estimate over the sampling steps, one line per method.

    ``results`` as from :func:`run_methods`. Point k is the loss at grid time t_k, the last
    point that of the final samples. ``window`` (lo, hi) shades the guided steps.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, result in results.items():
        curve = result["losses"].double().mean(1).cpu()
        ax.plot(range(len(curve)), curve, label=name)
    if window is not None:
        total = len(next(iter(results.values()))["losses"]) - 1
        guided = [k for k, on in enumerate(guidance_window(total, window)) if on]
        if guided:  # step k moves grid point k to k + 1
            ax.axvspan(guided[0], guided[-1] + 1, color="0.9", label="guided steps")
    ax.set(xlabel="sampling step k (t = 1 − k/steps)", ylabel="L(x̂0), mean over samples")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_after_window(results: dict[str, dict], *, window) -> dict[str, float]:
    """What the loss did after guidance stopped: {method: mean final loss ÷ mean loss at the
    window's end}.

    ``results`` as from :func:`run_methods` (``losses`` (steps + 1, B): the loss of the one-step
    estimate at grid point k, the final samples' last). The window's end is grid point
    k_last + 1, the state after the last guided step k_last. A ratio above 1: the loss climbed
    back while the sampler ran free (what it delivers scores worse than the estimate guidance
    optimised); below 1: it kept falling. Methods without guided steps (``"none"``) are
    left out. Raises ``ValueError`` when ``window`` guides none of the steps.
    """
    total = len(next(iter(results.values()))["losses"]) - 1
    guided = [k for k, on in enumerate(guidance_window(total, window)) if on]
    if not guided:
        raise ValueError(f"the window {tuple(window)} holds none of the {total} steps")
    end = guided[-1] + 1
    return {
        name: float(r["losses"][-1].double().mean() / r["losses"][end].double().mean())
        for name, r in results.items()
        if name != "none"
    }


def guided_grid(
    model,
    classifier,
    *,
    target: int = CLASS_TARGET,
    n: int = DEFAULTS["n"],
    scale: float = 2.0,
    window=DEFAULTS["window"],
    num: int = 4,
    steps: int = 20,
    seed: int = 0,
    repeats: int = 2,
):
    """The widget's figure: unguided, FreeDoM and SAG (n steps) samples for a target digit.

    The defaults are a small workload (4 samples, 20 steps) whose window holds guided steps,
    with the class task's target and SAG's default n (:data:`sagkit.lab.evaluation.CLASS_TARGET`,
    ``DEFAULTS["n"]``).

    Args:
        model, classifier: as for :func:`sagkit.lab.evaluation.evaluate_guidance`.
        target: the digit of the target-class loss (:func:`sagkit.guidance.losses.target_class`).
        n, scale, window, repeats, steps: passed to :func:`sagkit.guided_sample`.
        num: samples per method, from noise seeded by ``seed``.
    Raises:
        ValueError: before sampling, when ``window`` holds none of the ``steps`` steps (the
            message says which steps a window guides).
    """
    if not any(guidance_window(steps, window)):
        raise ValueError(
            f"the window {tuple(window)} holds none of the {steps} steps (step k is guided when "
            f"lo <= k/{steps} < hi): widen it to at least 1/{steps}"
        )
    p = next(model.parameters())
    size = model.unet.config.sample_size
    x_T = torch.randn((num, 1, size, size), generator=torch.Generator().manual_seed(seed)).to(p)
    methods = (("none", None), ("freedom", None), ("sag", n))
    results = run_methods(
        model,
        losses.target_class(classifier, target),
        x_T,
        methods=methods,
        seed=seed,
        steps=steps,
        scale=scale,
        window=tuple(window),
        repeats=repeats,
    )
    fig = method_grid(results, classifier=classifier, per_row=num)
    fig.suptitle(f"target {target}: guidance scale {scale:g}, window {tuple(window)}", fontsize=10)
    fig.tight_layout()
    return fig


def paired_differences(rows, *, tasks, method: str, baseline: str = "freedom"):
    """Per-sample loss differences ``method`` − ``baseline`` on the same seeds, one panel per task.

    ``rows`` from :func:`sagkit.lab.evaluation.evaluate_guidance`. Each panel shows the (N,)
    differences as dots, their mean ± 2 standard errors as a bar, and zero as a line: a bar
    clear of zero is a difference the seeds cannot explain. Returns ``(figure, stats)`` with
    stats {task: (mean, standard error)}.
    """
    by = {(r["task"], r["method"]): r["per_sample"].double() for r in rows}
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.6 * len(tasks), 3), squeeze=False)
    stats = {}
    for ax, task in zip(axes[0], tasks, strict=True):
        d = (by[task, method] - by[task, baseline]).cpu()
        mean, se = float(d.mean()), float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0
        stats[task] = (mean, se)
        jitter = torch.linspace(-0.15, 0.15, len(d))
        ax.plot(jitter, d, "o", alpha=0.5, ms=4)
        ax.errorbar([0.35], [mean], yerr=[2 * se], fmt="s", color="k", capsize=4)
        ax.axhline(0, color="0.5", lw=1)
        ax.set_xticks([])
        ax.set_xlim(-0.4, 0.6)
        ax.set_title(f"{task}\n{mean:+.3g} ± {se:.2g}", fontsize=9)
    axes[0][0].set_ylabel(f"loss: {method} − {baseline}\n(per sample, same seeds)")
    fig.tight_layout()
    return fig, stats


def observed_view(reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What an inpainting loss sees: the reference where ``mask`` is 1, mid-grey (0) elsewhere.

    ``reference`` (C, H, W) in [-1, 1]; ``mask`` broadcastable to it. Returns (C, H, W).
    """
    mask = torch.broadcast_to(torch.as_tensor(mask).to(reference), (1, *reference.shape))[0]
    return mask * reference
