"""Behaviour kept through a redesign: samples and gradients of a fixed set of configurations,
float64, equal to the ones stored in ``tests/data/behaviour.pt``.

The stored tensors were computed by this file on the code before the redesign of 0.3 (every
guidance method, every gradient engine, the presets, CFG, a stochastic diffusers scheduler,
the flow schedule, SMC and the four pipelines). On the machine kind that recorded them (the
same torch, CPU capability and thread count) they must be equal bit for bit; elsewhere a
float64 reduction may be blocked differently, and each output is held within γ̃ of its own
counted chain of roundings, twice (``pair_bound``), instead.

``SAGKIT_WRITE_BEHAVIOUR=1 pytest tests/test_behaviour.py`` records them anew; do that only on
purpose, when a change of behaviour is intended and said in the changelog.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import (
    PROMPTS,
    SCHEDULES,
    RoundingChain,
    mixture_under,
    noise,
    pair_bound,
    rel,
    roundoff_bound,
    seeded,
    tiny_unet,
)

import sagkit as sk
from sagkit.digits.classifier import DigitsClassifier

STORED = Path(__file__).parent / "data" / "behaviour.pt"
WRITE = os.environ.get("SAGKIT_WRITE_BEHAVIOUR") == "1"


def machine() -> dict:
    """What decides the rounding of a float64 run on the CPU."""
    return {
        "torch": str(torch.__version__),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


# --- the models and losses, built alike on every call --------------------------------------


def digits_setup():
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    unet = tiny_unet(class_embed_type="identity", sample_size=16).double().eval()
    embeddings = torch.randn(11, 32, dtype=torch.float64, generator=seeded(0))
    model = sk.digits.DigitsModel(
        unet.requires_grad_(False), DDIMScheduler(num_train_timesteps=1000, clip_sample=False),
        embeddings,
    )  # fmt: skip
    torch.manual_seed(0)
    classifier = DigitsClassifier(channels=(4, 8, 8), features=8).double().eval()
    loss = sk.losses.target_class(classifier.requires_grad_(False), 3)
    x_T = torch.randn(2, 1, 16, 16, dtype=torch.float64, generator=seeded(0))
    return model, loss, x_T


def quadratic(x):
    target = torch.linspace(-1, 1, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return 0.5 * (x - target).flatten(1).pow(2).sum(1) + torch.sin(x).flatten(1).sum(1) ** 2


COMMON = {"steps": 4, "window": (0.0, 1.0), "progress": False}


def digits_run(labels=None, **options):
    model, loss, x_T = digits_setup()
    if labels is not None:
        options["cond"] = model.cond_for(torch.tensor(labels))
    return sk.guided_sample(model, loss, x_T, generator=seeded(1), **{**COMMON, **options})


def mixture_run(schedule, **options):
    model = mixture_under(SCHEDULES[schedule])
    x_T = noise(model.means.shape[1:], batch=3)
    return sk.guided_sample(model, quadratic, x_T, generator=seeded(1), **{**COMMON, **options})


def engine_gradient(method):
    model = mixture_under(SCHEDULES["vp"])
    ts = sk.time_grid(model.schedule, 0.8, model.schedule.t_min, 4)
    return torch.cat(
        [
            t.flatten()
            for t in sk.loss_grad(model, quadratic, noise(model.means.shape[1:]), ts, method=method)
        ]
    )


def pipeline_run(kind):
    from sagkit.sd.clip import StyleLoss
    from sagkit.sd.tiny import tiny_clip_vision

    vision = tiny_clip_vision(dtype=torch.float64)
    reference = torch.rand(3, 24, 20, dtype=torch.float64, generator=seeded(3)) * 2 - 1
    style = StyleLoss(vision, reference)  # SAG's style loss, on images and on every frame
    options = {"steps": 3, "n": 2, "window": (0.0, 1.0), "progress": False, "output_type": "latent"}
    if kind == "sd":
        from sagkit.sd.pipeline import GuidedStableDiffusion
        from sagkit.sd.tiny import tiny_pipeline

        guided = GuidedStableDiffusion.from_pipe(tiny_pipeline(latent_size=8, dtype=torch.float64))
        out = guided(PROMPTS, loss_fn=style, generator=seeded(), guidance="sag", **options)
    elif kind == "video":
        from sagkit.sd.tiny_video import tiny_animatediff
        from sagkit.sd.video import GuidedVideo
        from sagkit.sd.video_losses import video_style_loss

        guided = GuidedVideo.from_pipe(tiny_animatediff(dtype=torch.float64))
        out = guided(
            PROMPTS, loss_fn=video_style_loss(vision, reference), num_frames=2, generator=seeded(),
            guidance="sag", **options,
        )  # fmt: skip
    else:
        from sagkit.sd.flow import GuidedFlux, GuidedStableDiffusion3
        from sagkit.sd.tiny_flow import tiny_flux, tiny_sd3

        build, cls = (
            (tiny_sd3, GuidedStableDiffusion3) if kind == "sd3" else (tiny_flux, GuidedFlux)
        )
        guided = cls.from_pipe(build(dtype=torch.float64))
        out = guided(
            PROMPTS, loss_fn=style, generator=seeded(), guidance="freedom",
            max_sequence_length=8, **options,
        )  # fmt: skip
    return out.images if hasattr(out, "images") else out.frames


def smc_run():
    from sagkit.core.tilted import ExactGuidance, QuadraticLoss
    from sagkit.guidance.smc import ExactTwist, sample_smc

    model = mixture_under(SCHEDULES["vp"])
    observation = torch.tensor([0.5, -0.5], dtype=torch.float64)
    loss = QuadraticLoss(torch.eye(4, dtype=torch.float64)[:2], observation, tau=0.3)
    twist = ExactTwist(ExactGuidance(model, loss))
    x_T = torch.randn(2, 4, *model.means.shape[1:], dtype=torch.float64, generator=seeded(0))
    result = sample_smc(model, loss, x_T, twist=twist, steps=6, generator=seeded(1), progress=False)
    return result.particles


CASES = {
    **{f"method-{g}": (lambda g=g: digits_run(guidance=g)) for g in sk.GUIDANCE if g != "sag"},
    "method-sag": lambda: digits_run(guidance="sag", n=2),
    **{
        f"engine-{m}-guided": (lambda m=m: mixture_run("vp", guidance="sag", n=2, gradient=m))
        for m in ("backprop", "checkpoint", "symplectic", "budgeted")
    },
    **{f"engine-{m}-gradient": (lambda m=m: engine_gradient(m)) for m in sk.METHODS},
    **{
        f"preset-{p}": (lambda p=p: digits_run(preset=p, steps=4, progress=False))
        for p in sk.PRESETS
    },
    "cfg-freedom": lambda: digits_run(guidance="freedom", labels=[3, 5], cfg_scale=2.0),
    "ddpm-sampler-repeats": lambda: digits_run(
        guidance="freedom", sampler="DDPMScheduler", repeats=2, step_size="per-batch"
    ),
    "sampler-grid": lambda: mixture_run("vp", guidance="sag", n=2, estimate_grid="sampler"),
    "backward": lambda: mixture_run("vp", guidance="backward", backward_steps=3),
    **{
        f"flow-{g}": (lambda g=g: mixture_run("flow", guidance=g))
        for g in ("freedom", "dps", "tfg")
    },
    "flow-sag": lambda: mixture_run("flow", guidance="sag", n=2),
    "smc": smc_run,
    **{f"pipeline-{k}": (lambda k=k: pipeline_run(k)) for k in ("sd", "video", "sd3", "flux")},
}


@pytest.fixture(scope="module")
def stored():
    if WRITE:
        yield {}
        return
    yield torch.load(STORED)


@pytest.fixture(scope="module", autouse=True)
def record(stored):
    yield
    if WRITE:
        STORED.parent.mkdir(exist_ok=True)
        torch.save({"machine": machine(), **stored}, STORED)


@pytest.mark.parametrize("name", list(CASES))
def test_behaviour_is_unchanged(name, stored):
    with RoundingChain() as chain:
        out = CASES[name]()
    assert out.dtype == torch.float64 and bool(torch.isfinite(out).all())
    if WRITE:
        stored[name] = out.detach().clone()
        return
    want = stored[name]
    if stored["machine"] == machine():
        assert torch.equal(out, want), f"{name}: rel {rel(out, want):.3g}"
    else:  # another rounding of the same operations: each within γ̃ of its counted chain
        bound = roundoff_bound(chain.longest(out), torch.float64)
        assert rel(out, want) <= pair_bound(bound, bound)
