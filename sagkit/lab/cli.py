"""The ``sagkit`` command line (also ``python -m sagkit``): one subcommand per task.

    sagkit --version

    sagkit bench [--model mixture|unet] [--dtype float32|float64] [--ns 8 16 64] [--solver ddim]
                 [--device auto|cpu|cuda] [--json]
    sagkit report [--fast] [--out DIR] [--sections NAME ...] [--device cpu|cuda]

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


SUBCOMMANDS = [add_bench, add_report]


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
