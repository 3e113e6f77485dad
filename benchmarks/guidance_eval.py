"""Print the training-free guidance table: sagkit's methods beside the papers' presets.

Rows: none, FreeDoM, DPS, SAG (n = 3) and backward guidance with sagkit's defaults, and the
presets sag-paper, freedom-paper and dps-paper (each official code's sampler, window, repeats,
estimate grid and step rule), all at the same number of steps. The class task's target is
``CLASS_TARGET`` of :mod:`sagkit.lab.evaluation` (6: pure noise is called 6 at most at chance).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_eval.py    # 50 steps, tens of minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_eval.py --steps 20 --num-samples 16

The stored evaluation, ``benchmarks/results/guidance_eval.json`` (rows with per-sample losses;
``guidance_eval.txt`` the same table as text), is what notebook 04 quotes. It records every run
that computed some of its rows: ``runs`` holds each run's date, sagkit version, arguments,
the shared guidance configuration (the gradient engine included) and the tasks it computed,
and each row names its run. ``--update`` reruns some tasks into it and rewrites both files:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_eval.py --tasks class \
        --update benchmarks/results/guidance_eval.json --note "what the timings shared"

replaces the class rows (about 5 minutes on one core) and keeps the other tasks' rows, with
the runs that computed them; the arguments of a rerun must match the stored runs' (``--steps``,
``--num-samples``, ``--seed``, ``--batch-size``, ``--window``, the methods, presets and ``ns``),
or the rows would not compare.

Data-parallel, resumable (README, "Scaling out evaluation sweeps"; :mod:`sagkit.lab.distributed`):

    .venv/bin/torchrun --nproc-per-node 2 benchmarks/guidance_eval.py \
        --batch-size 16 --out-dir results/shards --json results/guidance.json

runs the shards (``--batch-size`` samples of one task and method) on 2 ranks, writes each to
``--out-dir`` as it finishes and, run again, loads those instead of recomputing them: those
whose key (sagkit version, task and loss, model weights, method, samples, seed, dtype; the
module docstring of :mod:`sagkit.lab.evaluation`) is the run's. A file of another key, or one
that cannot be read as a shard, stops the run with a ValueError naming it. Only
rank 0 prints and writes ``--json``; ``--verbose`` logs every rank's computed and loaded shards
to stderr. ``--device cuda`` puts rank r on GPU r of its machine (NCCL).

Uses the shipped digits UNet and classifier (``sk.digits.load_pretrained("digits")``,
``sk.digits.load_classifier("digits")``) and :func:`sagkit.evaluation.evaluate_guidance`. With
``--json PATH`` the rows (with the per-sample losses) are also written there; keep results in
the git-ignored ``results/`` folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
from pathlib import Path

import torch

import sagkit as sk
from sagkit.core.device import apply_cpu_threads
from sagkit.guidance.config import GuidanceConfig
from sagkit.lab.distributed import close, init_distributed
from sagkit.lab.evaluation import (
    CLASS_TARGET,
    EVALUATION_DEFAULTS,
    default_tasks,
    evaluate_guidance,
    guidance_table,
    noise_label_shares,
)

# the arguments every run of one stored evaluation shares, so that its rows compare
SHARED = ("steps", "num_samples", "ns", "methods", "presets", "seed", "batch_size", "window")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--ns", type=int, nargs="+", default=[3])
    parser.add_argument(
        "--methods", nargs="+", default=["none", "freedom", "dps", "sag", "backward"]
    )
    parser.add_argument("--presets", nargs="*", default=["sag-paper", "freedom-paper", "dps-paper"])
    parser.add_argument("--tasks", nargs="+", default=None, help="class style identity inpaint")
    parser.add_argument("--window", type=float, nargs=2, default=[0.3, 0.7])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scale", type=float, default=None, help="c of the RMS rule")
    parser.add_argument("--dps-scale", type=float, default=None, help="DPS's ζ")
    parser.add_argument("--target", type=int, default=CLASS_TARGET, help="the class task's digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per shard")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="shard files; resumes from those that match"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (rank r: GPU r)")
    parser.add_argument("--verbose", action="store_true", help="log shards, every rank")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--update",
        type=Path,
        default=None,
        help="a stored evaluation (JSON): replace its rows of the tasks run, record the run, "
        "and rewrite it and its .txt",
    )
    parser.add_argument(
        "--note", default="", help="recorded with the run (e.g. the machine's load)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with digits-unet/ and digits-classifier/ (default: the shipped weights)",
    )
    args = parser.parse_args(argv)
    ctx = init_distributed(device=args.device)
    if args.verbose:
        handler = logging.StreamHandler()  # stderr
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("sagkit").addHandler(handler)
        logging.getLogger("sagkit").setLevel(logging.INFO)
    say = print if ctx.is_main else (lambda *a, **k: None)

    unet_dir, classifier_dir = (
        (None, None)
        if args.data is None
        else (args.data / "digits-unet", args.data / "digits-classifier")
    )
    model = sk.digits.load_pretrained("digits", device=ctx.device, path=unet_dir)
    classifier = sk.digits.load_classifier("digits", device=ctx.device, path=classifier_dir)
    tasks = default_tasks(classifier, target=args.target)
    if args.tasks:
        tasks = [t for t in tasks if t.name in args.tasks]
    say(
        f"steps={args.steps} samples={args.num_samples} window={tuple(args.window)} "
        f"repeats={args.repeats} scale={args.scale} dps_scale={args.dps_scale} "
        f"threads={torch.get_num_threads()} ranks={ctx.world_size} device={ctx.device}",
        flush=True,
    )
    start = time.perf_counter()
    rows = []
    for task in tasks:  # one task at a time, printed as it finishes
        part = evaluate_guidance(
            model,
            classifier,
            tasks=[task],
            methods=args.methods,
            ns=args.ns,
            presets=args.presets,
            num_samples=args.num_samples,
            steps=args.steps,
            seed=args.seed,
            window=tuple(args.window),
            repeats=args.repeats,
            scale=args.scale,
            dps_scale=args.dps_scale,
            batch_size=args.batch_size,
            out_dir=args.out_dir,
        )
        rows.extend(part)
        say(guidance_table(part), f"\n[{time.perf_counter() - start:.0f} s]\n", flush=True)
    say(guidance_table(rows))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings |= {"world_size": ctx.world_size, "threads": torch.get_num_threads()}
    kept = [r | {"per_sample": r["per_sample"].tolist()} for r in rows]
    if args.json is not None and ctx.is_main:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": settings, "rows": kept}, indent=1))
    if args.update is not None and ctx.is_main:
        shares = noise_label_shares(classifier)
        run = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "version": sk.__version__,
            "tasks": [t.name for t in tasks],
            "args": settings,
            "options": GuidanceConfig.resolve(
                defaults=EVALUATION_DEFAULTS,
                steps=args.steps,
                window=tuple(args.window),
                repeats=args.repeats,
                scale=args.scale,
            ).describe(),
            "noise called the class target": {
                f: round(float(v[args.target]), 4) for f, v in shares.items()
            },
            "note": args.note,
        }
        stored = updated(json.loads(args.update.read_text()), run, kept)
        args.update.write_text(json.dumps(stored, indent=1) + "\n")
        args.update.with_suffix(".txt").write_text(stored_text(stored))
        say(f"updated {args.update} and its .txt")
    close()


def updated(stored: dict, run: dict, rows: list[dict]) -> dict:
    """The stored evaluation with ``rows`` in place of its rows of the same tasks, ``run``
    appended to its runs and named by those rows; a run whose shared arguments differ from
    the stored runs' is refused (its rows would not compare)."""
    for old in stored["runs"]:
        differ = [k for k in SHARED if old["args"][k] != run["args"][k]]
        if differ:
            raise ValueError(
                "the run's arguments differ from a stored run's: "
                + ", ".join(f"{k} {old['args'][k]} vs {run['args'][k]}" for k in differ)
            )
    index = len(stored["runs"])
    kept = [r for r in stored["rows"] if r["task"] not in run["tasks"]]
    order = list(dict.fromkeys(r["task"] for r in stored["rows"]))
    new = kept + [r | {"run": index} for r in rows]
    new.sort(key=lambda r: order.index(r["task"]) if r["task"] in order else len(order))
    return {"runs": [*stored["runs"], run], "rows": new}


def stored_text(stored: dict) -> str:
    """The stored evaluation as text: which run computed which rows, with its settings, then
    the table of every row."""
    lines = []
    for i, run in enumerate(stored["runs"]):
        tasks = list(dict.fromkeys(r["task"] for r in stored["rows"] if r["run"] == i))
        a, o = run["args"], run["options"]
        lines.append(
            f"run {i}: {run['date']}, sagkit {run['version']}, rows of "
            f"{', '.join(tasks) or 'no task (replaced)'}; steps={a['steps']} "
            f"samples={a['num_samples']} window={tuple(a['window'])} repeats={a['repeats']} "
            f"scale={a['scale']} dps_scale={a['dps_scale']} target={a['target']} "
            f"gradient={o['gradient']} threads={a['threads']} "
            f"ranks={a['world_size']} device={a['device']}"
        )
        if run.get("noise called the class target"):
            shares = ", ".join(
                f"{f} {v:.1%}" for f, v in run["noise called the class target"].items()
            )
            lines.append(f"  pure noise called {a['target']}: {shares}")
        if run.get("note"):
            lines.append(f"  {run['note']}")
    rows = [r | {"per_sample": torch.tensor(r["per_sample"])} for r in stored["rows"]]
    return "\n".join([*lines, "", guidance_table(rows), ""])


if __name__ == "__main__":
    apply_cpu_threads()  # the shared-machine thread policy, as the sagkit command applies it
    main()
