"""Print the training-free guidance table: sagkit's methods beside the papers' presets.

Rows: none, FreeDoM, DPS, SAG (n = 3) and backward guidance with sagkit's defaults, and the
presets sag-paper, freedom-paper and dps-paper (each official code's sampler, window, repeats,
estimate grid and step rule), all at the same number of steps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_eval.py    # 50 steps, ≈ 30 min

The run of these defaults is stored in ``benchmarks/results/guidance_eval.json`` (rows with
per-sample losses; ``guidance_eval.txt`` the printed tables): notebook 04 quotes it.
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_eval.py --steps 20 --num-samples 16

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

Uses the shipped digits UNet and classifier (``sk.load_pretrained("digits")``,
``sk.load_classifier("digits")``) and :func:`sagkit.evaluation.evaluate_guidance`. With
``--json PATH`` the rows (with the per-sample losses) are also written there; keep results in
the git-ignored ``results/`` folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import sagkit as sk
from sagkit.lab.distributed import close, init_distributed
from sagkit.lab.evaluation import default_tasks, evaluate_guidance, guidance_table


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
    parser.add_argument("--target", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per shard")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="shard files; resumes from those that match"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (rank r: GPU r)")
    parser.add_argument("--verbose", action="store_true", help="log shards, every rank")
    parser.add_argument("--json", type=Path, default=None)
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
    model = sk.load_pretrained("digits", device=ctx.device, path=unet_dir)
    classifier = sk.load_classifier("digits", device=ctx.device, path=classifier_dir)
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
    if args.json is not None and ctx.is_main:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        kept = [r | {"per_sample": r["per_sample"].tolist()} for r in rows]
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        settings["world_size"] = ctx.world_size
        args.json.write_text(json.dumps({"args": settings, "rows": kept}, indent=1))
    close()


if __name__ == "__main__":
    main()
