"""Property-based tests of the public API (hypothesis): random shapes, dtypes, batch sizes,
grids and argument values give either a documented error (``ValueError``/``TypeError``) or
finite output of the right shape; the exact engines agree with backprop on random problems.

Documented errors: batch size 0 (ValueError), float16/bfloat16 (TypeError), a guidance
window that holds no step (ValueError), a scheduler of another training schedule or with
repeated timesteps (ValueError). Schedulers, presets and the tiny Stable Diffusion pipeline get
properties of their own. Sizes are tiny so that the file runs in seconds.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sagkit as sk

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
BATCHES = st.sampled_from([0, 1, 3])


@st.composite
def problems(draw, *, dtype=None, batch=None):
    """A random small mixture, a batch x in its event shape, and a time grid."""
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    k = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn((k, *shape), generator=gen, dtype=torch.float64)
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    std = draw(st.floats(0.05, 1.0))
    model = sk.GaussianMixture(means, std, sk.VPSchedule.linear(), weights=weights)
    dtype = draw(DTYPES) if dtype is None else dtype
    b = (
        draw(BATCHES)
        if batch is None
        else draw(batch)
        if isinstance(batch, st.SearchStrategy)
        else batch
    )
    x = torch.randn((b, *shape), generator=gen, dtype=torch.float64).to(dtype)
    t_start = draw(st.floats(0.05, 1.0))
    t_end = draw(st.floats(0.0, 0.9)) * t_start
    n = draw(st.integers(1, 6))
    ts = sk.time_grid(model.schedule, t_start, t_end, n)
    return model, x, ts


def expected_error(x: torch.Tensor):
    """The documented error for x, or None."""
    if x.dtype not in (torch.float32, torch.float64):
        return TypeError
    if x.shape[0] == 0:
        return ValueError
    return None


def finite_like(out: torch.Tensor, x: torch.Tensor) -> None:
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool(torch.isfinite(out).all())


def errs_or_finite(call, x: torch.Tensor, error=None, *, match=None) -> None:
    """``call()`` raises the documented ``error`` (matching ``match``) when there is one, and
    returns finite output of x's shape and dtype otherwise."""
    event("documented error" if error is not None else "sampled")
    if error is not None:
        with pytest.raises(error, match=match):
            call()
        return
    finite_like(call(), x)


@SETTINGS
@given(problems(), st.sampled_from(sorted(sk.SOLVERS)))
def test_solve_errs_or_is_finite(problem, solver):
    model, x, ts = problem
    error = expected_error(x)
    if error is not None:
        with pytest.raises(error):
            sk.solve(model, x, ts, solver=solver)
        return
    finite_like(sk.solve(model, x, ts, solver=solver), x)


@SETTINGS
@given(
    problems(),
    st.one_of(st.floats(-0.5, 1.5), st.just(math.nan)),
    st.integers(-1, 4),
    st.sampled_from(["time", "lambda", "log"]),
)
def test_estimate_x0_errs_or_is_finite(problem, t, n, spacing):
    model, x, _ = problem
    error = expected_error(x)
    if error is None and not (0 < t <= 1 and n >= 1 and spacing in ("time", "lambda")):
        error = ValueError
    if error is None and spacing == "lambda" and t <= model.schedule.t_min:
        error = ValueError  # the λ grid ends at t_min: a t at or below it has no grid
    if error is not None:
        with pytest.raises(error):
            sk.estimate_x0(model, x, t, n=n, spacing=spacing)
        return
    finite_like(sk.estimate_x0(model, x, t, n=n, spacing=spacing), x)


@SETTINGS
@given(problems(dtype=torch.float64, batch=2), st.sampled_from(["x", "cond", "params"]))
def test_symplectic_matches_backprop_on_random_problems(problem, wrt):
    model, x, ts = problem
    k = model.means.shape[0]
    cond = torch.linspace(-0.5, 0.5, k, dtype=torch.float64)
    if wrt == "params":
        model.requires_grad_()
    target = torch.sin(torch.arange(x[0].numel(), dtype=torch.float64)).reshape(x.shape[1:])

    def loss(y):
        return ((y - target) ** 2).flatten(1).sum(1) + torch.cos(y).flatten(1).sum(1)

    results = [
        sk.loss_grad(model, loss, x, ts, method=m, cond=cond, wrt=wrt)
        for m in ("symplectic", "backprop")
    ]
    (loss_s, g_s), (loss_b, g_b) = results
    g_s = torch.cat([g.flatten() for g in (g_s if isinstance(g_s, tuple) else (g_s,))])
    g_b = torch.cat([g.flatten() for g in (g_b if isinstance(g_b, tuple) else (g_b,))])
    assert torch.isfinite(g_s).all()
    assert float(loss_s) == pytest.approx(float(loss_b), rel=1e-12)
    scale = float(g_b.norm())
    assert float((g_s - g_b).norm()) <= 1e-10 * max(scale, 1e-300) + 1e-300


@SETTINGS
@given(problems(), st.sampled_from(["symplectic", "backprop", "adjoint"]))
def test_loss_grad_errs_or_is_finite(problem, method):
    model, x, ts = problem

    def loss(y):
        return (y**2).flatten(1).sum(1)

    error = expected_error(x)
    if error is not None:
        with pytest.raises(error):
            sk.loss_grad(model, loss, x, ts, method=method)
        return
    value, g = sk.loss_grad(model, loss, x, ts, method=method)
    assert value.ndim == 0 and math.isfinite(float(value))
    finite_like(g, x)


@SETTINGS
@given(
    problems(dtype=torch.float64, batch=st.sampled_from([0, 1, 1, 3, 3, 3])),
    st.integers(1, 5),
    st.sampled_from(sorted(sk.GUIDANCE)),
    st.sampled_from([0.0, 0.0, 0.25, 0.5, 0.6]),
    st.sampled_from([0.1, 0.55, 0.8, 1.0, 1.0]),
    st.sampled_from([None, None, None, 0.5, 2.0, math.nan, -1.0]),
)
def test_guided_sample_errs_or_is_finite(problem, steps, guidance, lo, hi, scale):
    model, x, _ = problem

    def loss(y):
        return (y**2).flatten(1).sum(1)

    guided = [lo <= k / steps < hi for k in range(steps)]
    error = None
    if x.shape[0] == 0 or not lo < hi:
        error = ValueError
    elif guidance != "none" and not any(guided):
        error = ValueError  # "the guidance window ... holds no step"
    elif scale is not None and not scale >= 0:
        error = ValueError
    call = lambda: sk.guided_sample(  # noqa: E731
        model,
        loss,
        x,
        steps=steps,
        guidance=guidance,
        n=2,
        window=(lo, hi),
        scale=scale,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    errs_or_finite(call, x, error)


@functools.cache
def digits_unet():
    return sk.digits.load_pretrained("digits", device="cpu", dtype=torch.float64)


SCHEDULERS = st.sampled_from(
    ["DDIMScheduler", "DPMSolverMultistepScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
     "UniPCMultistepScheduler", "HeunDiscreteScheduler"]
)  # fmt: skip
FEW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FEW
@given(
    SCHEDULERS,
    st.integers(1, 5),
    st.sampled_from(["none", "freedom", "dps", "sag", "backward"]),
    st.sampled_from(["to-zero", "sampler"]),
    st.integers(1, 3),
    st.sampled_from([2, 1, 0]),
)
def test_any_scheduler_errs_or_is_finite(name, steps, guidance, grid, batch, offset):
    """Any diffusers scheduler, of the model's schedule or of another one (``offset``: another
    num_train_timesteps), as the base sampler: a documented error or finite samples."""
    import diffusers

    model = digits_unet()
    overrides = {} if offset == 0 else {"num_train_timesteps": 1000 - 100 * offset}
    sampler = getattr(diffusers, name).from_config(model.scheduler.config, **overrides)
    x = torch.randn((batch, 1, 16, 16), generator=torch.Generator().manual_seed(1)).double()
    call = lambda: sk.guided_sample(  # noqa: E731
        model, lambda y: (y**2).flatten(1).sum(1), x, steps=steps, guidance=guidance, n=2,
        window=(0.0, 1.0), sampler=sampler, estimate_grid=grid, progress=False,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    # another schedule; repeated timesteps (Heun repeats every timestep but the first, so its
    # single step is one network call and is accepted)
    refused = offset or (name == "HeunDiscreteScheduler" and steps > 1)
    error = ValueError if refused else None
    errs_or_finite(call, x, error, match="another training schedule|a repeated timestep")


@FEW
@given(
    st.sampled_from(list(sk.PRESETS)),
    st.integers(1, 6),
    st.one_of(st.none(), st.integers(1, 4)),
    st.booleans(),
)
def test_presets_at_any_size_are_finite(preset, steps, n, conditional):
    """Every preset at any number of steps, with or without a CFG condition, an n override:
    finite samples of x's shape (a preset's window may hold no step of very few steps: then
    the documented error)."""
    model = digits_unet()
    x = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(1)).double()
    cond = model.cond_for([3]) if conditional else None
    window = sk.PRESETS[preset].window
    call = lambda: sk.guided_sample(  # noqa: E731
        model, lambda y: (y**2).flatten(1).sum(1), x, preset=preset, steps=steps, n=n,
        cond=cond, progress=False, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    guided = any(window[0] <= k / steps < window[1] for k in range(steps))
    errs_or_finite(call, x, None if guided else ValueError, match="holds no step")


@functools.cache
def tiny_sd():
    from sagkit.sd.pipeline import GuidedStableDiffusion
    from sagkit.sd.tiny import tiny_pipeline

    return GuidedStableDiffusion.from_pipe(tiny_pipeline(latent_size=8, dtype=torch.float64))


@FEW
@given(
    st.lists(st.sampled_from(["a fox", "a lighthouse", ""]), min_size=1, max_size=2),
    st.integers(1, 2),
    st.sampled_from(["none", "freedom", "sag", "backward"]),
    st.integers(1, 3),
    st.one_of(st.none(), st.floats(0.0, 9.0)),
)
def test_tiny_stable_diffusion_is_finite(prompts, per_prompt, guidance, steps, cfg_scale):
    """The guided pipeline on random prompts, batch sizes, methods, steps and CFG scales:
    finite latents of (prompts × per prompt, 4, 8, 8)."""
    event(guidance)
    out = tiny_sd()(
        prompts, loss_fn=lambda z: z.flatten(1).pow(2).mean(1), guidance=guidance, steps=steps,
        window=(0.0, 1.0), cfg_scale=cfg_scale, num_images_per_prompt=per_prompt,
        output_type="latent", progress=False, generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert out.shape == (len(prompts) * per_prompt, 4, 8, 8)
    assert bool(torch.isfinite(out).all())


@SETTINGS
@given(st.one_of(st.integers(-3, 3), st.booleans(), st.floats(-2, 2), st.text(max_size=2)))
def test_counts(value):
    from sagkit.core.checks import check_count

    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        assert check_count(value, "n") == value
    else:
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            check_count(value, "n")


@SETTINGS
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3)))
def test_scales(value):
    from sagkit.core.checks import check_scale

    if math.isfinite(value) and value >= 0:
        assert check_scale(value, "scale") == float(value)
    else:
        with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
            check_scale(value, "scale")
