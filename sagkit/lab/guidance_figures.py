"""Plain functions behind the guided-sampling notebook's figures and widgets.

Each returns data or a matplotlib Figure, so it can be tested and called without Jupyter;
the notebook wraps :func:`guided_grid` in ipywidgets controls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import torch

from ..guidance import losses
from ..guidance.sampler import DEFAULT_WINDOW, guidance_window, guided_sample
from .evaluation import method_label
from .plotting import image_grid

__all__ = ["run_methods", "method_grid", "loss_curves", "guided_grid"]

DEFAULT_METHODS = (("none", None), ("freedom", None), ("sag", 3))


def run_methods(
    model,
    loss_fn: Callable,
    x_T: torch.Tensor,
    *,
    methods: Sequence[tuple[str, int | None]] = DEFAULT_METHODS,
    seed: int = 0,
    **options,
) -> dict[str, dict]:
    """Run :func:`sagkit.guided_sample` once per (guidance, n) from the same x_T and seed.

    ``options`` (steps, scale, window, repeats, …) are shared by every method. Returns
    {label: {"samples": (B, ...), "losses": (steps + 1, B)}} with labels from
    :func:`sagkit.lab.evaluation.method_label`.
    """
    results = {}
    for guidance, n in methods:
        samples, curve = guided_sample(
            model,
            loss_fn,
            x_T,
            guidance=guidance,
            n=n or 1,
            generator=torch.Generator().manual_seed(seed),
            progress=False,
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


def guided_grid(
    model,
    classifier,
    *,
    target: int = 3,
    n: int = 3,
    scale: float = 2.0,
    window=DEFAULT_WINDOW,
    num: int = 8,
    steps: int = 30,
    seed: int = 0,
    repeats: int = 2,
):
    """The widget's figure: unguided, FreeDoM and SAG (n steps) samples for a target digit.

    Args:
        model, classifier: as for :func:`sagkit.lab.evaluation.evaluate_guidance`.
        target: the digit of the target-class loss (:func:`sagkit.guidance.losses.target_class`).
        n, scale, window, repeats, steps: passed to :func:`sagkit.guided_sample`.
        num: samples per method, from noise seeded by ``seed``.
    """
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
