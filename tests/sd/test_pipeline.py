"""The guided Stable Diffusion pipeline on tiny random components (sagkit.sd.tiny)."""

import pytest
import torch
from helpers import PROMPTS, RoundingChain, pair_bound, rel, roundoff_bound, seeded

import sagkit as sk
from sagkit.sd.clip import (
    AestheticLoss,
    ImageSimilarityLoss,
    StyleLoss,
    TextSimilarityLoss,
)
from sagkit.sd.pipeline import GuidedStableDiffusion
from sagkit.sd.tiny import tiny_clip_vision, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(latent_size=8, dtype=torch.float64)


@pytest.fixture(scope="module")
def reference():
    return torch.rand(3, 24, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])  # SD 1.x; SD 2.x at 768²
def test_unguided_run_is_the_diffusers_pipeline(pipe, prediction):
    """guidance="none": the pipeline's own loop, from the same noise, to rounding."""
    from diffusers import StableDiffusionPipeline

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
    pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    guided = GuidedStableDiffusion.from_pipe(pipe)
    with RoundingChain() as chain:  # the roundings behind each run, counted
        want = pipe(
            PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=4, guidance_scale=7.5,
            generator=seeded(), output_type="pt",
        ).images  # fmt: skip
        got = guided(
            PROMPTS, "blurry", steps=4, cfg_scale=7.5, generator=seeded(), output_type="pt",
            progress=False,
        ).images  # fmt: skip
    # the same float64 operations, up to the batch order of the CFG branches and the
    # timestep passed as τ = t·N − 1: each run within γ̃ of its counted chain of the exact one
    bounds = (roundoff_bound(chain.longest(r), torch.float64) for r in (got, want))
    assert got.shape == (2, 3, 16, 16) and got.dtype == torch.float64
    assert rel(got, want) <= pair_bound(*bounds)


def gradient_setup(pipe, loss):
    guided = GuidedStableDiffusion.from_pipe(pipe)
    cond, null = guided.encode(PROMPTS)
    model = sk.ClassifierFreeGuidance(guided.model(null), null, 5.0)
    z = guided.initial_noise(2, height=16, width=16, generator=seeded(1))
    return model, guided.latent_loss(loss), z, cond


def the_losses(vision, reference):
    head = torch.nn.Linear(16, 1).double()
    text = torch.randn(1, 16, dtype=torch.float64, generator=seeded(4))
    return {
        "style": StyleLoss(vision, reference * 2 - 1),
        "clip-i": ImageSimilarityLoss(vision, reference * 2 - 1),
        "text": TextSimilarityLoss(vision, text),
        "aesthetic": AestheticLoss(vision, head),
    }


@pytest.mark.parametrize("name", ["style", "clip-i", "text", "aesthetic"])
def test_symplectic_equals_backprop_through_decoder_and_clip(pipe, vision, reference, name):
    """The 3-step estimate with CFG, the VAE decode and a CLIP loss: the engines agree."""
    loss = the_losses(vision, reference)[name]
    model, latent_loss, z, cond = gradient_setup(pipe, loss)
    ts = sk.time_grid(model.schedule, 0.7, 0.0, 3)
    with RoundingChain() as chain:  # the roundings behind each gradient, counted
        _, g_bp = sk.loss_grad(model, latent_loss, z, ts, method="backprop", cond=cond)
        _, g_sa = sk.loss_grad(model, latent_loss, z, ts, method="symplectic", cond=cond)
    # two float64 roundings of the exact discrete gradient, each γ̃ over its counted chain
    bounds = (roundoff_bound(chain.longest(g), torch.float64) for g in (g_sa, g_bp))
    bound = pair_bound(*bounds)
    assert bound <= 1e-10 and rel(g_sa, g_bp) <= bound
    assert float(g_bp.abs().max()) > 0


def test_symplectic_saved_bytes_are_flat_in_n(pipe, vision, reference):
    """Peak bytes saved for backward: one step's graph, the decode and CLIP whatever n (and
    the n + 1 latent states), while backprop keeps every step's graph."""
    model, latent_loss, z, cond = gradient_setup(pipe, StyleLoss(vision, reference * 2 - 1))
    saved = {}
    for method in ("symplectic", "backprop"):
        for n in (1, 2, 4):
            ts = sk.time_grid(model.schedule, 0.7, 0.0, n)
            report = sk.lab.profile_gradient(model, latent_loss, z, ts, method=method, cond=cond)
            saved[method, n] = report.saved_bytes
    state = z.numel() * z.element_size()
    assert 0 <= saved["symplectic", 4] - saved["symplectic", 1] <= 3 * state
    per_step = (saved["backprop", 4] - saved["backprop", 1]) / 3  # one step's graph
    assert per_step > 10 * state
    assert saved["backprop", 2] - saved["backprop", 1] >= 0.99 * per_step


def test_sag_with_one_step_is_freedom(pipe, vision, reference):
    guided = GuidedStableDiffusion.from_pipe(pipe)
    loss = StyleLoss(vision, reference * 2 - 1)
    kwargs = dict(steps=4, window=(0.25, 0.75), output_type="latent", progress=False)
    sag = guided(PROMPTS, loss_fn=loss, guidance="sag", n=1, generator=seeded(), **kwargs)
    freedom = guided(PROMPTS, loss_fn=loss, guidance="freedom", generator=seeded(), **kwargs)
    plain = guided(PROMPTS, generator=seeded(), **kwargs)
    assert torch.equal(sag.images, freedom.images)
    assert not torch.equal(sag.images, plain.images)


def test_sag_lowers_the_style_loss_and_returns_what_diffusers_returns(pipe, vision, reference):
    guided = GuidedStableDiffusion.from_pipe(pipe)
    loss = StyleLoss(vision, reference * 2 - 1)
    kwargs = dict(steps=6, window=(0.0, 1.0), num_images_per_prompt=2, progress=False)
    plain = guided("a fox", generator=seeded(), output_type="pt", **kwargs).images
    sag, losses = guided(
        "a fox", loss_fn=loss, scale=3.0, generator=seeded(), output_type="pt",
        return_losses=True, **kwargs,
    )  # fmt: skip
    assert sag.images.shape == (2, 3, 16, 16) and losses.shape == (7, 2)
    assert 0 <= float(sag.images.min()) and float(sag.images.max()) <= 1
    with torch.no_grad():
        assert float(loss(sag.images * 2 - 1).sum()) < float(loss(plain * 2 - 1).sum())
    pil = guided("a fox", steps=2, generator=seeded(), progress=False).images
    assert len(pil) == 1 and pil[0].size == (16, 16)


def test_presets_and_schedulers_run_on_the_pipeline(pipe, vision, reference):
    from diffusers import DPMSolverMultistepScheduler

    guided = GuidedStableDiffusion.from_pipe(pipe)
    loss = StyleLoss(vision, reference * 2 - 1)
    dpm = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    for options in (dict(preset="sag-paper", steps=5), dict(sampler=dpm, steps=4)):
        out = guided(
            "a fox", loss_fn=loss, generator=seeded(), output_type="latent", progress=False,
            **options,
        )  # fmt: skip
        assert out.images.shape == (1, 4, 8, 8) and bool(torch.isfinite(out.images).all())


def test_bad_input_is_refused_naming_the_argument(pipe):
    guided = GuidedStableDiffusion.from_pipe(pipe)
    with pytest.raises(ValueError, match="output_type"):
        guided("a fox", output_type="jpeg")
    with pytest.raises(TypeError, match="negative_prompt"):
        guided("a fox", ["x", "y"])
    with pytest.raises(ValueError, match="prompt"):
        guided()
    with pytest.raises(ValueError, match="latents"):
        guided(PROMPTS, latents=torch.zeros(1, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiples"):
        guided("a fox", height=15)
    with pytest.raises(TypeError, match="StableDiffusionPipeline"):
        GuidedStableDiffusion.from_pipe(object())


def test_half_precision_weights_keep_sagkit_in_float32():
    """bfloat16 weights: the network runs in bfloat16 on float32 inputs; ε, the latents and
    the gradients are float32, and ε is exactly the bfloat16 network's output."""
    pipe = tiny_pipeline(latent_size=8, dtype=torch.bfloat16)
    vision = tiny_clip_vision(dtype=torch.bfloat16)
    guided = GuidedStableDiffusion.from_pipe(pipe)
    assert guided.dtype == torch.float32
    cond, null = guided.encode("a fox")
    assert cond.dtype == null.dtype == torch.float32
    model = guided.model(null)
    z = guided.initial_noise(1, height=16, width=16, generator=seeded())
    with torch.no_grad():
        eps = model.eps(z, 0.5, cond)
        net = pipe.unet(
            z.bfloat16(), torch.tensor([499.0]), encoder_hidden_states=cond.bfloat16()
        ).sample
    assert eps.dtype == torch.float32 and torch.equal(eps, net.float())
    with pytest.raises(TypeError, match=r"weights are torch.bfloat16 .*pass x.float\(\)"):
        model.eps(z.bfloat16(), 0.5, cond)
    reference = torch.rand(3, 16, 16, generator=seeded(2)) * 2 - 1
    half_images = StyleLoss(vision, reference)(reference[None].bfloat16())
    assert half_images.dtype == torch.float32  # the Gram matrices and norms in float32
    loss = guided.latent_loss(StyleLoss(vision, reference))
    value, g = sk.loss_grad(
        sk.ClassifierFreeGuidance(model, null, 5.0), loss, z,
        sk.time_grid(model.schedule, 0.7, 0.0, 2), method="symplectic", cond=cond,
    )  # fmt: skip
    assert value.dtype == g.dtype == torch.float32 and bool(torch.isfinite(g).all())
    out = guided("a fox", loss_fn=StyleLoss(vision, reference), steps=3, window=(0, 1),
                 generator=seeded(), output_type="pt", progress=False)  # fmt: skip
    assert bool(torch.isfinite(out.images).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_pipeline_on_cuda():
    """float16 weights on a GPU: SAG runs with float32 latents and gradients, finite."""
    pipe = tiny_pipeline(latent_size=8, dtype=torch.float16).to("cuda")
    vision = tiny_clip_vision(dtype=torch.float16).to("cuda")
    guided = GuidedStableDiffusion.from_pipe(pipe)
    reference = torch.rand(3, 16, 16, device="cuda") * 2 - 1
    out = guided(
        PROMPTS, loss_fn=StyleLoss(vision, reference), steps=4, window=(0, 1), n=2,
        generator=torch.Generator("cuda").manual_seed(0), output_type="latent", progress=False,
    )  # fmt: skip
    assert out.images.dtype == torch.float32 and bool(torch.isfinite(out.images).all())


def test_the_decoder_runs_in_the_guided_steps_and_at_the_end(pipe, vision, reference):
    """Decoder calls: one to check the loss on x_T, one per guided evaluation (FreeDoM: one a
    repeat of a guided step), one for the output; none in the unguided steps."""
    guided = GuidedStableDiffusion.from_pipe(pipe)
    calls = []
    decode = pipe.vae.decode

    def counted(*args, **kwargs):
        calls.append(1)
        return decode(*args, **kwargs)

    pipe.vae.decode = counted
    try:
        guided(
            "a fox", loss_fn=StyleLoss(vision, reference * 2 - 1), guidance="freedom", steps=8,
            window=(0.25, 0.75), repeats=2, generator=seeded(), output_type="pt", progress=False,
        )  # fmt: skip
    finally:
        del pipe.vae.decode  # back to the class's method
    assert len(calls) == 1 + 4 * 2 + 1  # steps 2..5 guided, each taken twice
