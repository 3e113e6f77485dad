"""Does ``torch.compile`` of the UNet pay for itself in guided sampling? Eager against compiled,
in turns in one process, compile time counted.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compile_speed.py              # 3–5 min on a CPU
    .venv/bin/python benchmarks/compile_speed.py --device cuda                  # mode reduce-overhead

On the shipped digits UNet (float32, batch 8): FreeDoM with 50 DDIM steps (window (0.3, 0.7),
2 repeats), the network called with and without a graph. The compiled model is
``torch.compile(unet)`` (inductor; ``mode="reduce-overhead"`` on CUDA, its CUDA graphs) around
the same weights (loaded twice). The compile is cold (inductor's caches in a new temporary
folder, as on a fresh machine) unless ``--warm-cache``. The first compiled run includes the compilation; then ``--rounds`` rounds
time one eager and one compiled run in turns. Reported: the compile run's seconds, the median
per-run seconds of each and their ratio, and the break-even: how many runs the compile time
takes to pay back, (compile run − compiled run) / (eager run − compiled run). Writes the row
as JSON to ``--json`` (default ``results/compile_speed.json``, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# A cold compile, as on a fresh machine: inductor's caches in a new folder, unless asked not to
# (read when torch first compiles, so set before anything is compiled).
if "--warm-cache" not in sys.argv:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sagkit-inductor-")

import torch  # noqa: E402

import sagkit as sk  # noqa: E402
from sagkit.core.device import apply_cpu_threads


def timed(fn, device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(*, device: str = "cpu", steps: int = 50, batch: int = 8, rounds: int = 3) -> dict:
    """The row of the module docstring: compile run, eager and compiled runs, break-even."""
    device = torch.device(device)
    model = sk.digits.load_pretrained("digits", device=device)
    loss = sk.losses.target_class(sk.digits.load_classifier("digits", device=device), 3)
    x_T = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
    compiled = sk.digits.load_pretrained("digits", device=device)  # the same weights, compiled
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    compiled.unet = torch.compile(compiled.unet, mode=mode)

    def run(net):
        return lambda: sk.guided_sample(
            net, loss, x_T, steps=steps, guidance="freedom", progress=False,
            generator=torch.Generator(device).manual_seed(1),
        )  # fmt: skip

    timed(run(model), device)  # eager warm-up
    first = timed(run(compiled), device)  # compiles (forward and backward graphs)
    eager, fast = [], []
    for _ in range(rounds):
        eager.append(timed(run(model), device))
        fast.append(timed(run(compiled), device))
    e, c = statistics.median(eager), statistics.median(fast)
    gain = e - c
    return {
        "device": device.type,
        "mode": mode,
        "steps": steps,
        "batch": batch,
        "compile_run_s": first,
        "eager_run_s": e,
        "compiled_run_s": c,
        "compiled_over_eager": c / e,
        "break_even_runs": (first - c) / gain if gain > 0 else math.inf,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("results/compile_speed.json"))
    parser.add_argument(
        "--warm-cache", action="store_true", help="keep inductor's cache (default: a cold compile)"
    )
    args = parser.parse_args(argv)
    row = measure(device=args.device, steps=args.steps, batch=args.batch, rounds=args.rounds)
    row["cache"] = "warm" if args.warm_cache else "cold"
    print(
        f"FreeDoM, {row['steps']} steps, batch {row['batch']}, {row['device']} "
        f"({row['threads']} threads), torch.compile mode {row['mode']}:\n"
        f"  first compiled run (compiles, {row['cache']} cache) {row['compile_run_s']:.1f} s\n"
        f"  eager run {row['eager_run_s']:.3f} s, compiled run {row['compiled_run_s']:.3f} s "
        f"(× {row['compiled_over_eager']:.2f})\n"
        f"  break-even after {row['break_even_runs']:.0f} runs"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    apply_cpu_threads()  # the shared-machine thread policy, as the sagkit command applies it
    main()
