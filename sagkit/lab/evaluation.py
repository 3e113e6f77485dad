"""Evaluation of training-free guidance: final loss, accuracy, sample quality and time.

    rows = evaluate_guidance(model, classifier)          # the four digit tasks, all methods
    print(guidance_table(rows))

For each task (a loss, :func:`default_tasks`) and each method (``"none"``, ``"freedom"``,
``"dps"`` and ``"sag"`` for every n in ``ns``), the same ``num_samples`` initial noises and
time-travel seeds go through :func:`sagkit.guided_sample` with the same steps, window, repeats
and step rule, so rows differ in the method only. ``"sag"`` with n = 1 is the same computation
as ``"freedom"`` (tested in ``tests/guidance/test_sampler.py``): it runs once and both rows share the
samples and the time. A row holds

- ``loss``: the mean guidance loss of the final samples (``loss_se`` its standard error, and
  ``per_sample`` the (N,) values, paired across methods by seed);
- ``accuracy``: the share of samples the classifier gives the task's ``label`` (the target
  class; for the reference tasks the reference's digit; NaN without a label). It measures
  guidance only if images that are not digits of the label score low: the class task's target
  is :data:`CLASS_TARGET`, 6, the digit the shipped classifier gives least often to pure
  noise (:func:`noise_label_shares` of each family in :data:`NOISE_FAMILIES`: at most 0.6 %
  of a family's images, below chance, 1/10, in every family; tested in
  ``tests/lab/test_class_task.py``). The classifier calls 91 % of Gaussian noise and 96 % of
  salt-and-pepper noise "3", so with the earlier target 3 such noise scored 91 % and 96 % on
  the class task;
- ``fd``: the Fréchet distance, in the classifier's feature space, to the real images of the
  task's digit (all 1797 digits for a task without one; :func:`sagkit.digits.evaluation.frechet_distance`):
  how much the samples look like data of the class the task asks for. With 64 samples it is
  biased upwards, so compare rows, not absolute values;
- ``sec_per_sample``: wall-clock seconds the guided sampler ran, summed over the shards (on
  whatever ranks ran them) and divided by ``num_samples``: the cost of a sample to one
  process, not the sweep's wall time (which is about that × N / ranks). Ranks sharing a
  machine's cores slow each other, so it can exceed the single-process figure; a shard loaded
  from ``out_dir`` brings the seconds of the run that computed it.

Variants. ``variants={label: fields}`` adds one row per label: the shared configuration with
those :class:`~sagkit.guidance.config.GuidanceConfig` fields (a method object with its own
scales, a ``scale``), its shard files named by the label. The stored leaderboard runs every
method with its tuned scales this way (:mod:`sagkit.lab.tuning`).

Splits. ``split="tuning"`` draws the samples of the tuning (:mod:`sagkit.lab.tuning`): the
seeds of its initial and time-travel noise are hashes under other tags ("tuning noise",
"tuning time travel" in place of "noise", "time travel"), so they are disjoint from the
evaluation's for every seed and index; its shard keys hold ``split``.

Shards, seeds and ranks. The samples are cut into shards of ``batch_size`` consecutive
indices, [0, b), [b, 2b), …; a shard of one task and one method is one sampler call, the unit
of work. The initial noise of sample i is :func:`initial_noise` (seed, i): drawn from its own
generator, a function of (seed, i) alone. ``guided_sample`` takes one generator per call for
the time-travel noise, so that generator is seeded by (seed, the shard's first and last index):
a shard's samples depend on (seed, its indices, the settings) and on nothing else — not on
``num_samples`` beyond the shard, not on the other shards, not on which rank runs it (the
batched network calls see the same batch). Under ``torchrun``
(:mod:`sagkit.lab.distributed`) the (task, method, shard) units are dealt round robin to the
ranks and the results gathered, so every rank returns the rows of the single-process run,
exactly (tested with 2 CPU ranks in ``tests/lab/test_distributed.py``). Changing
``batch_size`` changes the shards and so the time-travel noise and the samples: keep it fixed
to compare runs. (Earlier, one generator drew all N noises at once and the time-travel seed
was seed + 1 + the batch's first index; seeding each sample and shard by itself changed every
number of a run, and the loss is now evaluated shard by shard, as the ranks do.)

With ``out_dir`` every shard is written as it finishes, to a JSON file that holds its key: the
settings that make its numbers (:mod:`sagkit.lab.shards`: the file names, what the key holds,
the files refused). A rerun loads the shards it finds whose key equals the run's, bit for bit,
and computes the rest. Without a folder shared by the machines, a rank only sees its own
machine's files; rank 0 writes every gathered shard it lacks, so its folder ends complete.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.checks import check_count, check_folder, check_name, check_scale
from ..digits.data import digits_dataset
from ..digits.evaluation import NOISE_FAMILIES, evaluate_samples, noise_images
from ..guidance import losses
from ..guidance.config import DEFAULTS, GuidanceConfig
from ..guidance.methods import GUIDANCE
from ..guidance.presets import PRESETS
from ..guidance.sampler import guided_sample
from ..version import __version__
from .distributed import gather, rank_and_world, shard
from .shards import model_key, read_shard, shard_name, task_key, write_shard

__all__ = [
    "GuidanceTask",
    "CLASS_TARGET",
    "noise_label_shares",
    "default_tasks",
    "evaluate_guidance",
    "guidance_table",
    "paired_comparison",
    "initial_noise",
    "method_label",
    "EVALUATION_DEFAULTS",
    "SPLITS",
]
_log = logging.getLogger(__name__)

SPLITS = ("evaluation", "tuning")
"""The two sets of samples: the evaluation's, and the tuning's (:mod:`sagkit.lab.tuning`),
drawn from seeds derived under another tag, so that no tuning sample is an evaluation sample."""

EVALUATION_DEFAULTS = {**DEFAULTS, "repeats": 2}
"""The configuration every method of a sweep shares unless told otherwise: sagkit's defaults
with 2 repeats for every method, DPS included, so that rows differ in the method only."""


@dataclass(frozen=True)
class GuidanceTask:
    """A guidance loss with a name and, where it has one, the digit it should produce.

    ``name``: a non-empty string without "/" or "\\", distinct among a sweep's tasks (it names
    the rows and the shard files). ``reference``: the image the loss compares with, (C, H, W),
    where it has one; ``mask``: for a reconstruction task, the observed pixels (1 observed, 0
    not), broadcastable to it.
    """

    name: str
    loss: Callable
    label: int | None = None
    reference: torch.Tensor | None = None
    mask: torch.Tensor | None = None


CLASS_TARGET = 6
"""The digit of the class task: the one the shipped classifier gives least often to pure noise.

Measured with :func:`noise_label_shares` (512 images per family, seed 0), the share of noise
called 6 is 0.0 % (gaussian), 0.0 % (dark), 0.0 % (salt-and-pepper) and 0.6 % (blobs), at
most 0.6 % with seeds 1 and 2 too: below chance (1/10) in every family. The share called 3
is 91 %, 27 %, 96 % and 24 %: a classifier trained on clean digits calls noise "3" by default,
so with the earlier target 3 Gaussian and salt-and-pepper noise scored an accuracy of 91 %
and 96 %. (0 is the runner-up: at most 1.8 %, on dark noise.) docs/maths.md §8.12."""


@torch.no_grad()
def noise_label_shares(
    classifier, *, num: int = 512, seed: int = 0, families: Sequence[str] = NOISE_FAMILIES
) -> dict[str, torch.Tensor]:
    """The share of each family's noise images the classifier gives each class.

    Returns {family: (classes,) float64 shares summing to 1}, from ``num`` images of
    :func:`noise_images` per family, drawn from one generator seeded by ``seed``. A class
    task's accuracy means something only for a target whose share is at most chance
    (1/classes) in every family: then noise scores no better than a guess.
    """
    check_count(num, "num")
    check_count(seed, "seed", low=0)
    for family in families:
        check_name(family, "families entries", NOISE_FAMILIES)
    p = next(classifier.parameters())
    size = classifier.config["size"]
    generator = torch.Generator().manual_seed(seed)
    shares = {}
    for family in families:
        x = noise_images(family, num, size=size, generator=generator).to(p)
        logits = classifier.logits(x)
        counts = torch.bincount(logits.argmax(-1).cpu(), minlength=logits.shape[-1])
        shares[family] = counts.double() / num
    return shares


def default_tasks(
    classifier, *, target: int = CLASS_TARGET, reference_index: int = 0
) -> list[GuidanceTask]:
    """The four digit tasks: target class, style, feature match and masked reconstruction.

    Args:
        classifier: the classifier the losses use (``sk.digits.load_classifier("digits")``).
        target: the digit of the target-class task; by default :data:`CLASS_TARGET`, which
            pure noise is called at most at chance (see there).
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
        GuidanceTask("inpaint", losses.masked_reconstruction(ref, mask), ref_label, ref, mask),
    ]


def method_label(guidance: str, n: int | None = None) -> str:
    """ "sag n=4", "freedom", …: how a method is named in rows and figures."""
    return f"{guidance} n={n}" if guidance == "sag" else guidance


def evaluate_guidance(
    model,
    classifier,
    *,
    tasks: Sequence[GuidanceTask] | None = None,
    methods: Sequence[str] = ("none", "freedom", "dps", "sag"),
    ns: Sequence[int] = (1, 2, 4, 8),
    presets: Sequence[str] = (),
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    num_samples: int = 64,
    seed: int = 0,
    config: GuidanceConfig | None = None,
    dps_scale: float | None = None,
    batch_size: int = 64,
    out_dir: str | Path | None = None,
    split: str = "evaluation",
    keep_samples: bool = False,
    progress: bool = False,
    **options,
) -> list[dict]:
    """One row per (task, method, n); see the module docstring for the columns.

    Args:
        model, classifier: the diffusion model and the classifier (same dtype and device).
        tasks: defaults to :func:`default_tasks` (classifier).
        methods: guidance names; "sag" runs once per n in ``ns``.
        presets, variants: more rows, one per preset and per variant (:func:`_plan`).
        num_samples: samples per row; the noise of sample i is the same in every row.
        config: the configuration every method shares, or ``options`` over
            :data:`EVALUATION_DEFAULTS` (:func:`_shared_configuration`); DPS takes
            ``dps_scale`` as its ζ.
        batch_size: samples per sampler call, and so per shard (the unit of work that ranks
            share and ``out_dir`` keeps).
        seed: an integer >= 0; sample i's noise is a function of (seed, i).
        out_dir: a folder for one JSON file per (task, method, shard), from which a killed
            sweep resumes (:func:`_run_or_load`).
        split: "evaluation" (default) or "tuning": which samples (:data:`SPLITS`,
            :func:`initial_noise`); the tuning's are disjoint from the evaluation's.
        keep_samples: each row also holds its final samples (:func:`_rows`).
        progress: progress bars (on rank 0 only).
    Under ``torchrun`` (after :func:`sagkit.lab.distributed.init_distributed`) the shards are
    split among the ranks and gathered; every rank returns the same rows, equal to those of a
    single process.
    """
    methods, ns, presets, variants = _checked_choices(methods, ns, presets, variants, split=split)
    _check_numbers(num_samples, batch_size, seed, dps_scale)
    shared = _shared_configuration(config, options)
    tasks = default_tasks(classifier) if tasks is None else _checked_tasks(tasks)
    out = None if out_dir is None else check_folder(out_dir, "out_dir")
    plan, rows_of = _plan(model, shared, methods, ns, presets, variants, dps_scale=dps_scale)
    bounds = [(i, min(i + batch_size, num_samples)) for i in range(0, num_samples, batch_size)]
    keys = _shard_keys(model, tasks, plan, bounds, seed=seed, split=split)
    results = _results(model, tasks, plan, keys, seed=seed, split=split, out=out, progress=progress)
    return _rows(model, classifier, tasks, results, rows_of, bounds, keep_samples=keep_samples)


def _checked_choices(methods, ns, presets, variants, *, split: str) -> tuple:
    """(methods, ns, presets) as tuples and the variants as a dict (:func:`_checked_variants`);
    refuses a sweep without rows, names that are not guidance methods, presets or splits, and
    "sag" without an n."""
    methods, ns, presets = tuple(methods), tuple(ns), tuple(presets)
    variants = _checked_variants(variants)
    if not methods and not presets and not variants:
        raise ValueError("methods, presets or variants must name at least one guidance method")
    check_name(split, "split", SPLITS)
    for name in presets:
        check_name(name, "presets entries", PRESETS)
    for m in methods:
        check_name(m, "methods entries", GUIDANCE)
    if "sag" in methods and not ns:
        raise ValueError('ns must hold at least one n for "sag"')
    for n in ns:
        check_count(n, "ns entries")
    return methods, ns, presets, variants


def _check_numbers(num_samples, batch_size, seed, dps_scale) -> None:
    """Refuses sample counts that are not integers >= 1, a seed that is not one >= 0, and a
    ``dps_scale`` that is not a finite number >= 0 (``None``: DPS's default)."""
    for value, name in ((num_samples, "num_samples"), (batch_size, "batch_size")):
        check_count(value, name)
    check_count(seed, "seed", low=0)
    if dps_scale is not None:
        check_scale(dps_scale, "dps_scale")


def _shared_configuration(config: GuidanceConfig | None, options: Mapping) -> GuidanceConfig:
    """The configuration every method of a sweep shares (its ``guidance`` and ``n`` are set per
    row): ``config``, by default :data:`EVALUATION_DEFAULTS`, with the ``options`` given
    (fields of :class:`~sagkit.guidance.config.GuidanceConfig`, e.g. ``steps``, ``window``,
    ``repeats``, ``scale``; not ``guidance`` or ``n``, which the rows choose)."""
    chosen = sorted({"guidance", "n"} & {k for k, v in options.items() if v is not None})
    if chosen:
        raise ValueError(f"{', '.join(chosen)}: methods and ns choose them, one row each")
    return GuidanceConfig.coerce(config, defaults=EVALUATION_DEFAULTS, **options)


def _methods(methods: Sequence[str], ns: Sequence[int]) -> list[tuple[str, int | None]]:
    return [(m, n) for m in methods for n in (ns if m == "sag" else [None])]


def _plan(model, shared: GuidanceConfig, methods, ns, presets, variants, *, dps_scale) -> tuple:
    """The computations and the rows of a sweep: ({key: GuidanceConfig}, [(guidance, n, key,
    label)], the rows in order: methods, presets, variants).

    A computation's key is (step rule, estimate steps) for a method (:func:`_key`: "sag" with
    n = 1 is "freedom" exactly (tested), so one computation serves both rows), (name, n) for a
    preset and (label, estimate steps) for a variant; ``shared`` is every method's
    configuration, DPS's with ``dps_scale``.

    ``presets``: names in :data:`sagkit.guidance.presets.PRESETS`, one row each, at the
    configuration's ``steps`` (their window and repeats keep their fractions) and engine. They
    run with ``step_size="per-sample"``: the official codes sample one image at a time, where
    their per-batch ρ is the per-sample one, and a shard batches many.

    ``variants``: {label: fields of :class:`~sagkit.guidance.config.GuidanceConfig`}, one row
    each, labelled ``label``, run with the shared configuration and those fields (e.g.
    ``{"tfg": {"guidance": TFG(rho=1.0)}, "dps": {"guidance": "dps", "scale": 2.0}}``: a method
    with its tuned scales, :mod:`sagkit.lab.tuning`). A label is a non-empty string without "/"
    or "\\" (it names the shard files).
    """
    plan = {}
    for guidance, n in _methods(methods, ns):
        scale = dps_scale if GUIDANCE[guidance].rule == "dps" else shared.scale
        plan.setdefault(
            _key(guidance, n), dataclasses.replace(shared, guidance=guidance, n=n or 1, scale=scale)
        )
    for name in presets:
        plan[(name, PRESETS[name].n)] = GuidanceConfig.resolve(
            preset=name,
            model=model,
            steps=shared.steps,
            step_size="per-sample",
            gradient=shared.gradient,
            reuse_eps=shared.reuse_eps,
        )
    variant_keys = []
    for label, fields in variants.items():
        config = shared.replace(**fields)
        key = (label, config.estimate_steps)
        if key in plan:
            raise ValueError(f"variants: {label!r} names the shard files of a method or preset")
        plan[key] = config
        variant_keys.append(key)
    rows = [(g, n, _key(g, n), method_label(g, n)) for g, n in _methods(methods, ns)]
    rows += [(name, PRESETS[name].n, (name, PRESETS[name].n), name) for name in presets]
    rows += [(plan[k].method.name, k[1], k, k[0]) for k in variant_keys]
    return plan, rows


def _key(guidance: str, n: int | None) -> tuple:
    """The computation a method's row needs: (step rule, estimate steps)."""
    method = GUIDANCE[guidance]
    return (method.rule, method.estimate_steps(n or 1))


def _shard_keys(model, tasks, plan: dict, bounds, *, seed: int, split: str) -> dict:
    """The key of every shard (:mod:`sagkit.lab.shards`): what its file must match to be
    reused, {(task index, plan key, (lo, hi)): settings}, in the order the shards are dealt to
    the ranks; the task's and the model's parts are fingerprinted once."""
    p = next(model.parameters())
    task_keys = [task_key(task) for task in tasks]
    model_part = model_key(model)
    return {
        (t, key, (lo, hi)): {
            "version": __version__,
            "task": task_keys[t],
            "model": model_part,
            "method": key[0] or "none",
            "n": key[1],
            "samples": [lo, hi],
            "seed": seed,
            "options": plan[key].describe(),
            "dtype": str(p.dtype),
            "device": p.device.type,
            **({} if split == "evaluation" else {"split": split}),
        }
        for t in range(len(tasks))
        for key in plan
        for lo, hi in bounds
    }


def _results(model, tasks, plan: dict, keys: dict, *, seed, split, out, progress) -> dict:
    """Every shard's result (:func:`_run_shard`), by its unit of ``keys``: this rank's share
    run or loaded (:func:`_run_or_load`), then every rank's gathered (:func:`_gathered`)."""
    rank, _ = rank_and_world()
    units = shard(list(keys))
    bar = tqdm(
        units,
        total=len(units),
        desc="evaluate guidance",
        disable=not progress or rank != 0,
        leave=False,
    )
    mine = {}
    for t, key, (lo, hi) in bar:
        run = functools.partial(
            _run_shard,
            model,
            tasks[t].loss,
            seed,
            lo,
            hi,
            plan[key],
            split=split,
            progress=progress and rank == 0,
        )
        mine[(t, key, (lo, hi))] = _run_or_load(run, keys[(t, key, (lo, hi))], out=out, rank=rank)
    return _gathered(mine, keys, out=out)


def _run_or_load(run: Callable[[], dict], settings: dict, *, out: Path | None, rank: int) -> dict:
    """A shard's result: ``run()``, or with ``out`` its file there, loaded.

    ``out``: a folder for one JSON file per (task, method, shard), written as each shard
    finishes (created if missing); a shard whose file is already there, with the same key
    ``settings`` (:mod:`sagkit.lab.shards`), is loaded instead of run, so a killed sweep
    resumes where it stopped. A file with another key, or one that cannot be read as a shard,
    is refused with a ``ValueError`` naming it.
    """
    path = None if out is None else out / shard_name(settings)
    if path is not None and path.exists():
        result = read_shard(path, settings)
        _log.info("rank %d loaded %s", rank, path.name)
        return result
    result = run()
    if path is not None:
        write_shard(path, settings, result)
    _log.info("rank %d computed %s", rank, path.name if path else settings)
    return result


def _gathered(mine: dict, keys: dict, *, out: Path | None) -> dict:
    """Every rank's results on every rank; with ``out``, rank 0 writes each shard of ``keys``
    whose file it lacks (without a folder shared by the machines, it sees its own only)."""
    results = {}
    for part in gather(mine):
        results.update(part)
    rank, _ = rank_and_world()
    if out is not None and rank == 0:
        for unit, settings in keys.items():
            if not (out / shard_name(settings)).exists():
                write_shard(out / shard_name(settings), settings, results[unit])
    return results


def _rows(model, classifier, tasks, results, rows_of, bounds, *, keep_samples: bool) -> list:
    """For each task, one row per entry of ``rows_of`` (:func:`_plan`): its computation's
    shards put together (:func:`_row`), the samples' FD to the real digits of the task's label
    (all digits without one)."""
    p = next(model.parameters())
    data, data_labels = digits_dataset("all", size=model.unet.config.sample_size, dtype=p.dtype)
    rows = []
    for t, task in enumerate(tasks):
        real = data if task.label is None else data[data_labels == task.label]
        for guidance, n, key, label in rows_of:
            parts = [results[(t, key, b)] for b in bounds]
            row = _row(classifier, task, parts, real, device=p.device, keep_samples=keep_samples)
            rows.append({"task": task.name, "guidance": guidance, "n": n, "method": label} | row)
    return rows


def _row(classifier, task, parts, real, *, device, keep_samples: bool) -> dict:
    """The numbers of one row (module docstring) from its shards' results ``parts``, scored
    against the ``real`` images on ``device``. ``keep_samples``: the row also holds
    ``"samples"``, its final samples (N, 1, S, S) on the CPU, for scores other than the
    classifier's (:mod:`sagkit.lab.tuning`)."""
    x = torch.cat([r["samples"] for r in parts]).to(device)
    values = torch.cat([r["loss"] for r in parts])
    label = -1 if task.label is None else task.label
    quality = evaluate_samples(classifier, x, torch.full((len(x),), label), real)
    loss, loss_se = _mean_se(values)
    return {
        "loss": loss,
        "loss_se": loss_se,
        "accuracy": math.nan if task.label is None else quality["accuracy"],
        "fd": quality["fd"],
        "sec_per_sample": sum(r["seconds"] for r in parts) / len(values),
        "per_sample": values,
        **({"samples": x.cpu()} if keep_samples else {}),
    }


def initial_noise(
    seed: int, index: int, shape: Sequence[int], *, split: str = "evaluation"
) -> torch.Tensor:
    """The initial noise of sample ``index``: (1, *shape) float64 on the CPU, a function of
    (seed, index, split) alone, so no batch, shard or rank can change it. The generator's
    seed is a hash of (seed, tag, index), the tag "noise" for the evaluation's samples and
    "tuning noise" for the tuning's: the two splits never share a seed (up to a collision of
    63-bit hashes), whatever the seeds and indices."""
    generator = torch.Generator().manual_seed(_derived_seed(seed, _TAGS[split][0], index))
    return torch.randn((1, *shape), generator=generator, dtype=torch.float64)


def _derived_seed(*parts) -> int:
    """A 63-bit seed from the parts (a hash, so (seed, i) and (seed + 1, i − 1) do not meet)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


_TAGS = {"evaluation": ("noise", "time travel"), "tuning": ("tuning noise", "tuning time travel")}


def _run_shard(model, loss, seed, lo, hi, config, *, split, progress) -> dict:
    """Samples lo … hi − 1 in one :func:`sagkit.guided_sample` call, their loss and its time:
    {"samples": (hi − lo, 1, S, S) on the CPU, "loss": (hi − lo,) float64, "seconds": float}."""
    p = next(model.parameters())
    size = model.unet.config.sample_size
    x_T = torch.cat([initial_noise(seed, i, (1, size, size), split=split) for i in range(lo, hi)])
    x_T = x_T.to(p)
    generator = torch.Generator().manual_seed(_derived_seed(seed, _TAGS[split][1], lo, hi))
    start = time.perf_counter()
    x = guided_sample(model, loss, x_T, config=config, generator=generator, progress=progress)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        values = loss(x).double().cpu()
    return {"samples": x.detach().cpu(), "loss": values, "seconds": seconds}


def _checked_variants(variants) -> dict:
    """The variants as a dict {label: fields}; refuses labels that cannot name a file."""
    if variants is None:
        return {}
    if not isinstance(variants, Mapping):
        raise TypeError(f"variants must be a mapping of labels to fields, got {variants!r}")
    for label, fields in variants.items():
        if not isinstance(label, str) or not label or {"/", "\\"} & set(label):
            raise ValueError(
                "variants' labels must be non-empty strings without '/' or '\\' (they name "
                f"the shard files), got {label!r}"
            )
        if not isinstance(fields, Mapping):
            raise TypeError(f"variants[{label!r}] must be a mapping of fields, got {fields!r}")
    return dict(variants)


def _checked_tasks(tasks) -> list[GuidanceTask]:
    """The tasks as a list; refuses what is not a task, names that cannot name a file, and
    names used twice (they would share rows and shard files)."""
    if isinstance(tasks, GuidanceTask) or not isinstance(tasks, Sequence):
        raise TypeError(
            "tasks must be a sequence of GuidanceTask, got "
            + ("one GuidanceTask: pass [task]" if isinstance(tasks, GuidanceTask) else repr(tasks))
        )
    names = {}
    for i, task in enumerate(tasks):
        if not isinstance(task, GuidanceTask):
            raise TypeError(f"tasks entries must be GuidanceTask, got {type(task).__name__}")
        name = task.name
        if not isinstance(name, str) or not name or {"/", "\\"} & set(name):
            raise ValueError(
                "tasks entries' names must be non-empty strings without '/' or '\\' "
                f"(they name the shard files), got {name!r}"
            )
        if name in names:
            raise ValueError(
                f"tasks must have distinct names: {name!r} is the name of entries {names[name]} "
                f"and {i}"
            )
        names[name] = i
    return list(tasks)


def paired_comparison(
    rows: Sequence[dict], task: str, method: str, *, baseline: str = "freedom"
) -> tuple[float, float, str]:
    """How ``method``'s final loss compares with ``baseline``'s on ``task``, seed by seed.

    With d_i = L_method(x_i) − L_baseline(x_i), the per-sample differences of the rows'
    ``per_sample`` (the same initial noise i), returns (mean of d, its standard error
    std(d)/√N, verdict): "lower" or "higher" when the mean is more than two standard errors
    below or above 0, else "no different" (the samples cannot tell the methods apart).
    ``rows`` as from :func:`evaluate_guidance` (``per_sample`` a tensor or a list).
    """
    by = {(r["task"], r["method"]): r["per_sample"] for r in rows}
    for name in (method, baseline):
        if (task, name) not in by:
            raise ValueError(f"no row for task {task!r} and method {name!r}")
    mean, se = _mean_se(
        torch.as_tensor(by[task, method]).double() - torch.as_tensor(by[task, baseline]).double()
    )
    verdict = "lower" if mean + 2 * se < 0 else "higher" if mean - 2 * se > 0 else "no different"
    return mean, se, verdict


def _mean_se(d: torch.Tensor) -> tuple[float, float]:
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def guidance_table(rows: Sequence[dict], *, baseline: str = "freedom") -> str:
    """A text table of the rows; ``Δ vs <baseline>`` is the paired mean loss difference ± s.e."""
    base = {r["task"]: r["per_sample"] for r in rows if r["method"] == baseline}
    head = f"{'task':9s} {'method':13s} {'loss':>16s} {'Δ vs ' + baseline:>18s} {'acc':>6s} {'FD':>8s} {'s/sample':>9s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = ""
        if r["task"] in base and r["method"] != baseline:
            mean, se = _mean_se(r["per_sample"] - base[r["task"]])
            diff = f"{mean:+.3g} ± {se:.2g}"
        acc = "" if math.isnan(r["accuracy"]) else f"{r['accuracy']:.2f}"
        lines.append(
            f"{r['task']:9s} {r['method']:13s} {r['loss']:9.4g} ± {r['loss_se']:<6.2g} {diff:>18s} {acc:>6s} {r['fd']:8.2f} {r['sec_per_sample']:9.4f}"
        )
    return "\n".join(lines)
