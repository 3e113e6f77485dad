"""The ``sagkit`` command line (also ``python -m sagkit``): one subcommand per task.

    sagkit --version

    sagkit bench [--model mixture|unet] [--dtype float32|float64] [--ns 8 16 64] [--solver ddim]
                 [--device auto|cpu|cuda] [--json]
    sagkit report [--fast] [--out DIR] [--sections NAME ...] [--device cpu|cuda]
    sagkit sample PROMPT --style IMAGE [--guidance sag|freedom|dps|backward|none]
                  [--preset NAME] [--n N] [--steps N] [--seed S] [--out DIR]
                  [--sd PATH] [--clip PATH] [--tiny]

A subcommand is a function ``add_<name>(subparsers)`` that adds its parser and sets
``func``, a callable taking the parsed arguments and returning an exit status; list it in
:data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..core.checks import one_line_errors, positive_int, run_command

__all__ = ["main", "build_parser", "SUBCOMMANDS"]


def _bench(args) -> int:
    from .bench import bench_table, run_benchmark

    rows = run_benchmark(
        model=args.model,
        dtype=args.dtype,
        ns=args.ns,
        solver=args.solver,
        device=args.device,
        methods=args.methods,
        batch=args.batch,
        repeats=args.repeats,
        progress=not args.no_progress,
    )
    print(json.dumps(rows, indent=2) if args.json else bench_table(rows))
    return 0


def add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="accuracy, time and memory of every gradient method against n",
        description="Benchmark the gradient engines: relative error to the exact discrete "
        "gradient (float64 backprop) and to finite differences, time relative to backprop, "
        "bytes saved for backward and network calls, for each method and n.",
    )
    p.add_argument("--model", choices=("mixture", "unet"), default="unet")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--ns", type=positive_int, nargs="+", default=[8, 16, 64], help="numbers of steps"
    )
    p.add_argument("--solver", default="ddim", help="a name in sagkit.SOLVERS")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered one")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--repeats", type=positive_int, default=3, help="timing runs; the best is kept")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_bench)


def _report(args) -> int:
    from .report import write_report

    path = write_report(
        out_dir=args.out, fast=args.fast, sections=args.sections, device=args.device
    )
    print(f"wrote {path}")
    return 0


def add_report(subparsers) -> None:
    from .report import SECTIONS

    p = subparsers.add_parser(
        "report",
        help="run the headline experiments and write PNG figures and report.md",
        description="Run the headline experiments (misalignment, gradient error per method, "
        "memory against n, the guidance table, the AdjointDEIS orders) and write PNG figures and "
        "a report.md that embeds them.",
    )
    p.add_argument("--fast", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    p.add_argument("--out", default="report", help="output folder (default: report)")
    p.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS), default=None, help="default: all"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    p.set_defaults(func=_report)


def _sample(args) -> int:
    from .sample import sample

    paths = sample(
        args.prompt,
        style=args.style,
        out=args.out,
        guidance=args.guidance,
        preset=args.preset,
        n=args.n,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        scale=args.scale,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        seed=args.seed,
        sd=args.sd,
        clip=args.clip,
        tiny=args.tiny,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
    )
    for path in paths:
        print(f"wrote {path}")
    return 0


def add_sample(subparsers) -> None:
    from ..guidance.presets import PRESETS
    from ..guidance.sampler import GUIDANCE
    from .sample import CLIP_PATH_VARIABLE, SD_PATH_VARIABLE

    p = subparsers.add_parser(
        "sample",
        help="guided Stable Diffusion towards a style image, from local weights",
        description="Sample a Stable Diffusion pipeline with training-free guidance by CLIP's "
        "style loss against a reference image (SAG's style task). The pipeline and the CLIP "
        f"vision model are read from local folders (--sd/${SD_PATH_VARIABLE}, "
        f"--clip/${CLIP_PATH_VARIABLE}), never downloaded.",
    )
    p.add_argument("prompt")
    p.add_argument("--style", default=None, help="the style reference image file")
    p.add_argument("--guidance", choices=list(GUIDANCE), default=None, help="default: sag")
    p.add_argument("--preset", choices=list(PRESETS), default=None)
    p.add_argument("--n", type=positive_int, default=None, help="SAG's estimate steps")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default 50)")
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--scale", type=float, default=None, help="guidance strength")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-images", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--sd", default=None, help=f"pipeline folder (default ${SD_PATH_VARIABLE})")
    p.add_argument("--clip", default=None, help=f"CLIP folder (default ${CLIP_PATH_VARIABLE})")
    p.add_argument("--tiny", action="store_true", help="tiny random components (a dry run)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_sample)


SUBCOMMANDS = [add_bench, add_report, add_sample]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="sagkit", description="Accurate gradients through diffusion samplers."
    )
    parser.add_argument("--version", action="version", version=f"sagkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return one_line_errors(parser)


def main(argv=None) -> int:
    """Entry point of the ``sagkit`` script; returns the exit status.

    Errors are one line on stderr: exit 2 for usage (a bad argument), 1 for a failure; the
    traceback only with ``--debug``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return run_command("sagkit", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
