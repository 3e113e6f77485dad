"""The ``sagkit`` command line (also ``python -m sagkit``): one subcommand per task.

    sagkit --version

    sagkit bench [--model mixture|unet] [--dtype float32|float64] [--ns 8 16 64] [--solver ddim]
                 [--device auto|cpu|cuda] [--json]
    sagkit report [--fast] [--out DIR] [--sections NAME ...] [--device cpu|cuda]
    sagkit sample PROMPT --style IMAGE [--preset NAME] [--seed S] [--out DIR] [--overwrite]
                  [--sd PATH] [--clip PATH] [--tiny] [--video [--num-frames F]
                  [--decode-chunk-size C]] [every GuidanceConfig field: --guidance, --n,
                  --steps, --window LO HI, --repeats, --sampler, --gradient, ...]
    sagkit train digits|digits-unet|digits-classifier --out DIR [--steps N] [--evaluate]

A subcommand is a function ``add_<name>(subparsers)`` that adds its parser and sets
``func``, a callable taking the parsed arguments and returning an exit status; list it in
:data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.device import apply_cpu_threads
from ..version import __version__

__all__ = [
    "main",
    "build_parser",
    "SUBCOMMANDS",
    "positive_int",
    "folder_path",
    "one_line_errors",
    "run_command",
    "add_guidance_options",
    "guidance_options",
]


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer ≥ 1 (so that ``--steps -1`` is a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def folder_path(text: str) -> Path:
    """An ``argparse`` type: a folder path, not empty (``--out ""`` would be the current
    folder, which nobody means)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a folder, got an empty path {text!r}")
    return Path(text)


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` and its subparsers report usage errors in one line (exit 2)."""
    parser.__class__ = _OneLineParser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                one_line_errors(sub)
    return parser


def run_command(prog: str, fn: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run a command line's work: its exit status, 0 on success; an error is one line on
    stderr, exit 2 for a bad argument value (``ValueError``, ``TypeError``) and 1 for any
    other failure. ``debug`` lets the exception through, with its traceback."""
    if debug:
        return int(fn() or 0)
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as error:
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the command line reports every failure
        print(f"{prog}: failed: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


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
    p.add_argument(
        "--out", type=folder_path, default="report", help="output folder (default: report)"
    )
    p.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS), default=None, help="default: all"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    p.set_defaults(func=_report)


def add_guidance_options(parser: argparse.ArgumentParser) -> None:
    """One option per field of :class:`~sagkit.guidance.config.GuidanceConfig`, read as its
    field metadata says (``--estimate-grid`` for ``estimate_grid``; ``--no-reuse-eps`` for a
    field that defaults to true). Every default is ``None``: a field not given keeps the
    preset's or the default's value."""
    from ..guidance.config import GuidanceConfig

    group = parser.add_argument_group("guidance", "the fields of sagkit.GuidanceConfig")
    types = {"count": positive_int, float: float, str: str}
    for f in dataclasses.fields(GuidanceConfig):
        cli, flag = f.metadata["cli"], "--" + f.name.replace("_", "-")
        if cli.get("type") is bool:
            group.add_argument(
                f"--no-{f.name.replace('_', '-')}",
                dest=f.name,
                action="store_const",
                const=False,
                default=None,
                help=f"do not {f.metadata['help']}",
            )
            continue
        kwargs = {"help": f"{f.metadata['help']} (default {f.default})", "default": None}
        if "type" in cli:
            kwargs["type"] = types[cli["type"]]
        if "choices" in cli:
            kwargs["choices"] = list(cli["choices"])
        if "nargs" in cli:
            kwargs["nargs"] = cli["nargs"]
        group.add_argument(flag, **kwargs)


def guidance_options(args) -> dict:
    """The guidance fields given on the command line (:func:`add_guidance_options`)."""
    from ..guidance.config import OPTIONS

    return {name: getattr(args, name) for name in OPTIONS if getattr(args, name) is not None}


def _sample(args) -> int:
    from .sample import sample

    paths = sample(
        args.prompt,
        style=args.style,
        out=args.out,
        preset=args.preset,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        seed=args.seed,
        sd=args.sd,
        clip=args.clip,
        tiny=args.tiny,
        video=args.video,
        num_frames=args.num_frames,
        decode_chunk_size=args.decode_chunk_size,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        **guidance_options(args),
    )
    for path in paths:
        print(f"wrote {path} and {path.with_suffix('.json').name}")
    return 0


def add_sample(subparsers) -> None:
    from ..guidance.presets import PRESETS
    from ..sd.video import DECODE_CHUNK_SIZE
    from .sample import CLIP_PATH_VARIABLE, FPS, SD_PATH_VARIABLE, VIDEO_PATH_VARIABLE

    p = subparsers.add_parser(
        "sample",
        help="guided Stable Diffusion (or, with --video, AnimateDiff or TextToVideoSD) towards "
        "a style image, from local weights",
        description="Sample a Stable Diffusion pipeline with training-free guidance by CLIP's "
        "style loss against a reference image (SAG's style task); with --video, a video "
        "pipeline (AnimateDiff, TextToVideoSD) by the style loss averaged over the frames, "
        f"written as GIF at {FPS} frames per second. The pipeline and the CLIP vision model "
        f"are read from local folders (--sd/${SD_PATH_VARIABLE}, or ${VIDEO_PATH_VARIABLE} "
        f"with --video; --clip/${CLIP_PATH_VARIABLE}), never downloaded. Every guidance option "
        "defaults to the preset's value, else sagkit's (with the pipeline's scheduler and "
        "guidance scale, w = 7.5 for Stable Diffusion).",
    )
    p.add_argument("prompt")
    p.add_argument("--style", default=None, help="the style reference image file")
    p.add_argument("--preset", choices=list(PRESETS), default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-images", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0, help="in [0, 2**64) (default: 0)")
    p.add_argument(
        "--out",
        type=folder_path,
        default="samples",
        help="output folder (default: samples); each image NAME.png has a NAME.json beside it "
        "recording how to reproduce it",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing files of the same names"
    )
    p.add_argument(
        "--sd",
        default=None,
        help=f"pipeline folder (default ${SD_PATH_VARIABLE}, ${VIDEO_PATH_VARIABLE} with --video)",
    )
    p.add_argument("--clip", default=None, help=f"CLIP folder (default ${CLIP_PATH_VARIABLE})")
    p.add_argument("--tiny", action="store_true", help="tiny random components (a dry run)")
    p.add_argument(
        "--video", action="store_true", help="a video pipeline; each sample is an animated GIF"
    )
    p.add_argument(
        "--num-frames", type=positive_int, default=None, help="frames (default the pipeline's)"
    )
    p.add_argument(
        "--decode-chunk-size",
        type=positive_int,
        default=None,
        help=f"frames per VAE decoder call (default {DECODE_CHUNK_SIZE})",
    )
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_guidance_options(p)
    p.set_defaults(func=_sample)


def _train(args) -> int:
    from ..digits.evaluation import evaluate_digits
    from ..digits.models import load_classifier, load_pretrained
    from ..digits.train import train_classifier, train_unet

    steps = {} if args.steps is None else {"steps": args.steps}
    steps["overwrite_shipped"] = args.overwrite_shipped
    print(f"torch threads: {torch.get_num_threads()}")
    if args.target in ("digits", "digits-classifier"):
        start = time.perf_counter()
        _, accuracy = train_classifier(args.out, seed=args.seed, **steps)
        print(f"classifier: {time.perf_counter() - start:.0f} s, held-out accuracy {accuracy:.4f}")
    if args.target in ("digits", "digits-unet"):
        start = time.perf_counter()
        train_unet(args.out, seed=args.seed, **steps)
        print(f"unet: {time.perf_counter() - start:.0f} s")
    if args.evaluate:
        model = load_pretrained("digits", path=args.out / "digits-unet")
        classifier = load_classifier("digits", path=args.out / "digits-classifier")
        results = evaluate_digits(model, classifier, seed=args.seed)
        heldout = results.pop("heldout")
        print(
            f"held-out data: classifier accuracy {heldout['accuracy']:.4f}, "
            f"feature FD floor (training vs held-out) {heldout['fd']:.3f}"
        )
        for key, value in results.items():
            print(
                f"samples {key}: classifier accuracy {value['accuracy']:.4f}, "
                f"feature FD to held-out {value['fd']:.3f}"
            )
    return 0


def add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the shipped digits models",
        description="Train the digits UNet and classifier (sagkit.digits.train), seeded; "
        "OMP_NUM_THREADS chooses the CPU threads.",
    )
    p.add_argument("target", choices=["digits", "digits-unet", "digits-classifier"])
    p.add_argument("--steps", type=positive_int, default=None, help="optimiser steps of each model")
    p.add_argument("--out", type=folder_path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="then sample and evaluate (needs both models in --out)",
    )
    p.add_argument(
        "--overwrite-shipped",
        action="store_true",
        help="allow --out to be the shipped weights' folder",
    )
    p.set_defaults(func=_train)


SUBCOMMANDS = [add_bench, add_report, add_sample, add_train]


def build_parser() -> argparse.ArgumentParser:
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
    traceback only with ``--debug``. A subcommand runs under the shared-machine thread policy
    (:func:`sagkit.core.device.apply_cpu_threads`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2

    def command():
        apply_cpu_threads()
        return args.func(args)

    return run_command("sagkit", command, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
