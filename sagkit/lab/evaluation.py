"""Evaluation of training-free guidance: final loss, accuracy, sample quality and time.

    rows = evaluate_guidance(model, classifier)          # the four digit tasks, all methods
    print(guidance_table(rows))

For each task (a loss, :func:`default_tasks`) and each method (``"none"``, ``"freedom"``,
``"dps"`` and ``"sag"`` for every n in ``ns``), the same ``num_samples`` initial noises and
time-travel seeds go through :func:`sagkit.guided_sample` with the same steps, window, repeats
and step rule, so rows differ in the method only. ``"sag"`` with n = 1 is the same computation
as ``"freedom"`` (tested in ``tests/test_guidance.py``): it runs once and both rows share the
samples and the time. A row holds

- ``loss``: the mean guidance loss of the final samples (``loss_se`` its standard error, and
  ``per_sample`` the (N,) values, paired across methods by seed);
- ``accuracy``: the share of samples the classifier gives the task's ``label`` (the target
  class; for the reference tasks the reference's digit; NaN without a label);
- ``fd``: the Fréchet distance, in the classifier's feature space, to the real images of the
  task's digit (all 1797 digits for a task without one; :func:`sagkit.digits.evaluation.frechet_distance`):
  how much the samples look like data of the class the task asks for. With 64 samples it is
  biased upwards, so compare rows, not absolute values;
- ``sec_per_sample``: wall-clock time of the guided sampler divided by ``num_samples``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core.checks import check_count, check_name, check_scale
from ..digits.data import digits_dataset
from ..digits.evaluation import evaluate_samples
from ..guidance import losses
from ..guidance.sampler import DEFAULT_WINDOW, GUIDANCE, guided_sample

__all__ = ["GuidanceTask", "default_tasks", "evaluate_guidance", "guidance_table", "method_label"]


@dataclass(frozen=True)
class GuidanceTask:
    """A guidance loss with a name and, where it has one, the digit it should produce."""

    name: str
    loss: Callable
    label: int | None = None
    reference: torch.Tensor | None = None


def default_tasks(classifier, *, target: int = 3, reference_index: int = 0) -> list[GuidanceTask]:
    """The four digit tasks: target class, style, feature match and masked reconstruction.

    Args:
        classifier: the classifier the losses use (``sk.load_classifier("digits")``).
        target: the digit of the target-class task.
        reference_index: which held-out image (``digits_dataset("test")``) is the reference of
            the other three tasks; the style task uses the next image of another digit, so style
            and content differ.
    The mask of the reconstruction task observes the top half of the reference.
    """
    dtype = next(classifier.parameters()).dtype
    images, labels = digits_dataset("test", dtype=dtype)
    ref, ref_label = images[reference_index], int(labels[reference_index])
    other = next(
        i for i in range(len(labels)) if int(labels[i]) != ref_label and i > reference_index
    )
    mask = torch.zeros(1, 1, *ref.shape[-2:], dtype=dtype)
    mask[..., : ref.shape[-2] // 2, :] = 1
    return [
        GuidanceTask("class", losses.target_class(classifier, target), target),
        GuidanceTask("style", losses.style(classifier, images[other]), None, images[other]),
        GuidanceTask("identity", losses.feature_match(classifier, ref), ref_label, ref),
        GuidanceTask("inpaint", losses.masked_reconstruction(ref, mask), ref_label, ref),
    ]


def method_label(guidance: str, n: int | None = None) -> str:
    """ "sag n=4", "freedom", …: how a method is named in rows and figures."""
    return f"{guidance} n={n}" if guidance == "sag" else guidance


def _methods(methods: Sequence[str], ns: Sequence[int]) -> list[tuple[str, int | None]]:
    return [(m, n) for m in methods for n in (ns if m == "sag" else [None])]


def evaluate_guidance(
    model,
    classifier,
    *,
    tasks: Sequence[GuidanceTask] | None = None,
    methods: Sequence[str] = ("none", "freedom", "dps", "sag"),
    ns: Sequence[int] = (1, 2, 4, 8),
    num_samples: int = 64,
    steps: int = 50,
    seed: int = 0,
    window=DEFAULT_WINDOW,
    repeats: int = 2,
    scale: float | None = None,
    dps_scale: float | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> list[dict]:
    """One row per (task, method, n); see the module docstring for the columns.

    Args:
        model, classifier: the diffusion model and the classifier (same dtype and device).
        tasks: defaults to :func:`default_tasks` (classifier).
        methods: guidance names; "sag" runs once per n in ``ns``.
        num_samples: samples per row; the noise of sample i is the same in every row.
        steps, window, repeats, scale: passed to :func:`sagkit.guided_sample` for every method
            (DPS included: equal time travel; ``dps_scale`` is its ζ).
        batch_size: samples per sampler call.
    """
    methods, ns = tuple(methods), tuple(ns)
    if not methods:
        raise ValueError("methods must name at least one guidance method")
    for m in methods:
        check_name(m, "methods entries", GUIDANCE)
    if "sag" in methods and not ns:
        raise ValueError('ns must hold at least one n for "sag"')
    for n in ns:
        check_count(n, "ns entries")
    for value, name in ((num_samples, "num_samples"), (steps, "steps"), (batch_size, "batch_size")):
        check_count(value, name)
    check_count(repeats, "repeats")
    for value, name in ((scale, "scale"), (dps_scale, "dps_scale")):
        if value is not None:
            check_scale(value, name)
    tasks = default_tasks(classifier) if tasks is None else tasks
    p = next(model.parameters())
    size = model.unet.config.sample_size
    noise = torch.randn(
        (num_samples, 1, size, size), generator=torch.Generator().manual_seed(seed)
    ).to(p)
    data, data_labels = digits_dataset("all", size=size, dtype=p.dtype)
    common = {"steps": steps, "window": window, "repeats": repeats, "progress": progress}
    rows = []
    bar = tqdm(
        total=len(tasks) * len(_methods(methods, ns)),
        desc="evaluate guidance",
        disable=not progress,
        leave=False,
    )
    for task in tasks:
        done = {}  # "sag" with n = 1 is "freedom" exactly (tested): run that computation once
        for guidance, n in _methods(methods, ns):
            key = (GUIDANCE[guidance].step_rule, n if GUIDANCE[guidance].n_step else 1)
            if key not in done:
                options = common | {"scale": dps_scale if guidance == "dps" else scale}
                done[key] = _sample_in_batches(
                    model, task.loss, noise, guidance, n or 1, seed, batch_size, options
                )
            x, elapsed = done[key]
            with torch.no_grad():
                values = task.loss(x).double().cpu()
            label = -1 if task.label is None else task.label
            real = data if task.label is None else data[data_labels == task.label]
            quality = evaluate_samples(classifier, x, torch.full((len(x),), label), real)
            rows.append(
                {
                    "task": task.name,
                    "guidance": guidance,
                    "n": n,
                    "method": method_label(guidance, n),
                    "loss": float(values.mean()),
                    "loss_se": float(values.std() / math.sqrt(len(values))),
                    "accuracy": math.nan if task.label is None else quality["accuracy"],
                    "fd": quality["fd"],
                    "sec_per_sample": elapsed / num_samples,
                    "per_sample": values,
                }
            )
            bar.update()
    bar.close()
    return rows


def _sample_in_batches(model, loss, noise, guidance, n, seed, batch_size, options):
    """:func:`sagkit.guided_sample` over ``noise`` in batches: (samples, seconds spent)."""
    samples, elapsed = [], 0.0
    for i in range(0, len(noise), batch_size):
        generator = torch.Generator().manual_seed(seed + 1 + i)
        start = time.perf_counter()
        batch = noise[i : i + batch_size]
        samples.append(
            guided_sample(
                model, loss, batch, guidance=guidance, n=n, generator=generator, **options
            )
        )
        elapsed += time.perf_counter() - start
    return torch.cat(samples), elapsed


def guidance_table(rows: Sequence[dict], *, baseline: str = "freedom") -> str:
    """A text table of the rows; ``Δ vs <baseline>`` is the paired mean loss difference ± s.e."""
    base = {r["task"]: r["per_sample"] for r in rows if r["method"] == baseline}
    head = f"{'task':9s} {'method':9s} {'loss':>16s} {'Δ vs ' + baseline:>18s} {'acc':>6s} {'FD':>8s} {'s/sample':>9s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = ""
        if r["task"] in base and r["method"] != baseline:
            d = r["per_sample"] - base[r["task"]]
            diff = f"{float(d.mean()):+.3g} ± {float(d.std() / math.sqrt(len(d))):.2g}"
        acc = "" if math.isnan(r["accuracy"]) else f"{r['accuracy']:.2f}"
        lines.append(
            f"{r['task']:9s} {r['method']:9s} {r['loss']:9.4g} ± {r['loss_se']:<6.2g} {diff:>18s} {acc:>6s} {r['fd']:8.2f} {r['sec_per_sample']:9.4f}"
        )
    return "\n".join(lines)
