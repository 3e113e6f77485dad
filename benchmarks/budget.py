"""Time and memory of the budgeted engine against its budget; guided sampling with ε reuse.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/budget.py              # 2–6 min on 2 shared cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/budget.py --rounds 2 --ns 1 3 8

On the shipped digits UNet (``sk.digits.load_pretrained("digits")``, float32) with the shipped
classifier's target-class loss of the n-step DDIM estimate x̂0 = Φ_n(x_t) (t = 0.6 to 0):

1. for each n, the gradient engines backprop, checkpoint, symplectic and "budgeted" keeping the
   graphs of the last m steps (m = 0, 1, ⌈n/2⌉, n): wall time over backprop's (the median over
   ``--rounds`` rounds, after an untimed one, of the ratio within a round, and the
   ratio of the best times; the engines take turns in each round; no hooks while timing), the
   network calls, and the saved bytes of ``profile_gradient`` (one extra, hooked, run);
2. ``guided_sample`` (FreeDoM, SAG n = 3) with each guidance engine: "symplectic" without and
   with the reuse of the base step's ε (``reuse_eps``), and the default, "budgeted" (1 GiB of
   step graphs, backprop's path on this UNet), in turns: time per image against symplectic with
   reuse (the default of 0.2), and network calls.

Prints both tables and writes them as JSON (``--json``, default ``results/budget.json``,
git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import sagkit as sk
from sagkit.core.device import apply_cpu_threads
from sagkit.guidance import losses
from sagkit.lab.profiling import CountingModel, profile_gradient


def _engines(n: int) -> dict:
    """The engines timed at n by name: budgeted ones keep the last m steps' graphs."""
    engines = {name: name for name in ("backprop", "checkpoint", "symplectic")}
    for m in sorted({0, 1, math.ceil(n / 2), n}):
        engines[f"budgeted[m={m}]"] = sk.make_budgeted(keep_steps=m, name=f"budgeted[m={m}]")
    return engines


def gradient_rows(model, loss_fn, x, cond, *, ns, rounds: int, t: float = 0.6) -> list[dict]:
    rows = []
    for n in ns:
        ts = sk.time_grid(model.schedule, t, 0.0, n)
        engines = _engines(n)
        names = list(engines)
        times = {name: [] for name in names}
        for name in names:  # warm-up, untimed
            profile_gradient(
                model, loss_fn, x, ts, method=engines[name], cond=cond, track_saved=False
            )
        for _ in range(rounds):  # interleaved: a busy machine slows every engine alike
            for name in names:
                report = profile_gradient(
                    model, loss_fn, x, ts, method=engines[name], cond=cond, track_saved=False
                )
                times[name].append(report.wall_time_s)
        # the ratio to backprop within each round, then the median over rounds
        per_round = {
            name: [a / b for a, b in zip(times[name], times["backprop"], strict=True)]
            for name in names
        }
        for name in names:
            report = profile_gradient(model, loss_fn, x, ts, method=engines[name], cond=cond)
            rows.append(
                {
                    "n": n,
                    "engine": name,
                    "time_s": min(times[name]),
                    "time_vs_backprop": statistics.median(per_round[name]),
                    "ratio_range": [min(per_round[name]), max(per_round[name])],
                    "best_vs_best_backprop": min(times[name]) / min(times["backprop"]),
                    "saved_bytes": report.saved_bytes,
                    "model_calls": report.model_calls,
                }
            )
        print(f"n = {n}: done", flush=True)
    return rows


GUIDED_VARIANTS = (("symplectic", False), ("symplectic", True), ("budgeted", True))
"""(gradient engine, reuse_eps) of the guided runs; the second was the default of 0.2."""


def guided_rows(model, loss_fn, x_T, *, steps: int, rounds: int) -> list[dict]:
    cases = [("freedom", 1), ("sag", 3)]
    times, calls = {}, {}
    for r in range(rounds + 1):  # round 0 warms up, untimed
        for guidance, n in cases:
            for gradient, reuse in GUIDED_VARIANTS:
                counting = CountingModel(model)
                start = time.perf_counter()
                sk.guided_sample(
                    counting,
                    loss_fn,
                    x_T,
                    steps=steps,
                    guidance=guidance,
                    n=n,
                    gradient=gradient,
                    reuse_eps=reuse,
                    generator=torch.Generator().manual_seed(0),
                    progress=False,
                )
                key = (guidance, n, gradient, reuse)
                if r:
                    times.setdefault(key, []).append(time.perf_counter() - start)
                calls[key] = counting.calls
    rows = []
    for guidance, n in cases:
        old = (guidance, n, "symplectic", True)
        for gradient, reuse in GUIDED_VARIANTS:
            key = (guidance, n, gradient, reuse)
            per_round = [a / b for a, b in zip(times[key], times[old], strict=True)]
            rows.append(
                {
                    "guidance": guidance,
                    "n": n,
                    "gradient": gradient,
                    "reuse": reuse,
                    "time_per_image_s": min(times[key]) / x_T.shape[0],
                    "vs_symplectic_reuse": statistics.median(per_round),
                    "ratio_range": [min(per_round), max(per_round)],
                    "model_calls": calls[key],
                }
            )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 3, 8, 32])
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="guided sampling steps")
    parser.add_argument("--guided-rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("results/budget.json"))
    args = parser.parse_args(argv)

    model = sk.digits.load_pretrained("digits")
    classifier = sk.digits.load_classifier("digits")
    loss_fn = losses.target_class(classifier, 3)
    gen = torch.Generator().manual_seed(args.seed)
    size = model.unet.config.sample_size
    x = torch.randn(args.batch, 1, size, size, generator=gen)
    cond = model.cond_for([args.seed % 10] * args.batch)

    start = time.perf_counter()
    grads = gradient_rows(model, loss_fn, x, cond, ns=args.ns, rounds=args.rounds)
    guided = guided_rows(model, loss_fn, x, steps=args.steps, rounds=args.guided_rounds)
    total = time.perf_counter() - start

    print(
        f"\ngradient of L(Φ_n(x_t)), digits UNet float32, batch {args.batch}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'n':>3} {'engine':<16} {'time/backprop':>13} {'range':>11} {'best/best':>9} {'saved MB':>9} {'calls':>6}"
    )
    for r in grads:
        lo, hi = r["ratio_range"]
        print(
            f"{r['n']:>3} {r['engine']:<16} {r['time_vs_backprop']:>13.2f} {lo:>5.2f}-{hi:<5.2f} "
            f"{r['best_vs_best_backprop']:>9.2f} "
            f"{r['saved_bytes'] / 2**20:>9.2f} {r['model_calls']:>6}"
        )
    print(
        f"\nguided sampling, {args.steps} steps, window (0.3, 0.7), 2 repeats, batch {args.batch}"
    )
    print(
        f"{'guidance':<9} {'n':>2} {'gradient':<11} {'reuse':>6} {'s/image':>8} "
        f"{'vs sympl.+reuse':>15} {'range':>11} {'calls':>6}"
    )
    for r in guided:
        lo, hi = r["ratio_range"]
        print(
            f"{r['guidance']:<9} {r['n']:>2} {r['gradient']:<11} {r['reuse']!s:>6} "
            f"{r['time_per_image_s']:>8.3f} {r['vs_symplectic_reuse']:>15.2f} "
            f"{lo:>5.2f}-{hi:<5.2f} {r['model_calls']:>6}"
        )
    print(f"\ntotal {total:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["threads"] = torch.get_num_threads()
    args.json.write_text(
        json.dumps({"config": config, "gradients": grads, "guided": guided}, indent=1)
    )


if __name__ == "__main__":
    apply_cpu_threads()  # the shared-machine thread policy, as the sagkit command applies it
    main()
