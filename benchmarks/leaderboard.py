"""The leaderboard: every training-free guidance method, tuned the same way, on the digits tasks.

Methods: unguided sampling, FreeDoM, DPS, SAG (n = 3), backward guidance, LGD, MPGD, universal
guidance (UGD), TFG's unified step, and TFG with SAG's 3-step estimate for its ρ-term
(:mod:`sagkit.guidance.family`). Each guided method's scales are tuned per task by the beam
search of :mod:`sagkit.lab.tuning` (the same budget of candidates for every method, scored on
tuning samples disjoint from the evaluation's), then evaluated with
:func:`sagkit.lab.evaluation.evaluate_guidance` on the evaluation samples. Every method shares
the base sampler, steps, guidance window and repeats (2), so rows differ in the method and its
scales only. Columns: final loss, accuracy, Fréchet distance, seconds per sample, the peak
bytes saved for backward during a run of ``--memory-batch`` samples
(:func:`sagkit.lab.profiling.profile`) and the paired loss difference against the task's best
method (lowest mean loss), with its standard error.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leaderboard.py          # the stored size
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leaderboard.py --steps 10 --num-samples 8 \
        --tune-samples 4 --budget 4 --json results/lb.json --tuned results/tuned.json

writes ``--tuned`` (default ``benchmarks/results/tuned.json``: the tuned values per task and
method, with every candidate's score) and ``--json`` (default
``benchmarks/results/leaderboard.json``, with a ``.md`` table beside it). A stored tuning whose
settings equal the run's is read back instead of tuned again (``--retune`` forces it).
Under ``torchrun`` the tuning's and the evaluation's shards are dealt to the ranks, and with
``--out-dir`` both resume from their shard files (:mod:`sagkit.lab.evaluation`).

``--tiny-sd`` runs the same methods, with their default scales, on the tiny Stable Diffusion
pipeline of random weights (:func:`sagkit.sd.tiny.tiny_pipeline`) with a decoded-image loss:
a wiring check only (its numbers say nothing about the methods), written to
``benchmarks/results/leaderboard_tiny_sd.json`` by default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch

import sagkit as sk
from sagkit.core.device import apply_cpu_threads
from sagkit.guidance.family import LGD, MPGD, TFG, UGD
from sagkit.lab.distributed import close, init_distributed
from sagkit.lab.evaluation import default_tasks, evaluate_guidance, paired_comparison
from sagkit.lab.profiling import profile
from sagkit.lab.tuning import Tunable, load_tuned, save_tuned, tune_methods, tuned_variants

RESULTS = Path(__file__).resolve().parent / "results"

TUNABLES = (
    Tunable("freedom", "freedom", ("scale",)),
    Tunable("dps", "dps", ("scale",)),
    Tunable("sag n=3", "sag", ("scale",), {"n": 3}),
    Tunable("backward", "backward", ("scale",)),
    Tunable("lgd", LGD(), ("scale",)),
    Tunable("mpgd", MPGD(), ("scale",)),
    Tunable("ugd", UGD(), ("forward", "backward")),
    Tunable("tfg", TFG(), ("rho", "mu", "gamma")),
    Tunable("tfg+sag n=3", TFG(estimate=3), ("rho", "mu", "gamma")),
)
"""Every guided method of the leaderboard and the scales the tuning searches."""

# the arguments a stored tuning must share with a run to be read back
TUNING_ARGS = ("steps", "window", "repeats", "tune_samples", "budget", "beam", "seed", "tasks")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--num-samples", type=int, default=48, help="evaluation samples")
    parser.add_argument("--tune-samples", type=int, default=12, help="samples per candidate")
    parser.add_argument("--budget", type=int, default=12, help="candidates per method and task")
    parser.add_argument("--beam", type=int, default=2)
    parser.add_argument("--window", type=float, nargs=2, default=[0.3, 0.7])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=48, help="samples per shard")
    parser.add_argument("--memory-batch", type=int, default=8, help="samples of the memory run")
    parser.add_argument("--tasks", nargs="+", default=["class", "style", "identity", "inpaint"])
    parser.add_argument("--methods", nargs="+", default=None, help="labels of TUNABLES")
    parser.add_argument("--out-dir", type=Path, default=None, help="shard files (resume)")
    parser.add_argument("--tuned", type=Path, default=RESULTS / "tuned.json")
    parser.add_argument("--retune", action="store_true", help="tune even if --tuned matches")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--note", default="", help="recorded with the run (e.g. the load)")
    parser.add_argument("--tiny-sd", action="store_true", help="the wiring check on tiny SD")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.json is None:
        args.json = RESULTS / ("leaderboard_tiny_sd.json" if args.tiny_sd else "leaderboard.json")
    return args


def chosen(args) -> list[Tunable]:
    if args.methods is None:
        return list(TUNABLES)
    by = {t.label: t for t in TUNABLES}
    unknown = [m for m in args.methods if m not in by]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; the methods are {list(by)}")
    return [by[m] for m in args.methods]


def main(argv=None) -> dict:
    args = parse(argv)
    return run(args, tiny_sd if args.tiny_sd else digits, markdown)


def run(args, body, render) -> dict:
    """``body(args, ctx, say)`` under torchrun or alone, its settings stamped with the date,
    version, threads, ranks, device, wall time and ``--note``; written on rank 0 to
    ``args.json`` with ``render(result)`` as the Markdown beside it."""
    ctx = init_distributed(device=args.device)
    say = (lambda *a: None) if args.quiet or not ctx.is_main else (lambda *a: print(*a, flush=True))
    start = time.perf_counter()
    result = body(args, ctx, say)
    result["settings"] |= {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "version": sk.__version__,
        "threads": torch.get_num_threads(),
        "ranks": ctx.world_size,
        "device": args.device,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "note": args.note,
    }
    if ctx.is_main:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(render(result))
        say(render(result))
    close()
    return result


def digits(args, ctx, say) -> dict:
    """Tune (or read the stored tuning), evaluate, measure memory; the leaderboard's dict."""
    model = sk.digits.load_pretrained("digits", device=ctx.device)
    classifier = sk.digits.load_classifier("digits", device=ctx.device)
    tasks = [t for t in default_tasks(classifier) if t.name in args.tasks]
    tunables = chosen(args)
    shared = {"steps": args.steps, "window": tuple(args.window), "repeats": args.repeats}
    tuning_settings = {
        "steps": args.steps,
        "window": list(args.window),
        "repeats": args.repeats,
        "tune_samples": args.tune_samples,
        "budget": args.budget,
        "beam": args.beam,
        "seed": args.seed,
        "tasks": [t.name for t in tasks],
        "grid": [0.25, 4.0],
        "refine": 2.0,
        "score": "mean final loss of the tuning samples (split 'tuning')",
    }
    stored = None
    if args.tuned.exists() and not args.retune:
        stored = load_tuned(args.tuned)
        same = all(stored["settings"].get(k) == tuning_settings[k] for k in TUNING_ARGS)
        complete = all(
            t.label in stored["tasks"].get(task.name, {}) for task in tasks for t in tunables
        )
        stored = stored if same and complete else None
    if stored is None:
        say(f"tuning {len(tunables)} methods on {len(tasks)} tasks, budget {args.budget}")
        tuned = tune_methods(
            model,
            classifier,
            tunables,
            tasks=tasks,
            num_samples=args.tune_samples,
            budget=args.budget,
            beam=args.beam,
            seed=args.seed,
            batch_size=args.batch_size,
            out_dir=args.out_dir,
            log=say,
            **shared,
        )
        stored = {"settings": tuning_settings, "tasks": tuned}
        if ctx.is_main:
            save_tuned(args.tuned, tuned, tuning_settings)
    else:
        say(f"read the stored tuning {args.tuned}")
    rows = []
    for task in tasks:
        part = evaluate_guidance(
            model,
            classifier,
            tasks=[task],
            methods=("none",),
            variants=tuned_variants(tunables, stored, task.name),
            num_samples=args.num_samples,
            seed=args.seed,
            batch_size=args.batch_size,
            out_dir=args.out_dir,
            **shared,
        )
        for r in part:
            entry = stored["tasks"][task.name].get(r["method"])
            r["scales"] = None if entry is None else entry["values"]
        rows.extend(part)
        say(f"evaluated {task.name}")
    memory = peak_memory(model, tasks[0], tunables, args, shared)
    for r in rows:
        r["peak_saved_bytes"] = memory[r["method"]]
    settings = {
        "model": "digits",
        "tasks": [t.name for t in tasks],
        "steps": args.steps,
        "window": list(args.window),
        "repeats": args.repeats,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "memory": f"peak bytes saved for backward, one run of {args.memory_batch} samples "
        f"of the {tasks[0].name} task",
        "tuning": tuning_settings,
        "tuned_file": args.tuned.name,
    }
    return {"settings": settings, "rows": compared(rows)}


def peak_memory(model, task, tunables, args, shared) -> dict[str, int]:
    """The peak bytes saved for backward (and held by the engine) during one guided run of
    ``--memory-batch`` samples, per method (default scales: the peak does not depend on them)."""
    p = next(model.parameters())
    size = model.unet.config.sample_size
    x_T = torch.randn(
        args.memory_batch, 1, size, size, generator=torch.Generator().manual_seed(args.seed)
    ).to(p)
    runs = {"none": {"guidance": "none"}} | {t.label: t.fields(t.start()) for t in tunables}
    peaks = {}
    for label, fields in runs.items():
        report = profile(
            sk.guided_sample,
            model,
            task.loss,
            x_T,
            progress=False,
            generator=torch.Generator().manual_seed(args.seed),
            exclude=[*model.parameters(), *model.buffers()],
            **shared,
            **fields,
        )
        peaks[label] = report.saved_bytes
    return peaks


def compared(rows: list[dict]) -> list[dict]:
    """The rows as JSON, each with the paired difference of its loss against the task's best
    guided method (lowest mean loss): mean, standard error and verdict."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        guided = [r for r in mine if r["guidance"] != "none"]
        best = min(guided, key=lambda r: r["loss"])["method"]
        for r in mine:
            mean, se, verdict = (0.0, 0.0, "best")
            if r["method"] != best:
                mean, se, verdict = paired_comparison(rows, task, r["method"], baseline=best)
            out.append(
                {k: v for k, v in r.items() if k != "per_sample"}
                | {
                    "best": best,
                    "diff_vs_best": mean,
                    "diff_se": se,
                    "verdict": verdict,
                    "per_sample": torch.as_tensor(r["per_sample"]).tolist(),
                }
            )
    return out


def tiny_sd(args, ctx, say) -> dict:
    """Every method, default scales, on the tiny random Stable Diffusion pipeline: wiring."""
    from sagkit.sd.pipeline import GuidedStableDiffusion
    from sagkit.sd.tiny import tiny_pipeline

    pipe = tiny_pipeline(latent_size=8)
    guided = GuidedStableDiffusion.from_pipe(pipe)
    target = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1

    def loss(images):  # decoded images (B, 3, 16, 16) in [-1, 1]: mean squared distance
        return (images - target).pow(2).flatten(1).mean(1)

    prompts = ["a digit"] * args.num_samples
    runs = {"none": {"guidance": "none"}} | {t.label: t.fields(t.start()) for t in chosen(args)}
    rows = []
    for label, fields in runs.items():
        start = time.perf_counter()
        report = profile(
            guided,
            prompts,
            loss_fn=loss,
            steps=args.steps,
            window=tuple(args.window),
            repeats=args.repeats,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="latent",
            return_losses=True,
            progress=False,
            exclude=[*pipe.unet.parameters(), *pipe.vae.parameters()],
            **fields,
        )
        seconds = time.perf_counter() - start
        values = report.result[1][-1].double().cpu()
        rows.append(
            {
                "task": "tiny-sd",
                "guidance": fields["guidance"]
                if isinstance(fields["guidance"], str)
                else fields["guidance"].name,
                "method": label,
                "scales": None,
                "loss": float(values.mean()),
                "loss_se": float(values.std() / math.sqrt(len(values))),
                "accuracy": math.nan,
                "fd": math.nan,
                "sec_per_sample": seconds / len(values),
                "peak_saved_bytes": report.saved_bytes,
                "per_sample": values,
            }
        )
        say(f"{label}: loss {rows[-1]['loss']:.4g}")
    settings = {
        "model": "tiny Stable Diffusion (random weights): a wiring check only",
        "tasks": ["tiny-sd"],
        "steps": args.steps,
        "window": list(args.window),
        "repeats": args.repeats,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "scales": "each method's defaults (not tuned)",
        "memory": "peak bytes saved for backward over the whole batch",
    }
    return {"settings": settings, "rows": compared(rows)}


def markdown(result: dict) -> str:
    """The leaderboard as a Markdown table, best first within each task."""
    s = result["settings"]
    lines = []
    if "wiring" in s["model"]:
        lines.append(f"**{s['model']}.** Scales: {s['scales']}.\n")
    lines.append(
        f"{s['num_samples']} samples per row, {s['steps']} steps, window {tuple(s['window'])}, "
        f"{s['repeats']} repeats; Δ is the paired loss difference against the task's best "
        "method, ± its standard error.\n"
    )
    lines.append("| task | method | scales | loss | Δ vs best | acc | FD | s/sample | peak saved |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(result["rows"], key=lambda r: (s["tasks"].index(r["task"]), r["loss"])):
        scales = ", ".join(f"{k}={v:.3g}" for k, v in (r["scales"] or {}).items())
        diff = (
            "best" if r["verdict"] == "best" else f"{r['diff_vs_best']:+.3g} ± {r['diff_se']:.2g}"
        )
        acc = "" if r["accuracy"] is None or math.isnan(r["accuracy"]) else f"{r['accuracy']:.2f}"
        fd = "" if r["fd"] is None or math.isnan(r["fd"]) else f"{r['fd']:.2f}"
        peak = "" if r["peak_saved_bytes"] is None else f"{r['peak_saved_bytes'] / 2**20:.1f} MiB"
        lines.append(
            f"| {r['task']} | {r['method']} | {scales} | {r['loss']:.4g} ± {r['loss_se']:.2g} "
            f"| {diff} | {acc} | {fd} | {r['sec_per_sample']:.3f} | {peak} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    apply_cpu_threads()  # the shared-machine thread policy, as the sagkit command applies it
    main()
