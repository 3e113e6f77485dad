"""Memory and time of the guidance gradient at Stable Diffusion's, AnimateDiff's and Stable
Diffusion 3's scale, without their weights.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_memory.py                    # SD 1.5 size
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_memory.py --ns 1 2 --rounds 1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_memory.py --cfg-scale 7.5    # CFG: batch 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_memory.py --channels 32 32 64 64 --latent 16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_memory.py --model animatediff --ns 1 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_memory.py --model sd3 --rounds 1 \
        --json benchmarks/results/sd3_memory.json

``--model sd15`` (the default): a ``UNet2DConditionModel`` with Stable Diffusion 1.5's
configuration (block widths 320, 640, 1280, 1280; cross-attention on 768-wide text embeddings
of 77 tokens; about 860M parameters) on one 64×64 latent (512×512 images). ``--model
animatediff``: the ``UNetMotionModel`` diffusers builds from that UNet and a ``MotionAdapter``
of its default configuration (motion modules in every block; about 1.31G parameters), as
AnimateDiff's pipeline does, on one video of 8 frames of 32×32 latents (``--frames``,
``--latent``: 256×256 frames), the text embedding repeated over the frames
(:class:`sagkit.sd.video.VideoTextModel`). ``--model sd3``: an ``SD3Transformer2DModel`` with
Stable Diffusion 3 medium's configuration (24 joint blocks of 24 heads of 64, text width 4096,
pooled width 2048, patch 2, 16 latent channels; about 2.03G parameters) on one 32×32 latent
(256×256 images, 256 image tokens; ``--latent``), the text 77 CLIP and ``--t5-tokens`` T5
tokens (default 77; SD3's pipeline pads T5 to 256) and the pooled embedding packed into one
condition (:class:`sagkit.sd.flow.SD3Model`, the velocity frame of the rectified flow with
SD3's shift 3). Random weights, float32, on CUDA when present, else on the CPU. For n = 1, 2, 4 (``--ns``) it computes the guidance gradient g = ∂L(x̂0)/∂z_t of
SAG's n-step DDIM estimate from t = 0.6 to 0 (batch 1; for SD3 the Euler steps of the flow) by each engine (``--methods``):
backpropagation, the symplectic adjoint, and sagkit's default "budgeted" engine (backprop
through the last steps while 1 GiB holds their graphs, :data:`sagkit.gradients.engines.
DEFAULT_BUDGET_BYTES`; the symplectic adjoint for the rest). The UNet is called on the text
condition alone; ``--cfg-scale w`` runs classifier-free guidance inside every step instead, as
SAG's pipeline does, both branches in one batch of 2 (twice the activations). The loss is L =
‖x̂0 − y‖² on the latent: the VAE decoder and a CLIP model would add the same memory to every
engine, so they are left out to show the UNet's part alone.

Each (method, n) runs in a fresh process (``--worker``), so its peak resident memory (VmHWM,
which includes the weights) is its own, and the CUDA peak when on a GPU. The rounds take the
methods in turns (``--rounds``, interleaved, the order rotating), and the time ratio of an
engine to backprop is the median over rounds of the ratio within a round. Every finished run
is printed to stderr as a JSON line as it ends, with the memory the machine had available and
its load when it started; the table is printed at the end and written as JSON (``--json``,
default ``results/sd_memory.json``, git-ignored), with the peaks of every run extrapolated to
another video size by :func:`extrapolate_peak` (``--extrapolate F LATENT``; for AnimateDiff
by default 16 frames of 64×64 latents, 512×512 frames).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from sagkit.core.device import apply_cpu_threads

MODELS = ("sd15", "animatediff", "sd3")
METHODS = ("symplectic", "backprop", "budgeted")
SD15 = dict(
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
)
SD3_MEDIUM = dict(
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
"""Stable Diffusion 3 medium's transformer (its diffusers ``transformer/config.json``)."""
CLIP_TOKENS = 77
DEFAULT_LATENT = {"sd15": 64, "animatediff": 32, "sd3": 32}
VIDEO_TARGET = (16, 64)  # the video --extrapolate defaults to: 16 frames of 64×64 latents


def build_unet(model: str, channels, *, latent: int, seed: int = 0):
    """SD 1.5's UNet (``channels`` = its block widths), random weights, float32; for
    ``model="animatediff"`` the ``UNetMotionModel`` of that UNet and a default ``MotionAdapter``
    (its widths ``channels``), built from their configurations alone; for ``model="sd3"``
    SD 3 medium's transformer (``channels`` unused)."""
    from diffusers import (
        MotionAdapter,
        SD3Transformer2DModel,
        UNet2DConditionModel,
        UNetMotionModel,
    )

    if model == "sd3":
        torch.manual_seed(seed)
        return SD3Transformer2DModel(**SD3_MEDIUM, sample_size=latent).eval()

    config = {**SD15, "block_out_channels": tuple(channels), "sample_size": latent}
    if model == "sd15":
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config).eval()
    with torch.device("meta"):  # the two configurations, without allocating their weights
        unet = UNet2DConditionModel(**config)
        adapter = MotionAdapter(block_out_channels=tuple(channels))
    torch.manual_seed(seed)
    return UNetMotionModel.from_unet2d(unet, adapter, load_weights=False).eval()


def latent_shape(args) -> tuple[int, ...]:
    """x_t's shape: (1, 4, latent, latent), (1, 4, frames, latent, latent) for a video, or
    (1, 16, latent, latent) for SD3."""
    side = (args.latent, args.latent)
    if args.model == "sd3":
        return (1, SD3_MEDIUM["in_channels"], *side)
    return (1, 4, *side) if args.model == "sd15" else (1, 4, args.frames, *side)


def sd3_model(transformer, args, gen: torch.Generator, device):
    """SD3's transformer as a model (:class:`sagkit.sd.flow.SD3Model`) and a random text
    condition: 77 + ``args.t5_tokens`` tokens of width 4096 and a pooled embedding, packed."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sagkit.sd.flow import SD3Model, pack_text

    tokens = CLIP_TOKENS + args.t5_tokens
    text = torch.randn(1, tokens, SD3_MEDIUM["joint_attention_dim"], generator=gen)
    pooled = torch.randn(1, SD3_MEDIUM["pooled_projection_dim"], generator=gen)
    cond = pack_text(text, pooled).to(device)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return SD3Model(transformer, scheduler, torch.zeros_like(cond)), cond


def worker(args) -> dict:
    """One gradient in this process: its time and peak memory, as a dict."""
    from diffusers import DDIMScheduler

    import sagkit as sk
    from sagkit.core.device import resolve_device
    from sagkit.lab.profiling import profile

    device = resolve_device()
    unet = build_unet(args.model, args.channels, latent=args.latent)
    unet = unet.to(device).requires_grad_(False)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)
    gen = torch.Generator().manual_seed(1)
    if args.model == "sd3":
        model, text = sd3_model(unet, args, gen, device)
    else:
        text = torch.randn(1, 77, SD15["cross_attention_dim"], generator=gen).to(device)
        if args.model == "sd15":
            from sagkit.sd.latent import TextConditionedModel as Wrapper
        else:  # the text embedding repeated over the frames
            from sagkit.sd.video import VideoTextModel as Wrapper
        model = Wrapper(unet, scheduler, torch.zeros_like(text))
    if args.cfg_scale is not None:
        model = sk.ClassifierFreeGuidance(model, model.null_cond, args.cfg_scale)
    z = torch.randn(latent_shape(args), generator=gen).to(device)
    target = torch.randn(z.shape, generator=gen).to(device)
    ts = sk.time_grid(model.schedule, 0.6, 0.0, args.n)

    def loss(x0):
        return (x0 - target).pow(2).flatten(1).sum(1)

    rss_before = _vmrss_bytes()
    report = profile(
        sk.loss_grad, model, loss, z, ts, method=args.method, cond=text, track_saved=False
    )
    return {
        "model": args.model,
        "network": type(unet).__name__,
        "method": args.method,
        "n": args.n,
        "cfg_scale": args.cfg_scale,
        "latent_shape": list(z.shape),
        "text_tokens": text.shape[1],
        "device": str(device),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "time_s": report.wall_time_s,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": report.vmhwm_bytes,
        "cuda_peak_bytes": report.cuda_peak_bytes,
    }


def _vmrss_bytes() -> int | None:
    """The process's resident memory now (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(x.split()[1]) * 1024 for x in fh if x.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def _machine() -> dict:
    """The memory available on the machine (Linux) and its 1-minute load, now."""
    available = None
    try:
        with open("/proc/meminfo") as fh:
            available = next(int(x.split()[1]) * 1024 for x in fh if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"available_bytes": available, "load_1min": load}


def run(args) -> list[dict]:
    """Every (method, n) in a fresh process, ``rounds`` times, the methods taking turns."""
    runs = []
    common = ["--model", args.model, "--channels", *map(str, args.channels)]
    common += ["--latent", str(args.latent), "--frames", str(args.frames)]
    common += ["--t5-tokens", str(args.t5_tokens)]
    if args.cfg_scale is not None:
        common += ["--cfg-scale", str(args.cfg_scale)]
    methods = list(args.methods)
    for r in range(args.rounds):
        for n in args.ns:
            shift = (r + n) % len(methods)
            for method in methods[shift:] + methods[:shift]:
                cmd = [sys.executable, __file__, "--worker", "--method", method, "--n", str(n)]
                machine = _machine()
                out = subprocess.run(cmd + common, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                runs.append({**row, "round": r, "machine_before": machine})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    return runs


def table(runs: list[dict]) -> list[dict]:
    """Per n: each method's peak memory (the largest over rounds), its median time, and its
    time ratio to backprop (``time_ratio``: symplectic's; ``budgeted_time_ratio``)."""
    rows = []
    for n in sorted({r["n"] for r in runs}):
        at = {m: [r for r in runs if r["n"] == n and r["method"] == m] for m in METHODS}
        row = {"n": n}
        for m in METHODS:
            row[f"{m}_time_s"] = statistics.median(r["time_s"] for r in at[m]) if at[m] else None
            for key in ("peak_rss_bytes", "rss_before_bytes", "cuda_peak_bytes"):
                values = [r[key] for r in at[m] if r[key] is not None]
                row[f"{m}_{key}"] = max(values) if values else None
        for m, key in (("symplectic", "time_ratio"), ("budgeted", "budgeted_time_ratio")):
            pairs = [
                (a["time_s"], b["time_s"])
                for a in at[m]
                for b in at["backprop"]
                if a["round"] == b["round"]
            ]
            row[key] = statistics.median(a / b for a, b in pairs) if pairs else None
        rows.append(row)
    return rows


def extrapolate_peak(
    peak_bytes: float, fixed_bytes: float, *, voxels: int, to_voxels: int
) -> float:
    """A peak memory at another latent size: fixed + (peak − fixed) · to_voxels / voxels.

    ``fixed_bytes`` (the resident memory before the gradient: the weights, the libraries) does
    not depend on the latent; everything above it (the graphs backprop keeps, the states and
    the one step's graph of the adjoints, the backward's transients) is assumed linear in the
    latent's voxels F·h·w (frames × latent pixels). That holds for convolutions, group norms,
    linear layers and attention by a flash or memory-efficient kernel, which keep O(tokens)
    per layer (torch's ``scaled_dot_product_attention`` on CPU and CUDA for these shapes); it
    fails where attention keeps its T×T scores (torch's math kernel), where spatial attention
    adds a term quadratic in h·w per frame that this leaves out.
    """
    return fixed_bytes + (peak_bytes - fixed_bytes) * to_voxels / voxels


def extrapolated(rows: list[dict], shape, to_shape) -> list[dict]:
    """Each measured peak RSS of ``rows`` (latent ``shape`` (B, C, [F,] h, w)) at
    ``to_shape`` by :func:`extrapolate_peak`, the fixed part the method's RSS before."""
    voxels, to_voxels = (int(torch.Size(s[2:]).numel()) for s in (shape, to_shape))
    out = []
    for row in rows:
        new = {"n": row["n"], "latent_shape": list(to_shape)}
        for m in METHODS:
            peak, fixed = row[f"{m}_peak_rss_bytes"], row[f"{m}_rss_before_bytes"]
            new[f"{m}_peak_rss_bytes"] = (
                None
                if peak is None or fixed is None
                else extrapolate_peak(peak, fixed, voxels=voxels, to_voxels=to_voxels)
            )
        out.append(new)
    return out


def _gib(b) -> str:
    return "—" if b is None else f"{b / 2**30:.2f} GiB"


def _ratio(r) -> str:
    return "—" if r is None else f"{r:.2f}"


def render(rows: list[dict], runs: list[dict], extrapolations: list[dict] = ()) -> str:
    first = runs[0]
    cfg = "no CFG" if first["cfg_scale"] is None else f"CFG w = {first['cfg_scale']}"
    shape = "×".join(map(str, first["latent_shape"]))
    lines = [
        f"{first['network']}, {first['parameters'] / 1e6:.0f}M parameters, latent {shape}, "
        f"{first['device']}, {cfg}",
        "n | backprop peak RSS | symplectic peak RSS | budgeted peak RSS | weights (RSS before)"
        " | CUDA peak bp / sa / bu | time sa/bp | time bu/bp",
    ]
    for r in rows:
        cuda = " / ".join(
            _gib(r[f"{m}_cuda_peak_bytes"]) for m in ("backprop", "symplectic", "budgeted")
        )
        lines.append(
            f"{r['n']} | {_gib(r['backprop_peak_rss_bytes'])} | "
            f"{_gib(r['symplectic_peak_rss_bytes'])} | {_gib(r['budgeted_peak_rss_bytes'])} | "
            f"{_gib(r['backprop_rss_before_bytes'])} | {cuda} | {_ratio(r['time_ratio'])} | "
            f"{_ratio(r['budgeted_time_ratio'])}"
        )
    if extrapolations:
        to = "×".join(map(str, extrapolations[0]["latent_shape"]))
        lines += [
            f"Extrapolated to latent {to} (above the RSS before, linear in frames × pixels):",
            "n | backprop peak RSS | symplectic peak RSS | budgeted peak RSS",
        ]
        lines += [
            f"{r['n']} | "
            + " | ".join(
                _gib(r[f"{m}_peak_rss_bytes"]) for m in ("backprop", "symplectic", "budgeted")
            )
            for r in extrapolations
        ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="sd15")
    p.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--channels", type=int, nargs="+", default=list(SD15["block_out_channels"]))
    p.add_argument(
        "--latent",
        type=int,
        default=None,
        help="latent side (default 64 for sd15, 32 for video and sd3)",
    )
    p.add_argument("--frames", type=int, default=8, help="video frames (animatediff)")
    p.add_argument("--t5-tokens", type=int, default=77, help="T5 tokens of the text (sd3)")
    p.add_argument("--cfg-scale", type=float, default=None, help="CFG inside the steps (batch 2)")
    p.add_argument(
        "--extrapolate",
        type=int,
        nargs=2,
        metavar=("FRAMES", "LATENT"),
        default=None,
        help="animatediff: peaks extrapolated to this video (default 16 frames, latent 64)",
    )
    p.add_argument("--json", type=Path, default=Path("results/sd_memory.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.extrapolate is not None and args.model != "animatediff":
        p.error("--extrapolate is for --model animatediff")
    if args.latent is None:
        args.latent = DEFAULT_LATENT[args.model]
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runs = run(args)
    rows = table(runs)
    extrapolations = []
    if args.model == "animatediff":
        frames, side = args.extrapolate or VIDEO_TARGET
        extrapolations = extrapolated(rows, latent_shape(args), (1, 4, frames, side, side))
    print(render(rows, runs, extrapolations))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"rows": rows, "extrapolated": extrapolations, "runs": runs}
    args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    apply_cpu_threads()  # the shared-machine thread policy, as the sagkit command applies it
    raise SystemExit(main())
