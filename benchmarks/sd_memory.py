"""Memory and time of the guidance gradient at Stable Diffusion's scale, without its weights.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_memory.py                    # SD 1.5 size
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_memory.py --ns 1 2 --rounds 1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_memory.py --cfg-scale 7.5    # CFG: batch 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_memory.py --channels 32 32 64 64 --latent 16

A ``UNet2DConditionModel`` with Stable Diffusion 1.5's configuration (block widths 320, 640,
1280, 1280; cross-attention on 768-wide text embeddings of 77 tokens; about 860M parameters)
and random weights, float32, on CUDA when present, else on the CPU. For n = 1, 2, 4 (``--ns``)
it computes the guidance gradient g = ∂L(x̂0)/∂z_t of SAG's n-step DDIM estimate from t = 0.6
to 0 on one 64×64 latent (batch 1), by the symplectic adjoint and by backpropagation. The UNet
is called on the text condition alone (batch 1); ``--cfg-scale w`` runs classifier-free
guidance inside every step instead, as SAG's pipeline does, both branches in one batch of 2
(twice the activations). The loss is
L = ‖x̂0 − y‖² on the latent: the VAE decoder and a CLIP model would add the same memory to
both engines, so they are left out to show the UNet's part alone.

Each (method, n) runs in a fresh process (``--worker``), so its peak resident memory (VmHWM,
which includes the weights) is its own, and the CUDA peak when on a GPU. The rounds take the
methods in turns (``--rounds``, interleaved, the order alternating), and the time ratio
symplectic/backprop is the median over rounds of the ratio within a round. Every finished run
is printed to stderr as a JSON line as it ends; the table is printed at the end and written as
JSON (``--json``, default ``results/sd_memory.json``, git-ignored).
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

METHODS = ("symplectic", "backprop")
SD15 = dict(
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
)


def build_unet(channels, *, latent: int, seed: int = 0):
    """SD 1.5's UNet (``channels`` = its block widths), random weights, float32."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        **{**SD15, "block_out_channels": tuple(channels)}, sample_size=latent
    ).eval()


def worker(args) -> dict:
    """One gradient in this process: its time and peak memory, as a dict."""
    from diffusers import DDIMScheduler

    import sagkit as sk
    from sagkit.core.device import resolve_device
    from sagkit.lab.profiling import profile
    from sagkit.sd.latent import TextConditionedModel

    device = resolve_device()
    unet = build_unet(args.channels, latent=args.latent).to(device).requires_grad_(False)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(1, 77, SD15["cross_attention_dim"], generator=gen).to(device)
    model = TextConditionedModel(unet, scheduler, torch.zeros_like(text))
    if args.cfg_scale is not None:
        model = sk.ClassifierFreeGuidance(model, model.null_cond, args.cfg_scale)
    z = torch.randn(1, 4, args.latent, args.latent, generator=gen).to(device)
    target = torch.randn(z.shape, generator=gen).to(device)
    ts = sk.time_grid(model.schedule, 0.6, 0.0, args.n)

    def loss(x0):
        return (x0 - target).pow(2).flatten(1).sum(1)

    rss_before = _vmrss_bytes()
    report = profile(
        sk.loss_grad, model, loss, z, ts, method=args.method, cond=text, track_saved=False
    )
    return {
        "method": args.method,
        "n": args.n,
        "cfg_scale": args.cfg_scale,
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


def run(args) -> list[dict]:
    """Every (method, n) in a fresh process, ``rounds`` times, the methods taking turns."""
    runs = []
    common = ["--channels", *map(str, args.channels), "--latent", str(args.latent)]
    if args.cfg_scale is not None:
        common += ["--cfg-scale", str(args.cfg_scale)]
    for r in range(args.rounds):
        for n in args.ns:
            order = METHODS if (r + n) % 2 == 0 else METHODS[::-1]
            for method in order:
                cmd = [sys.executable, __file__, "--worker", "--method", method, "--n", str(n)]
                out = subprocess.run(cmd + common, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                runs.append({**row, "round": r})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    return runs


def table(runs: list[dict]) -> list[dict]:
    """Per n: each method's peak memory (the largest over rounds) and the time ratio."""
    rows = []
    for n in sorted({r["n"] for r in runs}):
        at = {m: [r for r in runs if r["n"] == n and r["method"] == m] for m in METHODS}
        ratios = [
            s["time_s"] / b["time_s"] for s, b in zip(at["symplectic"], at["backprop"], strict=True)
        ]
        row = {"n": n, "time_ratio": statistics.median(ratios)}
        for m in METHODS:
            row[f"{m}_time_s"] = statistics.median(r["time_s"] for r in at[m])
            for key in ("peak_rss_bytes", "rss_before_bytes", "cuda_peak_bytes"):
                values = [r[key] for r in at[m] if r[key] is not None]
                row[f"{m}_{key}"] = max(values) if values else None
        rows.append(row)
    return rows


def _gib(b) -> str:
    return "—" if b is None else f"{b / 2**30:.2f} GiB"


def render(rows: list[dict], runs: list[dict]) -> str:
    first = runs[0]
    cfg = "no CFG" if first["cfg_scale"] is None else f"CFG w = {first['cfg_scale']}"
    lines = [
        f"UNet2DConditionModel, {first['parameters'] / 1e6:.0f}M parameters, {first['device']}, "
        + cfg,
        "n | backprop peak RSS | symplectic peak RSS | weights (RSS before) | "
        "CUDA peak bp / sa | time sa/bp",
    ]
    for r in rows:
        cuda = f"{_gib(r['backprop_cuda_peak_bytes'])} / {_gib(r['symplectic_cuda_peak_bytes'])}"
        lines.append(
            f"{r['n']} | {_gib(r['backprop_peak_rss_bytes'])} | "
            f"{_gib(r['symplectic_peak_rss_bytes'])} | {_gib(r['backprop_rss_before_bytes'])} | "
            f"{cuda} | {r['time_ratio']:.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--channels", type=int, nargs="+", default=list(SD15["block_out_channels"]))
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512×512 images)")
    p.add_argument("--cfg-scale", type=float, default=None, help="CFG inside the steps (batch 2)")
    p.add_argument("--json", type=Path, default=Path("results/sd_memory.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runs = run(args)
    rows = table(runs)
    print(render(rows, runs))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
