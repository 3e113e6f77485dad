"""The guided video pipelines on tiny random components (sagkit.sd.tiny_video): AnimateDiff's
UNetMotionModel and TextToVideoSD's UNet3DConditionModel."""

import pytest
import torch
from helpers import (
    PROMPTS,
    WRONG_GRADIENT,
    RoundingChain,
    pair_bound,
    rel,
    roundoff_bound,
    seeded,
    unit_roundoff,
)

import sagkit as sk
from sagkit.sd.clip import StyleLoss
from sagkit.sd.tiny import tiny_clip_vision, tiny_pipeline
from sagkit.sd.tiny_video import tiny_animatediff, tiny_text_to_video
from sagkit.sd.video import GuidedVideo, decode_video, video_decoded_loss
from sagkit.sd.video_losses import FrameAverage, video_style_loss

FRAMES = 2
BUILDERS = {"animatediff": tiny_animatediff, "text-to-video": tiny_text_to_video}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pipe(request):
    return BUILDERS[request.param](dtype=torch.float64)


@pytest.fixture(scope="module")
def reference():
    return torch.rand(3, 24, 20, dtype=torch.float64, generator=seeded(3)) * 2 - 1


def test_unguided_run_is_the_diffusers_pipeline(pipe):
    """guidance="none": the pipeline's own loop from the same noise, to rounding; and the
    output decoded in chunks is the pipeline's own decode and post-processing."""
    guided = GuidedVideo.from_pipe(pipe)
    common = dict(num_frames=FRAMES, output_type="latent")
    with RoundingChain() as chain:  # the roundings behind each run, counted
        want = pipe(
            PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=4, guidance_scale=7.5,
            generator=seeded(), **common,
        ).frames  # fmt: skip
        got = guided(
            PROMPTS, "blurry", steps=4, cfg_scale=7.5, generator=seeded(), progress=False,
            **common,
        ).frames  # fmt: skip
    # the same float64 operations, up to the batch order of the CFG branches and the
    # timestep passed as τ = t·N − 1: each run within γ̃ of its counted chain of the exact one
    bounds = (roundoff_bound(chain.longest(r), torch.float64) for r in (got, want))
    assert got.shape == (2, 4, FRAMES, 8, 8) and got.dtype == torch.float64
    assert rel(got, want) <= pair_bound(*bounds)

    with RoundingChain() as chain:
        video = decode_video(pipe.vae, got, chunk=3)  # a chunk across the two videos
        frames = guided.decode(got, output_type="pt", decode_chunk_size=3).frames
    want = pipe.video_processor.postprocess_video(pipe.decode_latents(got), output_type="pt")
    assert frames.shape == want.shape == (2, FRAMES, 3, 16, 16)
    # diffusers casts the decoded video v to float32 (≤ u₃₂|v|) and post-processes in float32
    # (v/2 + 0.5 rounded once more, ≤ u₃₂|v/2 + 0.5|); the float64 decodes in other chunks
    # differ by the pair bound of their counted chain; the clamp to [0, 1] shrinks differences
    v = video.transpose(1, 2)
    float32 = unit_roundoff(torch.float32) * (v.abs() / 2 + (v / 2 + 0.5).abs())
    bound64 = roundoff_bound(chain.longest(video), torch.float64)
    bound = float(float32.norm()) * (1 + 1e-6) + pair_bound(bound64, bound64) * float(v.norm()) / 2
    assert float((frames - want).norm()) <= bound


def test_the_output_types_are_diffusers(pipe):
    guided = GuidedVideo.from_pipe(pipe)
    kwargs = dict(num_frames=2, steps=2, generator=seeded(), progress=False)
    default = guided("a fox", **kwargs).frames  # the pipeline's own default output type
    array = guided("a fox", output_type="np", **kwargs).frames
    pil = guided("a fox", output_type="pil", **kwargs).frames
    assert array.shape == (1, 2, 16, 16, 3)
    assert len(pil) == 1 and len(pil[0]) == 2 and pil[0][0].size == (16, 16)
    assert type(default) is (list if "AnimateDiff" in type(pipe).__name__ else type(array))


def test_chunked_decode_is_the_decoder_frame_by_frame(pipe):
    """Values and gradients of the chunked, checkpointed decode equal one plain decode of all
    frames, and the gradient reaches every frame of every chunk."""
    z = torch.randn(2, 4, FRAMES, 8, 8, dtype=torch.float64, generator=seeded(1))
    weights = torch.randn(2, 3, FRAMES, 16, 16, dtype=torch.float64, generator=seeded(2))
    s = pipe.vae.config.scaling_factor

    def plain(z):
        frames = (z / s).permute(0, 2, 1, 3, 4).reshape(2 * FRAMES, 4, 8, 8)
        video = pipe.vae.decode(frames).sample
        return video.reshape(2, FRAMES, 3, 16, 16).permute(0, 2, 1, 3, 4)

    results = {}
    with RoundingChain() as chain:
        for name, decode in (("chunked", lambda z: decode_video(pipe.vae, z, chunk=3)),
                             ("plain", plain)):  # fmt: skip
            leaf = z.clone().requires_grad_()
            video = decode(leaf)
            (grad,) = torch.autograd.grad((video * weights).sum(), leaf)
            results[name] = video.detach(), grad
    # the same float64 operations batched differently: each within γ̃ of its counted chain
    for got, want in zip(results["chunked"], results["plain"], strict=True):
        bound = roundoff_bound(max(chain.longest(got), chain.longest(want)), torch.float64)
        assert rel(got, want) <= pair_bound(bound, bound)
    grad = results["chunked"][1]
    assert bool((grad.abs().flatten(3).amax(3) > 0).all())  # every (video, channel, frame)


def gradient_setup(pipe, loss, *, chunk=3):
    guided = GuidedVideo.from_pipe(pipe)
    cond, null = guided.encode(PROMPTS)
    model = sk.ClassifierFreeGuidance(guided.model(null), null, 5.0)
    z = guided.initial_noise(2, num_frames=FRAMES, height=16, width=16, generator=seeded(1))
    return model, guided.latent_loss(loss, decode_chunk_size=chunk), z, cond


def test_symplectic_equals_backprop_through_chunked_decode_and_clip(pipe, vision, reference):
    """The 3-step estimate with CFG, the VAE decode in chunks (one across the two videos) and
    a CLIP loss over the clip's frames (per-frame style and temporal consistency): the
    engines agree."""
    loss = video_style_loss(vision, reference, temporal=2.0)
    model, latent_loss, z, cond = gradient_setup(pipe, loss)
    ts = sk.time_grid(model.schedule, 0.7, 0.0, 3)
    with RoundingChain() as chain:  # the roundings behind each gradient, counted
        _, g_bp = sk.loss_grad(model, latent_loss, z, ts, method="backprop", cond=cond)
        _, g_sa = sk.loss_grad(model, latent_loss, z, ts, method="symplectic", cond=cond)
    # two float64 roundings of the exact discrete gradient, each γ̃ over its counted chain
    bounds = (roundoff_bound(chain.longest(g), torch.float64) for g in (g_sa, g_bp))
    bound = pair_bound(*bounds)
    assert bound < WRONG_GRADIENT / 10 and rel(g_sa, g_bp) <= bound  # it can tell a wrong one
    assert bool((g_bp.abs().flatten(3).amax(3) > 0).all())  # every video, channel and frame


def test_symplectic_saved_bytes_are_flat_in_n(pipe, vision, reference):
    """Peak bytes saved for backward: one step's graph, the chunked decode and CLIP whatever n
    (and the n + 1 latent states), while backprop keeps every step's graph."""
    model, latent_loss, z, cond = gradient_setup(pipe, FrameAverage(StyleLoss(vision, reference)))
    saved = {}
    for method in ("symplectic", "backprop"):
        for n in (1, 2, 3):
            ts = sk.time_grid(model.schedule, 0.7, 0.0, n)
            report = sk.lab.profile_gradient(model, latent_loss, z, ts, method=method, cond=cond)
            assert report.complete
            saved[method, n] = report.saved_bytes
    state = z.numel() * z.element_size()
    assert 0 <= saved["symplectic", 3] - saved["symplectic", 1] <= 2 * state
    per_step = (saved["backprop", 3] - saved["backprop", 1]) / 2  # one step's graph
    assert per_step > 10 * state
    assert saved["backprop", 2] - saved["backprop", 1] >= 0.99 * per_step


def test_decoding_holds_one_chunk_of_activations(pipe, vision, reference):
    """The gradient of the decoded loss holds the decoder activations of one chunk of frames
    at a time: its saved bytes are bounded by the larger of CLIP's graph and a chunk's
    decoder graph (plus the latent frames the checkpoints keep), far below a plain decode's."""
    loss = FrameAverage(StyleLoss(vision, reference))
    vae = pipe.vae
    z = torch.randn(2, 4, FRAMES, 8, 8, dtype=torch.float64, generator=seeded(1))

    def saved_bytes(fn, x):
        leaf = x.clone().requires_grad_()
        return sk.lab.profile(
            lambda: torch.autograd.grad(fn(leaf).sum(), leaf), exclude=list(vae.parameters())
        ).saved_bytes

    def decode(x):
        return vae.decode(x).sample

    frames = 2 * FRAMES
    saved = {c: saved_bytes(video_decoded_loss(vae, loss, chunk=c), z) for c in (1, 2, frames)}
    per_frame = saved_bytes(decode, z[:1, :, 0])  # the plain decode of one frame, its input too
    every_frame = saved_bytes(decode, z.transpose(1, 2).reshape(frames, 4, 8, 8))
    with torch.no_grad():
        video = decode_video(vae, z)
    loss_graph = saved_bytes(loss, video)  # CLIP's graph on the decoded video
    state = z.numel() * z.element_size()
    for chunk in saved:
        assert saved[chunk] <= max(loss_graph, chunk * per_frame) + state
    assert saved[frames] >= every_frame  # one chunk of every frame: all activations at once
    assert max(loss_graph, per_frame) + state < every_frame  # so chunks of one frame hold less


def test_sag_with_one_step_is_freedom(pipe, vision, reference):
    guided = GuidedVideo.from_pipe(pipe)
    loss = FrameAverage(StyleLoss(vision, reference))
    kwargs = dict(
        num_frames=FRAMES, steps=4, window=(0.25, 0.75), output_type="latent", progress=False
    )
    sag = guided(PROMPTS, loss_fn=loss, guidance="sag", n=1, generator=seeded(), **kwargs)
    freedom = guided(PROMPTS, loss_fn=loss, guidance="freedom", generator=seeded(), **kwargs)
    plain = guided(PROMPTS, generator=seeded(), **kwargs)
    assert torch.equal(sag.frames, freedom.frames)
    assert not torch.equal(sag.frames, plain.frames)


def test_sag_lowers_the_video_style_loss(pipe, vision, reference):
    guided = GuidedVideo.from_pipe(pipe)
    loss = video_style_loss(vision, reference)
    kwargs = dict(num_frames=FRAMES, steps=4, window=(0.0, 1.0), num_videos_per_prompt=2)
    kwargs.update(generator=[seeded(0), seeded(1)], output_type="pt", progress=False)
    plain = guided("a fox", **kwargs).frames
    sag, losses = guided(
        "a fox", loss_fn=loss, scale=3.0, n=2, repeats=1, return_losses=True, **kwargs
    )
    assert sag.frames.shape == (2, FRAMES, 3, 16, 16) and losses.shape == (5, 2)
    assert 0 <= float(sag.frames.min()) and float(sag.frames.max()) <= 1
    with torch.no_grad():
        as_video = lambda frames: frames.transpose(1, 2) * 2 - 1  # noqa: E731
        assert float(loss(as_video(sag.frames)).sum()) < float(loss(as_video(plain)).sum())


def test_presets_and_schedulers_run_on_the_pipeline(pipe, vision, reference):
    from diffusers import DPMSolverMultistepScheduler

    guided = GuidedVideo.from_pipe(pipe)
    loss = FrameAverage(StyleLoss(vision, reference))
    dpm = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    for options in (dict(preset="sag-paper", steps=5), dict(sampler=dpm, steps=4)):
        out = guided(
            "a fox", loss_fn=loss, num_frames=2, generator=seeded(), output_type="latent",
            progress=False, **options,
        )  # fmt: skip
        assert out.frames.shape == (1, 4, 2, 8, 8) and bool(torch.isfinite(out.frames).all())


def test_bad_input_is_refused_naming_the_argument(pipe):
    guided = GuidedVideo.from_pipe(pipe)
    with pytest.raises(ValueError, match="output_type"):
        guided("a fox", output_type="gif")
    with pytest.raises(ValueError, match="decode_chunk_size"):
        guided("a fox", decode_chunk_size=0)
    with pytest.raises(ValueError, match="num_frames"):
        guided("a fox", num_frames=0)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, F, h, w\)"):
        guided("a fox", latents=torch.zeros(1, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_frames must be 3"):
        guided("a fox", num_frames=4, latents=torch.zeros(1, 4, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="AnimateDiffPipeline"):
        GuidedVideo.from_pipe(tiny_pipeline(latent_size=8))
    with pytest.raises(ValueError, match="x must have shape"):
        guided.model(guided.encode("a fox")[1]).eps(torch.zeros(1, 4, 8, 8), 0.5)
    with pytest.raises(ValueError, match="decode_chunk_size"):
        video_decoded_loss(pipe.vae, FrameAverage(lambda x: x.sum((1, 2, 3))), chunk=0)
    if hasattr(pipe, "enable_free_init"):  # AnimateDiff's FreeInit: another sampling loop
        pipe.enable_free_init(num_iters=2)
        try:
            with pytest.raises(ValueError, match="free_init"):
                guided("a fox", output_type="latent")
        finally:
            pipe.disable_free_init()


def test_half_precision_weights_keep_sagkit_in_float32():
    """bfloat16 weights: the UNet, the decoder and CLIP run in bfloat16; the latents, the
    gradients and the decoded video are float32."""
    pipe = tiny_animatediff(dtype=torch.bfloat16)
    vision = tiny_clip_vision(dtype=torch.bfloat16)
    guided = GuidedVideo.from_pipe(pipe)
    assert guided.dtype == torch.float32
    z = guided.initial_noise(1, num_frames=FRAMES, generator=seeded())
    assert z.dtype == torch.float32 and decode_video(pipe.vae, z).dtype == torch.float32
    reference = torch.rand(3, 16, 16, generator=seeded(2)) * 2 - 1
    out = guided(
        "a fox", loss_fn=FrameAverage(StyleLoss(vision, reference)), num_frames=FRAMES,
        steps=3, window=(0, 1), n=2, generator=seeded(), output_type="pt", progress=False,
    )  # fmt: skip
    assert out.frames.dtype == torch.float32 and bool(torch.isfinite(out.frames).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_video_pipeline_on_cuda():
    """float16 weights on a GPU: SAG runs with float32 latents and gradients, finite."""
    pipe = tiny_animatediff(dtype=torch.float16).to("cuda")
    vision = tiny_clip_vision(dtype=torch.float16).to("cuda")
    guided = GuidedVideo.from_pipe(pipe)
    reference = torch.rand(3, 16, 16, device="cuda") * 2 - 1
    out = guided(
        PROMPTS, loss_fn=video_style_loss(vision, reference, temporal=1.0), num_frames=4,
        steps=4, window=(0, 1), n=2, decode_chunk_size=3,
        generator=torch.Generator("cuda").manual_seed(0), output_type="latent", progress=False,
    )  # fmt: skip
    assert out.frames.dtype == torch.float32 and bool(torch.isfinite(out.frames).all())
