"""The GPU check in one command: the CUDA tests, the engine benchmark, guided-sampling
throughput and memory, the Stable-Diffusion-sized memory benchmark and ``torch.compile``.

    make gpu-check                                        # on a CUDA machine, ≈ 5–8 min on an H100
    .venv/bin/python benchmarks/gpu_check.py --dry-run    # the same wiring on the CPU, tiny sizes

Parts, each recorded even when another fails:

1. ``tests``: ``pytest -m gpu tests`` (the tests marked ``gpu``; collected only in a dry run);
2. ``bench``: ``sagkit bench --device cuda`` (:func:`sagkit.lab.bench.run_benchmark`): every
   engine's error, time and memory against n on the digits UNet;
3. ``guided``: ``sk.guided_sample`` on the shipped digits UNet in float32 and bfloat16 weights
   (the state stays float32), FreeDoM and SAG with n = 1, 3, 8 at the default engine, 50 steps,
   batch 64: images per second (the median of 2 rounds, cases in turns, after a warm-up) and the
   CUDA peak memory of a run;
4. ``sd_memory``: ``benchmarks/sd_memory.py`` (SD 1.5's UNet, random weights, 64×64 latents):
   symplectic against backprop, peak memory and time for n = 1, 2, 4;
5. ``compile``: ``benchmarks/compile_speed.py`` on CUDA (``mode="reduce-overhead"``), cold
   (skipped in a dry run: a cold CPU compile alone takes minutes).

Writes ``gpu_check.json`` (every row) and ``gpu_check.md`` (the tables) to ``--out`` (default
``results/gpu_check``, git-ignored), and prints the markdown. Without CUDA it refuses to run
unless ``--dry-run``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import sagkit as sk
from sagkit.core.device import apply_cpu_threads
from sagkit.lab.bench import bench_table, run_benchmark

ROOT = Path(__file__).resolve().parents[1]
GUIDED_CASES = (("freedom", 1), ("sag", 1), ("sag", 3), ("sag", 8))


def sizes(dry_run: bool) -> dict:
    """The workload of each part: full on a GPU, tiny for the CPU dry run."""
    if dry_run:
        sd = ["--channels", "32", "32", "64", "64", "--latent", "8", "--ns", "1", "--rounds", "1"]
        return {
            "bench_ns": [2],
            "bench_methods": ["backprop", "symplectic"],
            "steps": 4,
            "batch": 2,
            "rounds": 1,
            "sd_args": sd,
        }
    return {
        "bench_ns": [8, 16, 64],
        "bench_methods": None,
        "steps": 50,
        "batch": 64,
        "rounds": 2,
        "sd_args": ["--ns", "1", "2", "4", "--rounds", "1"],
    }


def run_tests(dry_run: bool) -> dict:
    """``pytest -m gpu tests``: its exit status and closing line."""
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"]
    if dry_run:
        argv.append("--collect-only")
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"returncode": done.returncode, "summary": lines[-1] if lines else ""}


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def guided_throughput(device: torch.device, size: dict) -> list[dict]:
    """Images per second and CUDA peak memory of guided sampling, per weight dtype and case."""
    loss = sk.losses.target_class(sk.digits.load_classifier("digits", device=device), 3)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(size["batch"], 1, 16, 16, generator=gen).to(device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = sk.digits.load_pretrained("digits", device=device, dtype=dtype)

        def run(guidance, n, model=model):
            return sk.guided_sample(
                model, loss, x_T, steps=size["steps"], guidance=guidance, n=n, progress=False,
                generator=torch.Generator(device).manual_seed(1),
            )  # fmt: skip

        times = {case: [] for case in GUIDED_CASES}
        peaks = {}
        for case in GUIDED_CASES:  # warm-up, and the peak memory of one run
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            run(*case)
            _synchronise(device)
            peaks[case] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        for _ in range(size["rounds"]):  # the cases in turns
            for case in GUIDED_CASES:
                start = time.perf_counter()
                run(*case)
                _synchronise(device)
                times[case].append(time.perf_counter() - start)
        for (guidance, n), values in times.items():
            seconds = statistics.median(values)
            rows.append(
                {
                    "weights": str(dtype).removeprefix("torch."),
                    "guidance": guidance,
                    "n": n,
                    "steps": size["steps"],
                    "batch": size["batch"],
                    "seconds": seconds,
                    "images_per_s": size["batch"] / seconds,
                    "cuda_peak_bytes": peaks[(guidance, n)],
                }
            )
    return rows


def sd_memory(out: Path, size: dict) -> list[dict]:
    """``benchmarks/sd_memory.py`` in its own processes; its rows."""
    path = out / "sd_memory.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "sd_memory.py"), *size["sd_args"]]
    subprocess.run([*argv, "--json", str(path)], cwd=ROOT, check=True, capture_output=True)
    return json.loads(path.read_text())["rows"]


def compile_row(device: torch.device) -> dict:
    """``benchmarks/compile_speed.py`` on this device, cold, in its own process."""
    path = Path(ROOT / "results" / "compile_speed_gpu.json")
    argv = [sys.executable, str(ROOT / "benchmarks" / "compile_speed.py")]
    argv += ["--device", device.type, "--rounds", "2", "--json", str(path)]
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
    return json.loads(path.read_text())


def _gib(nbytes) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def markdown(report: dict) -> str:
    """The tables of the report, as markdown."""
    lines = [f"# GPU check: {report['device_name']}", ""]
    lines += [f"torch {report['torch']}, sagkit {report['sagkit']}, dry run: {report['dry_run']}"]
    tests = report["parts"].get("tests", {})
    lines += ["", f"CUDA tests: `{tests.get('summary', tests.get('error', ''))}`", ""]
    guided = report["parts"].get("guided")
    if isinstance(guided, list):
        lines += ["## Guided sampling (digits UNet, default engine)", ""]
        lines += ["| weights | method | n | images/s | CUDA peak MiB |", "|---|---|---|---|---|"]
        for r in guided:
            peak = "—" if r["cuda_peak_bytes"] is None else f"{r['cuda_peak_bytes'] / 2**20:.0f}"
            lines.append(
                f"| {r['weights']} | {r['guidance']} | {r['n']} | {r['images_per_s']:.1f} | {peak} |"
            )
    sd = report["parts"].get("sd_memory")
    if isinstance(sd, list):
        lines += ["", "## Stable-Diffusion-sized guidance gradient (random SD 1.5 UNet)", ""]
        lines += [
            "| n | CUDA peak backprop | CUDA peak symplectic | peak RSS backprop | "
            "peak RSS symplectic | time symplectic/backprop |",
            "|---|---|---|---|---|---|",
        ]
        for r in sd:
            cells = [
                _gib(r[f"{m}_{key}"])
                for key in ("cuda_peak_bytes", "peak_rss_bytes")
                for m in ("backprop", "symplectic")
            ]
            lines.append(f"| {r['n']} | {' | '.join(cells)} | {r['time_ratio']:.2f} |")
    compiled = report["parts"].get("compile")
    if isinstance(compiled, dict) and "compiled_over_eager" in compiled:
        lines += ["", "## torch.compile (FreeDoM, 50 steps)", ""]
        lines.append(
            f"compile run {compiled['compile_run_s']:.1f} s, eager {compiled['eager_run_s']:.3f} s, "
            f"compiled {compiled['compiled_run_s']:.3f} s (× {compiled['compiled_over_eager']:.2f}), "
            f"break-even after {compiled['break_even_runs']:.0f} runs"
        )
    bench = report["parts"].get("bench")
    if isinstance(bench, list):
        lines += ["", "## Gradient engines (sagkit bench)", "", "```", bench_table(bench), "```"]
    failed = {
        k: v["error"] for k, v in report["parts"].items() if isinstance(v, dict) and "error" in v
    }
    if failed:
        lines += ["", "## Failed parts", ""] + [
            f"- {k}: {v.splitlines()[-1]}" for k, v in failed.items()
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the wiring only")
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu-check: no CUDA device (CUDA_VISIBLE_DEVICES?); --dry-run runs it on the CPU")
        return 2
    device = torch.device("cuda" if cuda and not args.dry_run else "cpu")
    size = sizes(args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {
        "tests": lambda: run_tests(args.dry_run),
        "bench": lambda: run_benchmark(
            model="unet",
            device=device.type,
            ns=size["bench_ns"],
            methods=size["bench_methods"],
            progress=False,
        ),  # fmt: skip
        "guided": lambda: guided_throughput(device, size),
        "sd_memory": lambda: sd_memory(args.out, size),
    }
    if not args.dry_run:
        parts["compile"] = lambda: compile_row(device)
    report = {
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)",
        "torch": torch.__version__,
        "sagkit": sk.__version__,
        "dry_run": args.dry_run,
        "parts": {},
    }
    for name, part in parts.items():
        start = time.perf_counter()
        try:
            report["parts"][name] = part()
        except Exception:  # noqa: BLE001 - a failed part is recorded, the others still run
            report["parts"][name] = {"error": traceback.format_exc()}
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    failed = [k for k, v in report["parts"].items() if isinstance(v, dict) and "error" in v]
    tests = report["parts"].get("tests", {})
    return 1 if failed or tests.get("returncode", 0) not in (0, 5) else 0


if __name__ == "__main__":
    apply_cpu_threads()  # the shared-machine thread policy, as the sagkit command applies it
    sys.exit(main())
