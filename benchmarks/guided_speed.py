"""Guided-sampling time per image of this checkout against another one, in turns.

    git worktree add ../sagkit-before <revision>          # the code to compare against
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guided_speed.py --baseline ../sagkit-before

On the shipped digits UNet (float32, batch 8) with the shipped classifier's target-class loss,
``sk.guided_sample`` at each checkout's defaults (20 DDIM steps, window (0.3, 0.7), 2 repeats)
for FreeDoM and SAG (n = 3). Each round runs one fresh process per checkout, alternating which
goes first; a process imports sagkit from its checkout, runs every case once untimed, then
``--repeats`` timed runs of each, and reports its best. The speed-up of a round is the baseline's
time over this checkout's; the table gives the median over ``--rounds`` rounds and the range,
and the network calls of one run. A shared machine slows both checkouts of a round alike.
Writes the rows as JSON to ``--json`` (default ``results/guided_speed.json``, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CASES = (("freedom", 1), ("sag", 3))

WORKER = """
import json, sys, time
import torch
import sagkit as sk
from sagkit.lab.profiling import CountingModel

sk.apply_cpu_threads()
steps, batch, repeats = (int(a) for a in sys.argv[1:4])
model = sk.digits.load_pretrained("digits", device="cpu")
loss = sk.losses.target_class(sk.digits.load_classifier("digits", device="cpu"), 3)
x_T = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(0))
result = {"sagkit": sk.__file__}
for guidance, n in json.loads(sys.argv[4]):
    def run(net):
        return sk.guided_sample(net, loss, x_T, steps=steps, guidance=guidance, n=n,
                                generator=torch.Generator().manual_seed(1), progress=False)
    counting = CountingModel(model)
    run(counting)  # untimed: warms up, counts the calls
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(model)
        best = min(best, time.perf_counter() - start)
    result[f"{guidance} n={n}"] = {"seconds": best, "calls": counting.calls}
print(json.dumps(result))
"""


def run_worker(root: Path, *, steps: int, batch: int, repeats: int) -> dict:
    """One fresh process importing sagkit from ``root``; its best time per case."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    argv = [sys.executable, "-c", WORKER, str(steps), str(batch), str(repeats), json.dumps(CASES)]
    # cwd: `python -c` puts it first on sys.path, ahead of PYTHONPATH
    out = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if Path(result["sagkit"]).resolve().parents[1] != root.resolve():
        raise RuntimeError(f"{root} did not provide sagkit (got {result['sagkit']})")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another sagkit checkout")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per process")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=Path("results/guided_speed.json"))
    args = parser.parse_args(argv)

    roots = {"baseline": args.baseline.resolve(), "this": HERE}
    runs = {name: [] for name in roots}
    for r in range(args.rounds):
        order = list(roots) if r % 2 == 0 else list(reversed(roots))
        for name in order:
            runs[name].append(
                run_worker(roots[name], steps=args.steps, batch=args.batch, repeats=args.repeats)
            )
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows = []
    for guidance, n in CASES:
        case = f"{guidance} n={n}"
        speedups = [
            b[case]["seconds"] / t[case]["seconds"]
            for b, t in zip(runs["baseline"], runs["this"], strict=True)
        ]
        rows.append(
            {
                "case": case,
                "baseline_s_per_image": min(b[case]["seconds"] for b in runs["baseline"])
                / args.batch,
                "this_s_per_image": min(t[case]["seconds"] for t in runs["this"]) / args.batch,
                "speedup_median": statistics.median(speedups),
                "speedup_range": [min(speedups), max(speedups)],
                "baseline_calls": runs["baseline"][0][case]["calls"],
                "this_calls": runs["this"][0][case]["calls"],
            }
        )
    print(
        f"\nguided sampling, digits UNet float32, batch {args.batch}, {args.steps} steps, "
        f"window (0.3, 0.7), 2 repeats; {args.rounds} rounds of fresh processes in turns"
    )
    print(
        f"{'case':<12} {'baseline s/img':>14} {'this s/img':>11} {'speed-up':>9} "
        f"{'range':>11} {'calls':>11}"
    )
    for r in rows:
        lo, hi = r["speedup_range"]
        print(
            f"{r['case']:<12} {r['baseline_s_per_image']:>14.4f} {r['this_s_per_image']:>11.4f} "
            f"{r['speedup_median']:>9.2f} {lo:>5.2f}-{hi:<5.2f} "
            f"{r['baseline_calls']:>5} → {r['this_calls']:<4}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
