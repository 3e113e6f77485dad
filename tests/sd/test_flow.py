"""The guided flow-matching pipelines (SD3, FLUX) on tiny random components (sagkit.sd.tiny_flow)."""

import numpy as np
import pytest
import torch
from helpers import (
    PROMPTS,
    WRONG_GRADIENT,
    RoundingChain,
    gamma,
    pair_bound,
    rel,
    roundoff_bound,
    seeded,
    unit_roundoff,
)

import sagkit as sk
from sagkit.core.frames import tweedie_x0
from sagkit.guidance.base import Timesteps
from sagkit.sd.clip import StyleLoss
from sagkit.sd.flow import (
    GuidedFlux,
    GuidedStableDiffusion3,
    latent_image_ids,
    pack_latents,
    pack_text,
    unpack_latents,
    unpack_text,
)
from sagkit.sd.tiny import tiny_clip_vision
from sagkit.sd.tiny_flow import tiny_flux, tiny_sd3

TOKENS = 12  # T5 tokens (max_sequence_length): short sequences keep the runs fast
GUIDED = {"sd3": GuidedStableDiffusion3, "flux": GuidedFlux}


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": tiny_sd3(dtype=torch.float64), "flux": tiny_flux(dtype=torch.float64)}


@pytest.fixture(scope="module")
def style(vision):
    reference = torch.rand(3, 24, 20, dtype=torch.float64, generator=seeded(3)) * 2 - 1
    return StyleLoss(vision, reference)


def test_packing_is_fluxs_and_the_text_unpacks():
    """pack_latents, unpack_latents and latent_image_ids are FluxPipeline's; pack_text keeps
    both embeddings, and gradients reach them through unpack_text."""
    from diffusers import FluxPipeline

    z = torch.randn(2, 4, 6, 8, generator=seeded())
    tokens = pack_latents(z)
    assert torch.equal(tokens, FluxPipeline._pack_latents(z, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(tokens, height=6, width=8), z)
    assert torch.equal(
        unpack_latents(tokens, height=6, width=8),
        FluxPipeline._unpack_latents(tokens, 12, 16, vae_scale_factor=2),
    )
    assert torch.equal(
        latent_image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", None)
    )
    for width, pooled_width in ((32, 16), (8, 20)):  # the pooled row narrower, then wider
        text = torch.randn(2, 5, width, generator=seeded(1), requires_grad=True)
        pooled = torch.randn(2, pooled_width, generator=seeded(2), requires_grad=True)
        cond = pack_text(text, pooled)
        assert cond.shape == (2, 6, max(width, pooled_width))
        a, b = unpack_text(cond, width=width, pooled_width=pooled_width)
        assert torch.equal(a, text) and torch.equal(b, pooled)
        (a.sum() + 2 * b.sum()).backward()
        assert torch.equal(text.grad, torch.ones_like(text))
        assert torch.equal(pooled.grad, torch.full_like(pooled, 2.0))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_model_is_the_transformer_as_the_pipeline_calls_it(pipes, name):
    """velocity = the transformer's output at the scheduler's timestep; ε = (x + α v)/(α + σ)
    has the one-step estimate x − σ v (α + σ = 1) and is finite at t = 1, where α = 0."""
    pipe = pipes[name]
    guided = GUIDED[name].from_pipe(pipe)
    cond, null = guided.encode(PROMPTS, max_sequence_length=TOKENS)
    model = guided.model(null)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3, **({"mu": 0.7} if name == "flux" else {}))
    sigma, timestep = scheduler.sigmas[1], scheduler.timesteps[1]
    t = float(model.schedule.t_of_sigma(float(sigma)))
    x = guided.initial_noise(2, generator=seeded())
    text, pooled = unpack_text(
        cond, width=32, pooled_width=pipe.transformer.config.pooled_projection_dim
    )
    with torch.no_grad():
        v = model.velocity(x, t, cond)
        if name == "sd3":
            want = pipe.transformer(
                x, text, pooled, timestep.expand(2), return_dict=False
            )[0]  # fmt: skip
        else:
            want = pipe.transformer(
                pack_latents(x), text, pooled, timestep.expand(2).double() / 1000,
                img_ids=latent_image_ids(8, 8, dtype=x.dtype), txt_ids=x.new_zeros(TOKENS, 3),
                guidance=torch.full((2,), 3.5), return_dict=False,
            )[0]  # fmt: skip
            want = unpack_latents(want, height=8, width=8)
        assert torch.equal(v, want)
        eps = model.eps(x, t, cond)
        x0 = tweedie_x0(model.schedule, x, t, eps)
        # x̂0 two ways: ≤ 4 roundings of terms of size |x| and σ|v| (a tiny float64 bound)
        assert rel(x0, x - float(model.schedule.sigma(t)) * v) <= 1e-14
        assert bool(torch.isfinite(model.eps(x, 1.0, cond)).all())


def unguided_pair(pipe, guided, prompt_options, diffusers_options, sagkit_options):
    with RoundingChain() as chain:  # the roundings behind each run, counted
        want = pipe(
            PROMPTS, num_inference_steps=4, generator=seeded(), output_type="pt",
            max_sequence_length=TOKENS, **prompt_options, **diffusers_options,
        ).images  # fmt: skip
        got = guided(
            PROMPTS, steps=4, generator=seeded(), output_type="pt", max_sequence_length=TOKENS,
            progress=False, **sagkit_options,
        ).images  # fmt: skip
    # the same float64 operations up to the batch order of the CFG branches, the negative
    # prompt encoded once and the timestep σ·N recomputed from t(σ): each run within γ̃ of
    # its counted chain of the exact one
    bounds = (roundoff_bound(chain.longest(r), torch.float64) for r in (got, want))
    assert got.shape == (2, 3, 16, 16) and got.dtype == torch.float64
    assert rel(got, want) <= pair_bound(*bounds)


def test_unguided_sd3_is_the_diffusers_pipeline(pipes):
    pipe = pipes["sd3"]
    guided = GuidedStableDiffusion3.from_pipe(pipe)
    unguided_pair(
        pipe, guided, {}, dict(negative_prompt=["blurry"] * 2, guidance_scale=5.0),
        dict(negative_prompt="blurry", cfg_scale=5.0),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["dev", "true-cfg", "schnell"])
def test_unguided_flux_is_the_diffusers_pipeline(pipes, kind):
    """FLUX-dev (distilled guidance, one call a step), with true CFG around a negative
    prompt, and FLUX-schnell (no guidance embedding)."""
    pipe = (
        pipes["flux"]
        if kind != "schnell"
        else tiny_flux(guidance_embeds=False, dtype=torch.float64)
    )
    guided = GuidedFlux.from_pipe(pipe)
    if kind == "true-cfg":
        diffusers_options = dict(negative_prompt=["blurry"] * 2, true_cfg_scale=2.0)
        sagkit_options = dict(negative_prompt="blurry", cfg_scale=2.0)
    else:
        diffusers_options = dict(guidance_scale=2.5)
        sagkit_options = dict(guidance_scale=2.5)
    unguided_pair(pipe, guided, {}, diffusers_options, sagkit_options)


def test_guided_sample_on_the_flow_scheduler_is_diffusers_loop(pipes):
    """sk.guided_sample with FlowMatchEulerDiscreteScheduler as the base sampler and no
    guidance is the scheduler's own loop: x ← step(v_u + w (v_c − v_u), τ_k, x)."""
    pipe = pipes["sd3"]
    guided = GuidedStableDiffusion3.from_pipe(pipe)
    cond, null = guided.encode(PROMPTS, max_sequence_length=TOKENS)
    x_T = guided.initial_noise(2, generator=seeded(5))
    got = sk.guided_sample(
        guided.model(null), None, x_T, guidance="none", steps=5, sampler=pipe.scheduler,
        cond=cond, cfg_scale=4.0, progress=False,
    )  # fmt: skip
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(5)
    text, pooled = unpack_text(cond, width=32, pooled_width=32)
    null_text, null_pooled = unpack_text(null.expand(2, -1, -1), width=32, pooled_width=32)
    x = x_T
    with RoundingChain() as chain, torch.no_grad():
        for tau in scheduler.timesteps:
            v_c, v_u = (
                pipe.transformer(x, e, p, tau.expand(2), return_dict=False)[0]
                for e, p in ((text, pooled), (null_text, null_pooled))
            )
            x = scheduler.step(v_u + 4.0 * (v_c - v_u), tau, x, return_dict=False)[0]
    # the same float64 operations up to the batched CFG call, each loop within γ̃ of its
    # counted chain; and diffusers' step rounds x + (σ_{k+1} − σ_k) v to float32 (it upcasts
    # its sample to float32) in both loops, where inputs that differ in float64 can round to
    # neighbouring float32 numbers: at most 2u₃₂ relative a step, carried by the later steps
    bound = roundoff_bound(chain.longest(x), torch.float64)
    assert rel(got, x) <= pair_bound(bound, bound) + 5 * 2 * unit_roundoff(torch.float32)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_sag_with_one_step_is_freedom(pipes, style, name):
    guided = GUIDED[name].from_pipe(pipes[name])
    kwargs = dict(
        steps=4, window=(0.25, 0.75), output_type="latent", progress=False,
        max_sequence_length=TOKENS,
    )  # fmt: skip
    sag = guided(PROMPTS, loss_fn=style, guidance="sag", n=1, generator=seeded(), **kwargs)
    freedom = guided(PROMPTS, loss_fn=style, guidance="freedom", generator=seeded(), **kwargs)
    plain = guided(PROMPTS, generator=seeded(), **kwargs)
    assert torch.equal(sag.images, freedom.images)
    assert not torch.equal(sag.images, plain.images)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_symplectic_equals_backprop_through_decoder_and_clip(pipes, style, name):
    """The 3-step estimate on the velocity frame, with CFG, the VAE decode (z/s + b) and a
    CLIP style loss: the engines agree in float64."""
    guided = GUIDED[name].from_pipe(pipes[name])
    cond, null = guided.encode(PROMPTS, max_sequence_length=TOKENS)
    model = sk.ClassifierFreeGuidance(guided.model(null), null, 3.0)
    z = guided.initial_noise(2, generator=seeded(1))
    loss = guided.latent_loss(style)
    ts = sk.time_grid(model.schedule, 0.7, 0.0, 3)
    with RoundingChain() as chain:  # the roundings behind each gradient, counted
        _, g_bp = sk.loss_grad(model, loss, z, ts, method="backprop", cond=cond)
        _, g_sa = sk.loss_grad(model, loss, z, ts, method="symplectic", cond=cond)
    # two float64 roundings of the exact discrete gradient, each γ̃ over its counted chain;
    # and FLUX's RMSNorm (the q and k norms) takes its mean square over a head of d in float32
    # and casts its cotangent to float32: at most γ_{d+2}(float32) relative per norm, on a
    # chain through at most (norms of the network) × (3 calls) of them, in each gradient
    bound = pair_bound(*(roundoff_bound(chain.longest(g), torch.float64) for g in (g_sa, g_bp)))
    transformer = pipes[name].transformer
    norms = sum(type(m).__name__ == "RMSNorm" for m in transformer.modules())
    head = transformer.config.attention_head_dim
    bound += 2 * 3 * norms * gamma(head + 2, torch.float32)
    assert bound <= WRONG_GRADIENT / 100 and rel(g_sa, g_bp) <= bound
    assert float(g_bp.abs().max()) > 0


def test_the_loss_decodes_with_the_vaes_shift(pipes):
    """L(z) = ℓ(D(z/s + b)), b the VAE's shift: the decode of the pipeline's output."""
    pipe = pipes["sd3"]
    guided = GuidedStableDiffusion3.from_pipe(pipe)
    z = guided.initial_noise(1, generator=seeded(2))
    seen = []
    guided.latent_loss(lambda images: seen.append(images) or images.mean((1, 2, 3)))(z)
    vae = pipe.vae
    assert vae.config.shift_factor != 0
    want = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert torch.equal(seen[0], want)  # the same operations


def test_the_flux_sampler_gets_the_pipelines_sigmas_and_mu(pipes):
    guided = GuidedFlux.from_pipe(pipes["flux"])
    config = guided.configure(sk.GuidanceConfig(sampler=pipes["flux"].scheduler, steps=4),
                              torch.zeros(1, 4, 8, 8))  # fmt: skip
    assert isinstance(config.sampler, Timesteps)
    assert np.allclose(config.sampler.options["sigmas"], [1.0, 0.75, 0.5, 0.25], rtol=0, atol=0)
    tokens = 16  # 8×8 latents in 2×2 patches
    assert config.sampler.options["mu"] == pytest.approx(0.5 + (tokens - 256) * 0.65 / 3840)
    for sampler in ("ddim", "FlowMatchEulerDiscreteScheduler"):
        out = guided(
            "a fox", steps=3, sampler=sampler, generator=seeded(), output_type="latent",
            progress=False, max_sequence_length=TOKENS,
        )  # fmt: skip
        assert out.images.shape == (1, 4, 8, 8) and bool(torch.isfinite(out.images).all())


def test_bad_input_is_refused_naming_the_argument(pipes):
    sd3 = GuidedStableDiffusion3.from_pipe(pipes["sd3"])
    flux = GuidedFlux.from_pipe(pipes["flux"])
    text, pooled = torch.randn(1, 7, 32), torch.randn(1, 32)
    with pytest.raises(ValueError, match="output_type"):
        sd3("a fox", output_type="jpeg")
    with pytest.raises(ValueError, match="guidance_scale is FLUX-dev's distilled guidance"):
        sd3("a fox", guidance_scale=3.5)
    with pytest.raises(ValueError, match="prompt"):
        sd3()
    with pytest.raises(ValueError, match="give prompt_embeds and pooled_prompt_embeds"):
        sd3(prompt_embeds=text.double())
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(B, L, 32\)"):
        sd3(prompt_embeds=torch.randn(1, 7, 16), pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds must have shape \(B, 32\)"):
        sd3(prompt_embeds=text, pooled_prompt_embeds=torch.randn(1, 16))
    with pytest.raises(ValueError, match=r"negative_prompt_embeds must have shape \(1, L, 32\)"):
        sd3("a fox", negative_prompt_embeds=torch.randn(2, 7, 32),
            negative_pooled_prompt_embeds=torch.randn(2, 32))  # fmt: skip
    with pytest.raises(
        ValueError, match="negative prompt's embeddings have 7 tokens and the prompt's 89"
    ):
        sd3("a fox", negative_prompt_embeds=text.double(),
            negative_pooled_prompt_embeds=pooled.double(), max_sequence_length=TOKENS)  # fmt: skip
    with pytest.raises(ValueError, match="multiples of 4"):  # f = 2 times the patch 2
        sd3("a fox", height=18)
    with pytest.raises(ValueError, match="multiples of 4"):  # f = 2 times FLUX's 2 × 2 packing
        flux("a fox", width=18)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, h, w\)"):
        flux("a fox", latents=torch.zeros(1, 4, 7, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_sequence_length"):
        flux("a fox", max_sequence_length=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        flux("a fox", guidance_scale=-1.0, max_sequence_length=TOKENS)
    with pytest.raises(ValueError, match="diffusion scheduler but the model is a flow"):
        sd3(
            "a fox",
            preset="sag-paper",
            loss_fn=lambda x: x.mean((1, 2, 3)),
            max_sequence_length=TOKENS,
        )
    with pytest.raises(TypeError, match="StableDiffusion3Pipeline"):
        GuidedStableDiffusion3.from_pipe(object())
    with pytest.raises(TypeError, match="flow-matching scheduler, got DDIMScheduler"):
        from diffusers import DDIMScheduler, FluxPipeline

        GuidedFlux.from_pipe(
            FluxPipeline(**{**pipes["flux"].components, "scheduler": DDIMScheduler()})
        )


def test_half_precision_weights_keep_sagkit_in_float32():
    """bfloat16 weights: the transformer runs in bfloat16 on float32 inputs; the conditioning,
    v and ε are float32, and v is exactly the bfloat16 network's output."""
    pipe = tiny_sd3(dtype=torch.bfloat16)
    guided = GuidedStableDiffusion3.from_pipe(pipe)
    assert guided.dtype == torch.float32
    cond, null = guided.encode("a fox", max_sequence_length=TOKENS)
    assert cond.dtype == null.dtype == torch.float32
    model = guided.model(null)
    z = guided.initial_noise(1, generator=seeded())
    t = float(model.schedule.t_of_sigma(0.5))
    text, pooled = unpack_text(cond.bfloat16(), width=32, pooled_width=32)
    with torch.no_grad():
        v = model.velocity(z, t, cond)
        net = pipe.transformer(z.bfloat16(), text, pooled, torch.tensor([500.0]), return_dict=False)
    assert v.dtype == model.eps(z, t, cond).dtype == torch.float32
    assert torch.equal(v, net[0].float())
    with pytest.raises(TypeError, match=r"weights are torch.bfloat16 .*pass x.float\(\)"):
        model.velocity(z.bfloat16(), t, cond)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(GUIDED))
def test_bfloat16_flow_pipeline_on_cuda(name):
    """bfloat16 weights on a GPU: SAG runs with float32 latents and gradients, finite."""
    build = {"sd3": tiny_sd3, "flux": tiny_flux}[name]
    pipe = build(dtype=torch.bfloat16).to("cuda")
    vision = tiny_clip_vision(dtype=torch.bfloat16).to("cuda")
    reference = torch.rand(3, 16, 16, device="cuda") * 2 - 1
    out = GUIDED[name].from_pipe(pipe)(
        PROMPTS, loss_fn=StyleLoss(vision, reference), steps=4, window=(0, 1), n=2,
        max_sequence_length=TOKENS, generator=torch.Generator("cuda").manual_seed(0),
        output_type="latent", progress=False,
    )  # fmt: skip
    assert out.images.dtype == torch.float32 and bool(torch.isfinite(out.images).all())
