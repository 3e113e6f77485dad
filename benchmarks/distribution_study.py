"""The distribution study: every guidance method's samples against exact samples of the target.

On the exact digits mixture (``sk.digits_mixture()``, 512 components) and the closed-form
losses of :mod:`sagkit.core.tilted` (inpainting of the top half of a held-out digit with a
sharp and a broad posterior, the mixture's own classifier for a label, a linear loss), each
method's scales are tuned by the beam search of :mod:`sagkit.lab.tuning` to minimise the
sliced W2 to exact samples on tuning seeds, then evaluated on disjoint seeds: sliced W2 and
energy distance to exact samples (mean ± s.e. over independent evaluation batches), beside
the noise floor (two exact sets of the same size), with the network calls and seconds per
sample (:mod:`sagkit.lab.distribution`, docs/maths.md §14.7). Every method shares the base
sampler, steps, window (0, 1) and repeats (1). The VP study uses diffusers' DDPMScheduler
(50 steps), the flow study the rectified flow (shift 3) with sagkit's Euler sampler (25
steps), at a smaller size. Every search starts at the methods' defaults times 1/16 (TFG's
smoothing radius γ at its default: it is no step), the defaults being chosen for the window
(0.3, 0.7) and 10–30× too large over (0, 1) (a probe's measure:
:data:`sagkit.lab.distribution.START_FACTOR`), with the same budget of 12 candidates per
method; a row whose chosen value of some scale is the smallest or largest tried is flagged
``edge`` (the search may not have converged there), marked "edge: <scale>" in the table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distribution_study.py    # the stored size
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distribution_study.py --fast --json /tmp/d.json

writes ``--json`` (default ``benchmarks/results/distribution.json``), a ``.md`` table beside it
and the figures ``distribution_<schedule>_distances.png`` and
``distribution_<schedule>_frontier.png``. Seconds are wall times measured on the machine of
the run (shared: see the ``note`` and ``threads`` in the settings), interleaved across methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

import matplotlib
import torch

import sagkit as sk
from sagkit.lab.distribution import (
    METHODS,
    START_FACTOR,
    frontier,
    plot_distances,
    plot_frontier,
    run_study,
    study_mixture,
    study_tasks,
)

matplotlib.use("Agg")

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ["inpaint-sharp", "inpaint-broad", "class", "linear"]


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", nargs="+", default=["vp", "flow"], choices=["vp", "flow"])
    parser.add_argument("--components", type=int, default=512)
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=None, help="labels of METHODS")
    parser.add_argument("--steps", type=int, default=50, help="VP steps")
    parser.add_argument("--samples", type=int, default=450, help="per evaluation batch (VP)")
    parser.add_argument("--batches", type=int, default=4, help="evaluation batches")
    parser.add_argument("--tune-samples", type=int, default=192, help="per candidate (VP)")
    parser.add_argument("--budget", type=int, default=12, help="candidates per method and task")
    parser.add_argument(
        "--start-factor",
        type=float,
        default=START_FACTOR,
        help="each step scale's start: its default times this",
    )
    parser.add_argument("--flow-steps", type=int, default=25)
    parser.add_argument("--flow-samples", type=int, default=250)
    parser.add_argument("--flow-tune-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS / "distribution.json")
    parser.add_argument("--note", default="", help="recorded with the run (e.g. the load)")
    parser.add_argument("--fast", action="store_true", help="a toy size, for tests")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.fast:
        args.components, args.tasks, args.steps, args.flow_steps = 16, ["inpaint-broad"], 4, 4
        args.samples = args.flow_samples = 16
        args.tune_samples = args.flow_tune_samples = 8
        args.batches, args.budget = 2, 3
        args.methods = args.methods or ["unguided", "freedom", "sag n=2"]
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    by = {m.label: m for m in METHODS}
    labels = list(by) if args.methods is None else args.methods
    unknown = [m for m in labels if m not in by]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; the methods are {list(by)}")
    start = time.perf_counter()
    studies = {}
    for schedule in args.schedules:
        flow = schedule == "flow"
        mixture, settings = study_mixture(schedule, n_components=args.components)
        settings = dataclasses.replace(settings, steps=args.flow_steps if flow else args.steps)
        began = time.perf_counter()
        say(f"{schedule}: {settings.describe()}")
        studies[schedule] = run_study(
            mixture,
            settings,
            tasks=study_tasks(mixture, names=args.tasks),
            methods=[by[m] for m in labels],
            samples=args.flow_samples if flow else args.samples,
            batches=args.batches,
            tune_samples=args.flow_tune_samples if flow else args.tune_samples,
            budget=args.budget,
            seed=args.seed,
            start_factor=args.start_factor,
            progress=not args.quiet,
            log=say,
        )
        studies[schedule]["settings"]["wall_seconds"] = round(time.perf_counter() - began, 1)
    result = {
        "settings": {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "version": sk.__version__,
            "threads": torch.get_num_threads(),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "note": args.note,
            "timing": "time.perf_counter per run, methods interleaved batch by batch, on the "
            "machine of the run",
            "standard_errors": "over the independent evaluation batches (each against its own "
            "exact set)",
            "tuning": f"beam_search (start: the defaults × {args.start_factor:g}, TFG's gamma "
            "at its default; grid 1/4, 4; refine 2; beam 2) minimising the sliced W2 of the "
            "tuning samples to as many exact samples, seeds disjoint from the evaluation's; "
            "'edge': the chosen value of a scale is the smallest or largest tried",
        },
        "studies": studies,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.json.with_suffix(".md").write_text(markdown(result))
    for schedule, study in studies.items():
        stem = args.json.with_suffix("").name
        for kind, plot in (("distances", plot_distances), ("frontier", plot_frontier)):
            fig = plot(study)
            fig.savefig(args.json.parent / f"{stem}_{schedule}_{kind}.png", dpi=90)
            matplotlib.pyplot.close(fig)
    say(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The tables: per study and task, each method's distances (± s.e.), cost and scales; the
    noise floor first; then the frontier's methods."""
    s = result["settings"]
    lines = [
        "# Distribution study: guided samples against exact samples of the tilted target",
        "",
        f"{s['date']}, sagkit {s['version']}, {s['threads']} thread(s), {s['wall_seconds']} s. "
        f"{s['note']}",
        f"Standard errors {s['standard_errors']}. Timing: {s['timing']}.",
        f"Tuning: {s['tuning']}.",
    ]
    for schedule, study in result["studies"].items():
        st = study["settings"]
        lines += [
            "",
            f"## {schedule}: {st['schedule']}, {st['components']} components, {st['sampler']} "
            f"{st['steps']} steps, window {st['window']}, repeats {st['repeats']}",
            "",
            f"{st['batches']} evaluation batches of {st['samples']} samples; tuning on "
            f"{st['tune_samples']} samples, budget {st['budget']}, start the defaults × "
            f"{st['start_factor']:g}; {st['wall_seconds']} s.",
        ]
        for task, description in st["tasks"].items():
            floor = study["floors"][task]
            lines += [
                "",
                f"### {task} ({description})",
                "",
                "| method | sliced W2 | energy | calls/sample | s/sample | tuned scales | edge |",
                "|---|---|---|---|---|---|---|",
                f"| noise floor | {floor['sliced_w2'][0]:.4f} ± {floor['sliced_w2'][1]:.4f} | "
                f"{floor['energy'][0]:.4f} ± {floor['energy'][1]:.4f} | | | | |",
            ]
            for r in study["rows"]:
                if r["task"] != task:
                    continue
                scales = ", ".join(f"{k}={v:.3g}" for k, v in r["scales"].items())
                edge = f"**edge: {', '.join(r['edge_scales'])}**" if r["edge"] else ""
                lines.append(
                    f"| {r['method']} | {r['sliced_w2']:.4f} ± {r['sliced_w2_se']:.4f} | "
                    f"{r['energy']:.4f} ± {r['energy_se']:.4f} | {r['calls_per_sample']} | "
                    f"{r['sec_per_sample']:.2e} | {scales} | {edge} |"
                )
            for cost in ("calls_per_sample", "sec_per_sample"):
                shown = " → ".join(p["method"] for p in frontier(study, task, cost=cost))
                lines.append(f"\nFrontier in {cost} (sliced W2, oracle left out): {shown}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
