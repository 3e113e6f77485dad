"""Twisted SMC on the digits mixture: the distance to the exact tilted target against the
particle count N, with the exact and the one-step twisting function (docs/maths.md §14.8).

Each SMC run (:func:`sagkit.guidance.smc.sample_smc`) moves N particles by FreeDoM's guided
DDPM step (the proposal; c = ``--scale``) and reweights them by twisted targets; one particle
per run, drawn from its final weights, is compared with exact samples of the tilted mixture
by the sliced W₂ (``--groups`` groups of ``--runs`` runs: mean ± standard error), against the
noise floor of two exact sets of ``--runs`` samples. N = 1 is FreeDoM alone. Tasks
(:func:`sagkit.lab.smc_study.smc_tasks`): ``inpaint`` (the top half of a held-out digit
observed with noise τ = ``--tau``: a sharp posterior) and ``class`` (the mixture's exact
classifier toward digit 3). The mixture is built on the schedule of diffusers'
``DDPMScheduler`` (linear β, 1000 steps), whose ``--steps`` timesteps the kernels visit.
Each row stores the network calls (and the differentiated ones) and the seconds per final
sample. ``--steps-sweep`` repeats the exact twisting at N = ``--sweep-particles`` at other
step counts: what remains above the floor at large N is the DDPM discretisation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/smc_study.py            # the stored size
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/smc_study.py --components 16 --steps 10 \
        --runs 8 --groups 2 --particles 1 4 --steps-sweep 5 --sweep-particles 4 \
        --json /tmp/smc.json

writes ``--json`` (default ``benchmarks/results/smc.json``), a ``.md`` table and the figure
(``.png``, :func:`sagkit.lab.smc_study.plot_smc`) beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

import sagkit as sk
from sagkit.core.device import apply_cpu_threads
from sagkit.lab.smc_study import TWISTS, plot_smc, smc_study, smc_tasks

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", type=int, default=128, help="mixture components")
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps")
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--runs", type=int, default=64, help="SMC runs (draws) per group")
    parser.add_argument("--groups", type=int, default=4, help="independent groups of runs")
    parser.add_argument("--scale", type=float, default=0.2, help="FreeDoM's c (RMS rule)")
    parser.add_argument("--tau", type=float, default=0.2, help="inpainting noise τ")
    parser.add_argument("--twists", nargs="+", default=list(TWISTS), choices=TWISTS)
    parser.add_argument(
        "--steps-sweep", type=int, nargs="*", default=[50, 250],
        help="other DDPM step counts for the exact twisting at --sweep-particles",
    )  # fmt: skip
    parser.add_argument("--sweep-particles", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS / "smc.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def markdown(result: dict) -> str:
    """The stored table: one row per task, twisting function and N."""
    c = result["config"]
    lines = [
        "# Twisted SMC: distance to the exact tilted target against the particle count",
        "",
        f"{c['components']}-component digits mixture, {c['steps']} DDPM steps, FreeDoM proposal "
        f"(c = {c['scale']}), {c['groups']} groups × {c['runs']} runs, one draw per run; "
        f"sliced W₂ (mean ± standard error over groups). Wall time {result['wall_seconds']} s.",
        "",
        "| task | twisting | N | SW₂ | ± | floor | calls/sample | of them with gradient "
        "| s/sample | final ESS | resampled | log Ẑ (log Z) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, task in result["tasks"].items():
        floor, floor_error = task["floor"]
        for r in task["rows"]:
            lines.append(
                f"| {name} | {r['twist']} | {r['particles']} | {r['distance']:.4f} | "
                f"{r['error']:.4f} | {floor:.4f} ± {floor_error:.4f} | "
                f"{r['calls_per_sample']:.0f} | {r['graph_calls_per_sample']:.0f} | "
                f"{r['seconds_per_sample']:.4f} | {r['final_ess']:.2f} | "
                f"{r['resampling_rate']:.3f} | {r['log_normaliser']:.2f} ({task['log_z']:.2f}) |"
            )
    if c["steps_sweep"]:
        lines += [
            "",
            f"The DDPM discretisation (exact twisting, N = {c['sweep_particles']}): SMC targets "
            "the model's tilted path measure, whose x_0-marginal approaches the tilted target "
            "as the steps grow.",
            "",
            "| task | steps | SW₂ | ± | floor | s/sample | log Ẑ (log Z) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, task in result["tasks"].items():
            floor, floor_error = task["floor"]
            same = [
                r for r in task["rows"]
                if r["twist"] == "exact" and r["particles"] == c["sweep_particles"]
            ]  # fmt: skip
            rows = sorted([*task["steps_sweep"], *({"steps": c["steps"], **r} for r in same)],
                          key=lambda r: r["steps"])  # fmt: skip
            for r in rows:
                lines.append(
                    f"| {name} | {r['steps']} | {r['distance']:.4f} | {r['error']:.4f} | "
                    f"{floor:.4f} ± {floor_error:.4f} | {r['seconds_per_sample']:.4f} | "
                    f"{r['log_normaliser']:.2f} ({task['log_z']:.2f}) |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from diffusers import DDPMScheduler

    args = parse(argv)
    torch.set_num_threads(1)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    mixture = sk.digits.digits_mixture(
        n_components=args.components, schedule=sk.VPSchedule.from_diffusers(scheduler)
    )
    start = time.perf_counter()
    result = smc_study(
        mixture,
        smc_tasks(mixture, tau=args.tau),
        twists=args.twists,
        particles=args.particles,
        guidance="freedom",
        scale=args.scale,
        steps=args.steps,
        sampler=scheduler,
        runs=args.runs,
        groups=args.groups,
        steps_sweep=args.steps_sweep,
        sweep_particles=args.sweep_particles,
        seed=args.seed,
        progress=not args.quiet,
    )
    result["config"]["tau"] = args.tau
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["command"] = "benchmarks/smc_study.py " + " ".join(argv or [])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.json.with_suffix(".md").write_text(markdown(result))
    figure = plot_smc(result)
    figure.savefig(args.json.with_suffix(".png"), dpi=120)
    if not args.quiet:
        print(markdown(result))
    return result


if __name__ == "__main__":
    apply_cpu_threads()  # the shared-machine thread policy, as the sagkit command applies it
    main()
