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
  class; for the reference tasks the reference's digit; NaN without a label);
- ``fd``: the Fréchet distance, in the classifier's feature space, to the real images of the
  task's digit (all 1797 digits for a task without one; :func:`sagkit.digits.evaluation.frechet_distance`):
  how much the samples look like data of the class the task asks for. With 64 samples it is
  biased upwards, so compare rows, not absolute values;
- ``sec_per_sample``: wall-clock seconds the guided sampler ran, summed over the shards (on
  whatever ranks ran them) and divided by ``num_samples``: the cost of a sample to one
  process, not the sweep's wall time (which is about that × N / ranks). Ranks sharing a
  machine's cores slow each other, so it can exceed the single-process figure; a shard loaded
  from ``out_dir`` brings the seconds of the run that computed it.

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

With ``out_dir`` every shard is written as it finishes, to
``<task>__<method>-n<n>__<first>-<end>.json`` (method: the step rule "none", "rms" — FreeDoM
and SAG —, "dps" or "backward", or a preset's name;
losses as JSON floats, samples as their raw bytes, both exact), with the settings it was run
with; a rerun loads the shards it finds (and refuses a file written with other settings) and
computes the rest. The settings do not cover the model's weights or the loss's definition:
use a fresh folder when those change. Without a folder shared by the machines, a rank only
sees its own machine's files; rank 0 writes every gathered shard it lacks, so its folder ends
complete.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.checks import check_count, check_name, check_scale
from ..digits.data import digits_dataset
from ..digits.evaluation import evaluate_samples
from ..guidance import losses
from ..guidance.config import DEFAULTS, GuidanceConfig
from ..guidance.methods import GUIDANCE
from ..guidance.presets import PRESETS
from ..guidance.sampler import guided_sample
from .distributed import gather, rank_and_world, shard

__all__ = [
    "GuidanceTask",
    "default_tasks",
    "evaluate_guidance",
    "guidance_table",
    "initial_noise",
    "method_label",
    "EVALUATION_DEFAULTS",
]
_log = logging.getLogger(__name__)

EVALUATION_DEFAULTS = {**DEFAULTS, "repeats": 2}
"""The configuration every method of a sweep shares unless told otherwise: sagkit's defaults
with 2 repeats for every method, DPS included, so that rows differ in the method only."""


@dataclass(frozen=True)
class GuidanceTask:
    """A guidance loss with a name and, where it has one, the digit it should produce.

    ``reference``: the image the loss compares with, (C, H, W), where it has one; ``mask``: for
    a reconstruction task, the observed pixels (1 observed, 0 not), broadcastable to it.
    """

    name: str
    loss: Callable
    label: int | None = None
    reference: torch.Tensor | None = None
    mask: torch.Tensor | None = None


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
        GuidanceTask("inpaint", losses.masked_reconstruction(ref, mask), ref_label, ref, mask),
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
    presets: Sequence[str] = (),
    num_samples: int = 64,
    seed: int = 0,
    config: GuidanceConfig | None = None,
    dps_scale: float | None = None,
    batch_size: int = 64,
    out_dir: str | Path | None = None,
    progress: bool = False,
    **options,
) -> list[dict]:
    """One row per (task, method, n); see the module docstring for the columns.

    Args:
        model, classifier: the diffusion model and the classifier (same dtype and device).
        tasks: defaults to :func:`default_tasks` (classifier).
        methods: guidance names; "sag" runs once per n in ``ns``.
        presets: names in :data:`sagkit.guidance.presets.PRESETS`, one row each, at the
            configuration's ``steps`` (their window and repeats keep their fractions) and
            engine. They run with ``step_size="per-sample"``: the official codes sample one
            image at a time, where their per-batch ρ is the per-sample one, and a shard
            batches many.
        num_samples: samples per row; the noise of sample i is the same in every row.
        config: the configuration every method shares (its ``guidance`` and ``n`` are set per
            row, and DPS takes ``dps_scale`` as its ζ); by default :data:`EVALUATION_DEFAULTS`
            with the ``options`` given (fields of
            :class:`~sagkit.guidance.config.GuidanceConfig`, e.g. ``steps``, ``window``,
            ``repeats``, ``scale``).
        batch_size: samples per sampler call, and so per shard (the unit of work that ranks
            share and ``out_dir`` keeps).
        out_dir: a folder for one JSON file per (task, method, shard), written as each shard
            finishes; a shard whose file is already there (written with the same settings) is
            loaded instead of run, so a killed sweep resumes where it stopped.
        progress: progress bars (on rank 0 only).
    Under ``torchrun`` (after :func:`sagkit.lab.distributed.init_distributed`) the shards are
    split among the ranks and gathered; every rank returns the same rows, equal to those of a
    single process.
    """
    methods, ns, presets = tuple(methods), tuple(ns), tuple(presets)
    if not methods and not presets:
        raise ValueError("methods or presets must name at least one guidance method")
    for name in presets:
        check_name(name, "presets entries", PRESETS)
    for m in methods:
        check_name(m, "methods entries", GUIDANCE)
    if "sag" in methods and not ns:
        raise ValueError('ns must hold at least one n for "sag"')
    for n in ns:
        check_count(n, "ns entries")
    for value, name in ((num_samples, "num_samples"), (batch_size, "batch_size")):
        check_count(value, name)
    if dps_scale is not None:
        check_scale(dps_scale, "dps_scale")
    chosen = sorted({"guidance", "n"} & {k for k, v in options.items() if v is not None})
    if chosen:
        raise ValueError(f"{', '.join(chosen)}: methods and ns choose them, one row each")
    if config is None:
        shared = GuidanceConfig.resolve(defaults=EVALUATION_DEFAULTS, **options)
    else:
        shared = config.replace(**options)
    tasks = default_tasks(classifier) if tasks is None else tasks
    p = next(model.parameters())
    size = model.unet.config.sample_size
    rank, _ = rank_and_world()
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    # The configuration of each computation. "sag" with n = 1 is "freedom" exactly (tested):
    # one computation per key serves both rows.
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
    bounds = [(i, min(i + batch_size, num_samples)) for i in range(0, num_samples, batch_size)]
    units = [(t, key, b) for t in range(len(tasks)) for key in plan for b in bounds]

    def settings_of(t, key, lo, hi) -> dict:  # what a shard file must match to be reused
        return {
            "task": tasks[t].name,
            "method": key[0] or "none",
            "n": key[1],
            "samples": [lo, hi],
            "seed": seed,
            "options": plan[key].describe(),
            "dtype": str(p.dtype),
            "device": p.device.type,
        }

    mine = {}
    my_units = shard(units)
    bar = tqdm(
        my_units,
        total=len(my_units),
        desc="evaluate guidance",
        disable=not progress or rank != 0,
        leave=False,
    )
    for t, key, (lo, hi) in bar:
        settings = settings_of(t, key, lo, hi)
        path = None if out is None else out / _shard_name(settings)
        if path is not None and path.exists():
            result = _read_shard(path, settings)
            _log.info("rank %d loaded %s", rank, path.name)
        else:
            result = _run_shard(
                model, tasks[t].loss, seed, lo, hi, size, plan[key], progress=progress and rank == 0
            )
            if path is not None:
                _write_shard(path, settings, result)
            _log.info("rank %d computed %s", rank, path.name if path else settings)
        mine[(t, key, (lo, hi))] = result
    results = {}
    for part in gather(mine):
        results.update(part)
    if out is not None and rank == 0:  # without a shared folder, rank 0's gets every shard
        for t, key, (lo, hi) in units:
            settings = settings_of(t, key, lo, hi)
            if not (out / _shard_name(settings)).exists():
                _write_shard(out / _shard_name(settings), settings, results[(t, key, (lo, hi))])

    data, data_labels = digits_dataset("all", size=size, dtype=p.dtype)
    rows = []
    rows_of = [(g, n, _key(g, n)) for g, n in _methods(methods, ns)]
    rows_of += [(name, PRESETS[name].n, (name, PRESETS[name].n)) for name in presets]
    for t, task in enumerate(tasks):
        for guidance, n, key in rows_of:
            parts = [results[(t, key, b)] for b in bounds]
            x = torch.cat([r["samples"] for r in parts]).to(p.device)
            values = torch.cat([r["loss"] for r in parts])
            elapsed = sum(r["seconds"] for r in parts)
            label = -1 if task.label is None else task.label
            real = data if task.label is None else data[data_labels == task.label]
            quality = evaluate_samples(classifier, x, torch.full((len(x),), label), real)
            rows.append(
                {
                    "task": task.name,
                    "guidance": guidance,
                    "n": n,
                    "method": method_label(guidance, n) if guidance in GUIDANCE else guidance,
                    "loss": float(values.mean()),
                    "loss_se": float(values.std() / math.sqrt(len(values))),
                    "accuracy": math.nan if task.label is None else quality["accuracy"],
                    "fd": quality["fd"],
                    "sec_per_sample": elapsed / num_samples,
                    "per_sample": values,
                }
            )
    return rows


def initial_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """The initial noise of sample ``index``: (1, *shape) float64 on the CPU, a function of
    (seed, index) alone, so no batch, shard or rank can change it."""
    generator = torch.Generator().manual_seed(_derived_seed(seed, "noise", index))
    return torch.randn((1, *shape), generator=generator, dtype=torch.float64)


def _derived_seed(*parts) -> int:
    """A 63-bit seed from the parts (a hash, so (seed, i) and (seed + 1, i − 1) do not meet)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _key(guidance: str, n: int | None) -> tuple:
    """The computation a method's row needs: (step rule, estimate steps)."""
    method = GUIDANCE[guidance]
    return (method.rule, method.estimate_steps(n or 1))


def _run_shard(model, loss, seed, lo, hi, size, config, *, progress) -> dict:
    """Samples lo … hi − 1 in one :func:`sagkit.guided_sample` call, their loss and its time."""
    p = next(model.parameters())
    x_T = torch.cat([initial_noise(seed, i, (1, size, size)) for i in range(lo, hi)]).to(p)
    generator = torch.Generator().manual_seed(_derived_seed(seed, "time travel", lo, hi))
    start = time.perf_counter()
    x = guided_sample(model, loss, x_T, config=config, generator=generator, progress=progress)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        values = loss(x).double().cpu()
    return {"samples": x.detach().cpu(), "loss": values, "seconds": seconds}


def _shard_name(settings: dict) -> str:
    lo, hi = settings["samples"]
    return f"{settings['task']}__{settings['method']}-n{settings['n']}__{lo:06d}-{hi:06d}.json"


def _write_shard(path: Path, settings: dict, result: dict) -> None:
    """The shard as JSON, exactly: losses as floats (repr round-trips), samples as raw bytes."""
    x = result["samples"].contiguous()
    record = {
        "settings": settings,
        "seconds": result["seconds"],
        "loss": result["loss"].tolist(),
        "samples": {
            "dtype": str(x.dtype).removeprefix("torch."),
            "shape": list(x.shape),
            "base64": base64.b64encode(x.view(torch.uint8).numpy().tobytes()).decode(),
        },
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # atomic: a killed run leaves no half-written shard behind


def _read_shard(path: Path, settings: dict) -> dict:
    record = json.loads(path.read_text())
    if record["settings"] != settings:
        raise ValueError(
            f"{path} was written with other settings ({record['settings']}, now {settings}); "
            "use another out_dir or delete the file"
        )
    s = record["samples"]
    raw = bytearray(base64.b64decode(s["base64"]))
    x = torch.frombuffer(raw, dtype=torch.uint8).view(getattr(torch, s["dtype"]))
    loss = torch.tensor(record["loss"], dtype=torch.float64)
    return {"samples": x.reshape(s["shape"]), "loss": loss, "seconds": record["seconds"]}


def guidance_table(rows: Sequence[dict], *, baseline: str = "freedom") -> str:
    """A text table of the rows; ``Δ vs <baseline>`` is the paired mean loss difference ± s.e."""
    base = {r["task"]: r["per_sample"] for r in rows if r["method"] == baseline}
    head = f"{'task':9s} {'method':13s} {'loss':>16s} {'Δ vs ' + baseline:>18s} {'acc':>6s} {'FD':>8s} {'s/sample':>9s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = ""
        if r["task"] in base and r["method"] != baseline:
            d = r["per_sample"] - base[r["task"]]
            diff = f"{float(d.mean()):+.3g} ± {float(d.std() / math.sqrt(len(d))):.2g}"
        acc = "" if math.isnan(r["accuracy"]) else f"{r['accuracy']:.2f}"
        lines.append(
            f"{r['task']:9s} {r['method']:13s} {r['loss']:9.4g} ± {r['loss_se']:<6.2g} {diff:>18s} {acc:>6s} {r['fd']:8.2f} {r['sec_per_sample']:9.4f}"
        )
    return "\n".join(lines)
