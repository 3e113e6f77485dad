"""The distribution study: every guidance method's samples against exact samples of the target.

On the exact digits mixture (``sk.digits.digits_mixture()``, 512 components) and the closed-form
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
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distribution_study.py --add-smc

``--add-smc`` loads the stored ``--json``, computes only the reference rows of twisted SMC
(:func:`sagkit.lab.distribution.smc_rows`: FreeDoM's tuned step as the proposal, the exact
twisting, N = 4 and 16 particles, one draw per run) on the VP study's tasks (``--tasks``),
on its evaluation batches, and rewrites the JSON, the table and the figures; the stored rows
are kept as they are (reference rows of an earlier ``--add-smc`` are replaced).

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
from sagkit.core.device import apply_cpu_threads
from sagkit.lab.distribution import (
    METHODS,
    START_FACTOR,
    frontier,
    plot_distances,
    plot_frontier,
    run_study,
    smc_rows,
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
    parser.add_argument(
        "--add-smc",
        action="store_true",
        help="add the SMC reference rows to the stored --json's VP study (nothing else is rerun)",
    )
    parser.add_argument("--particles", nargs="+", type=int, default=[4, 16], help="SMC's N")
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
    if args.add_smc:
        return add_smc(args, say)
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
    write(result, args.json)
    say(markdown(result))
    return result


def write(result: dict, path: Path) -> None:
    """The JSON at ``path``, the table beside it and each study's two figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    for schedule, study in result["studies"].items():
        stem = path.with_suffix("").name
        for kind, plot in (("distances", plot_distances), ("frontier", plot_frontier)):
            fig = plot(study)
            fig.savefig(path.parent / f"{stem}_{schedule}_{kind}.png", dpi=90)
            matplotlib.pyplot.close(fig)


def add_smc(args: argparse.Namespace, say) -> dict:
    """The SMC reference rows added to the stored study at ``args.json`` (its VP study, the
    tasks of ``args.tasks`` that it holds), on the stored sampler, sizes and seeds; the other
    rows untouched, earlier SMC rows replaced. Rewrites the JSON, table and figures."""
    result = json.loads(args.json.read_text())
    study = result["studies"]["vp"]
    st = study["settings"]
    mixture, settings = study_mixture("vp", n_components=st["components"])
    settings = dataclasses.replace(settings, steps=st["steps"], window=tuple(st["window"]))
    if settings.describe()["sampler"] != st["sampler"] or st["repeats"] != settings.repeats:
        raise SystemExit(f"the stored VP study's sampler is not the study's: {st}")
    tasks = [t for t in st["tasks"] if t in args.tasks]
    began = time.perf_counter()
    rows = smc_rows(mixture, settings, study, tasks=tasks, particles=args.particles,
                    progress=not args.quiet)  # fmt: skip
    kept = [r for r in study["rows"] if not r.get("reference")]
    order = {t: i for i, t in enumerate(st["tasks"])}
    study["rows"] = sorted(kept + rows, key=lambda r: order[r["task"]])  # stable: SMC last
    st["smc"] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "version": sk.__version__,
        "threads": torch.get_num_threads(),
        "wall_seconds": round(time.perf_counter() - began, 1),
        "note": args.note,
        "tasks": tasks,
        "particles": list(args.particles),
        "description": "twisted SMC (reference, not tuned): FreeDoM's step at its tuned scale "
        "(or 0.2 where the weights collapse: mean ESS < 1.5) as the proposal, the exact "
        "twisting function, one draw per run of N particles, on the evaluation batches' "
        "seeds and exact sets; calls = N x the proposal's; seconds timed in this later run, "
        "not interleaved with the other rows",
    }
    write(result, args.json)
    for r in rows:
        say(f"{r['task']:14s} {r['method']:32s} c={r['proposal_scale']:.4g} "
            f"SW2 {r['sliced_w2']:.4f} ± {r['sliced_w2_se']:.4f} calls {r['calls_per_sample']} "
            f"s/sample {r['sec_per_sample']:.2e} ESS {r['ess_mean']:.3g}")  # fmt: skip
    return result


def markdown(result: dict) -> str:
    """The tables: per study and task, each method's distances (± s.e.), cost and scales; the
    noise floor first, the SMC reference rows (italic) last; then the frontier's methods."""
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
        if "smc" in st:
            smc = st["smc"]
            lines += [
                "",
                f"Reference rows (added {smc['date']}, {smc['threads']} thread(s), "
                f"{smc['wall_seconds']} s; {smc['note']}): {smc['description']}.",
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
                method = r["method"]
                if r.get("reference"):  # SMC: not tuned, its proposal's scale and weights
                    method = f"*{method}* (reference)"
                    scales = (
                        f"proposal c={r['proposal_scale']:.3g} ({r['proposal_scale_source']}); "
                        f"mean ESS {r['ess_mean']:.3g} of {r['particles']}"
                    )
                lines.append(
                    f"| {method} | {r['sliced_w2']:.4f} ± {r['sliced_w2_se']:.4f} | "
                    f"{r['energy']:.4f} ± {r['energy_se']:.4f} | {r['calls_per_sample']} | "
                    f"{r['sec_per_sample']:.2e} | {scales} | {edge} |"
                )
            for cost in ("calls_per_sample", "sec_per_sample"):
                shown = " → ".join(p["method"] for p in frontier(study, task, cost=cost))
                lines.append(
                    f"\nFrontier in {cost} (sliced W2, oracle and reference rows left out): {shown}"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    apply_cpu_threads()  # the shared-machine thread policy, as the sagkit command applies it
    main()
