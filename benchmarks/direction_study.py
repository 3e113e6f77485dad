"""The direction study: each guidance method's direction against the exact guidance score.

On the digits mixture (:func:`sagkit.digits_mixture`: 512 components, s = 0.1), under the VP
schedule (``VPSchedule.linear()``) and the rectified flow (``FlowSchedule.rectified(shift=3)``),
for six losses (inpainting the top half of a held-out digit with τ = 0.05 and 1, a linear
loss with |w| = 5 and 0.5, the mixture's own classifier for digit 3 with strength β = 10 and 1:
sharp then broad), at t = 0.9 … 0.1 with x_t drawn from the exact guided marginal p̃_t, every
method's cos(−d, h_t) and ‖d‖/‖h_t‖ (the μ-terms': cos(Δ0, x0_shift) and ‖Δ0‖/‖x0_shift‖),
summarised by median and quartiles over the samples (:mod:`sagkit.lab.direction`,
docs/maths.md §14.6). Then two supporting measurements:

- the probe: τ = 0.3 inpainting under VP, with x_t from the guided marginal and from the
  unguided one;
- why: the Jacobian ∂x̂0/∂x_t of the one-step and the 8-step estimates (median largest and RMS
  singular value, against a single Gaussian's α_t s²/v_t and s/sqrt(v_t)), and the median
  cosines of n = 1 and n = 8 on the probe's loss as the component std s and the number of
  components K change.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/direction_study.py            # stored size
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/direction_study.py --fast --out /tmp/d

writes ``direction.json`` (summaries, not per-sample values), ``direction.md`` (the tables) and
``direction.png`` (median cosine against t, a panel per loss and schedule) into ``--out``
(default ``benchmarks/results``).
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
from sagkit.core.tilted import ExactGuidance
from sagkit.lab.direction import (
    direction_study,
    estimate_jacobian,
    guided_states,
    held_out_digit,
    inpainting_loss,
    plot_directions,
    study_losses,
)

RESULTS = Path(__file__).resolve().parent / "results"
LABEL = 3  # the class and linear losses' digit


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=96, help="states per t")
    parser.add_argument(
        "--times", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    )
    parser.add_argument("--components", type=int, default=512)
    parser.add_argument("--jacobian-samples", type=int, default=16)
    parser.add_argument("--scan-samples", type=int, default=64)
    parser.add_argument("--scan-times", type=float, nargs="+", default=[0.9, 0.6, 0.3])
    parser.add_argument("--stds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fast", action="store_true", help="a tiny run (tests)")
    args = parser.parse_args(argv)
    if args.fast:
        args.samples, args.times, args.components = 3, [0.6], 16
        args.jacobian_samples, args.scan_samples, args.scan_times = 2, 3, [0.5]
        args.stds, args.ks = [0.1], [1, 4]
    return args


def schedules() -> dict:
    return {"VP": sk.VPSchedule.linear(), "flow": sk.FlowSchedule.rectified(shift=3.0)}


def summary_only(study: dict) -> dict:
    """The study without its per-sample values."""
    return {k: v for k, v in study.items() if k not in ("cosine", "ratio")}


def main_cases(args, reference: torch.Tensor) -> list[dict]:
    cases = []
    for sname, schedule in schedules().items():
        mixture = sk.digits.digits_mixture(n_components=args.components, schedule=schedule)
        for i, (lname, loss) in enumerate(study_losses(mixture, reference, label=LABEL).items()):
            start = time.perf_counter()
            study = direction_study(
                mixture,
                loss,
                times=args.times,
                samples=args.samples,
                seed=args.seed,
                progress=True,
            )
            seconds = time.perf_counter() - start
            cases.append(
                {
                    "schedule": sname,
                    "loss": lname,
                    "posterior": "sharp" if i % 2 == 0 else "broad",
                    "seconds": seconds,
                    "seconds_per_sample": seconds / (args.samples * len(args.times)),
                    "study": summary_only(study),
                }
            )
            print(f"{sname} {lname}: {seconds:.1f} s", flush=True)
    return cases


def probe(args, mixture, reference: torch.Tensor) -> dict:
    loss = inpainting_loss(reference, tau=0.3)
    return {
        states: summary_only(
            direction_study(
                mixture,
                loss,
                times=args.times,
                samples=args.samples,
                seed=args.seed,
                states=states,
            )
        )
        for states in ("guided", "prior")
    }


def jacobians(args, mixture, reference: torch.Tensor) -> dict:
    """Median largest and RMS singular value of ∂x̂0/∂x_t for n = 1 and 8, VP, τ = 0.3 states."""
    exact = ExactGuidance(mixture, inpainting_loss(reference, tau=0.3))
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    s, sc = mixture.std, mixture.schedule
    for t in args.times:
        x_t = guided_states(exact, t, args.jacobian_samples, generator=generator)
        row = {"t": t}
        a, sg = sc.alpha(t), sc.sigma(t)
        v = a * a * s * s + sg * sg
        row["single tweedie"], row["single flow"] = a * s * s / v, s / math.sqrt(v)
        for n in (1, 8):
            svals = torch.linalg.svdvals(estimate_jacobian(mixture, x_t, t, n=n))
            row[f"n={n} largest"] = float(svals[:, 0].median())
            row[f"n={n} rms"] = float(svals.pow(2).mean(1).sqrt().median())
        rows.append(row)
    return {"rows": rows}


def scans(args, reference: torch.Tensor) -> dict:
    """Median cosines of n = 1 and n = 8 on τ = 0.3 inpainting (VP) as s and K change."""

    def medians(mixture) -> dict:
        loss = inpainting_loss(reference, tau=0.3)
        study = direction_study(
            mixture,
            loss,
            times=args.scan_times,
            samples=args.scan_samples,
            ns=(1, 8),
            seed=args.seed,
        )
        return {m: study["summary"][m]["cosine"]["median"] for m in ("n=1", "n=8")}

    return {
        "times": args.scan_times,
        "std": {
            str(s): medians(sk.digits.digits_mixture(n_components=args.components, std=s))
            for s in args.stds
        },
        "components": {str(k): medians(sk.digits.digits_mixture(n_components=k)) for k in args.ks},
    }


def fmt(v: float) -> str:
    if v != v:
        return "–"
    return f"{v:.2f}" if 0.01 <= abs(v) < 100 or v == 0 else f"{v:.1e}"


def table(times, rows: dict[str, list[float]], first: str = "method") -> list[str]:
    lines = [f"| {first} | " + " | ".join(f"t={t:g}" for t in times) + " |"]
    lines.append("|---" * (len(times) + 1) + "|")
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in values) + " |")
    return lines


def markdown(result: dict) -> str:
    times = result["config"]["times"]
    lines = [
        "# Direction study",
        "",
        "Median over the samples of cos(−d, h_t) (gradient methods) or cos(Δ0, x0_shift)",
        "(μ-terms), x_t ~ the exact guided marginal; `sagkit.lab.direction`, docs/maths.md §14.6.",
        f"Samples per t: {result['config']['samples']}; mixture: {result['config']['components']}",
        f"digits components, s = 0.1. Written by benchmarks/direction_study.py on {result['date']}.",
        "",
        "## Median cosine, n = 1, 2, 4, 8 (to-zero grid)",
        "",
    ]
    for case in result["cases"]:
        st = case["study"]
        lines.append(
            f"**{case['schedule']}, {case['loss']} ({case['posterior']}, "
            f"{st['effective_components']:.1f} effective components)**"
        )
        lines.append("")
        rows = {m: st["summary"][m]["cosine"]["median"] for m in ("n=1", "n=2", "n=4", "n=8")}
        lines += table(times, rows)
        lines.append("")
    lines += ["## Every method: median cosine, then median norm ratio", ""]
    for case in result["cases"]:
        st = case["study"]
        lines.append(f"**{case['schedule']}, {case['loss']}: cosine**")
        lines.append("")
        lines += table(times, {m: st["summary"][m]["cosine"]["median"] for m in st["methods"]})
        lines.append("")
        lines.append(f"**{case['schedule']}, {case['loss']}: ‖d‖/‖h‖ (μ-terms ‖Δ0‖/‖x0_shift‖)**")
        lines.append("")
        lines += table(times, {m: st["summary"][m]["ratio"]["median"] for m in st["methods"]})
        vanished = {m: v for m, v in st["vanished"].items() if any(v)}
        if vanished:
            lines.append("")
            lines.append("Fraction of samples whose direction is exactly 0 (cosine counted 0):")
            lines.append("")
            lines += table(times, vanished)
        lines.append("")
    probe_ = result["probe"]
    lines += ["## The probe: τ = 0.3 inpainting, VP", ""]
    for states, st in probe_.items():
        for stat in ("cosine", "ratio"):
            lines.append(f"**x_t from the {states} marginal: median {stat}**")
            lines.append("")
            rows = {m: st["summary"][m][stat]["median"] for m in ("n=1", "n=2", "n=4", "n=8")}
            lines += table(times, rows)
            lines.append("")
    lines += ["## Jacobian ∂x̂0/∂x_t (median singular values), VP, τ = 0.3 states", ""]
    jac = result["jacobian"]["rows"]
    keys = [k for k in jac[0] if k != "t"]
    lines += table([r["t"] for r in jac], {k: [r[k] for r in jac] for k in keys}, "quantity")
    lines.append("")
    sc = result["scans"]
    lines += ["## Median cosine as s and K change (τ = 0.3 inpainting, VP)", ""]
    rows = {f"s={s} {m}": v for s, d in sc["std"].items() for m, v in d.items()}
    lines += table(sc["times"], rows, "case")
    lines.append("")
    rows = {f"K={k} {m}": v for k, d in sc["components"].items() for m, v in d.items()}
    lines += table(sc["times"], rows, "case")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    reference, held_label = held_out_digit(n_components=args.components)
    cases = main_cases(args, reference)
    result = {
        "date": datetime.date.today().isoformat(),
        "config": {
            "samples": args.samples,
            "times": args.times,
            "components": args.components,
            "std": 0.1,
            "label": LABEL,
            "reference_label": held_label,
            "sampler_steps": 25,
            "seed": args.seed,
        },
        "cases": cases,
    }
    mixture = sk.digits.digits_mixture(n_components=args.components)  # VP
    result["probe"] = probe(args, mixture, reference)
    result["jacobian"] = jacobians(args, mixture, reference)
    result["scans"] = scans(args, reference)
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "direction.json").write_text(json.dumps(result, indent=1))
    (args.out / "direction.md").write_text(markdown(result))
    studies = {(c["loss"], c["schedule"]): c["study"] for c in cases}
    fig = plot_directions(studies)
    fig.savefig(args.out / "direction.png", dpi=110)
    print(f"wrote {args.out / 'direction.json'} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    apply_cpu_threads()  # the shared-machine thread policy, as the sagkit command applies it
    main()
