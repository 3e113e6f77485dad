"""Guided sampling on a rectified flow: FlowMatchEulerDiscreteScheduler as the base sampler,
sagkit's DDIM in the velocity frame, and every method from t = 1, where α = 0
(docs/maths.md §2.5, §8.1)."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from helpers import RoundingChain, mixture_under, roundoff_bound

import sagkit as sk
from sagkit.core.frames import get_frame
from sagkit.guidance.base import make_base
from sagkit.guidance.methods import estimate_times, guidance_gradient
from sagkit.guidance.sampler import guided_sample

U64 = torch.finfo(torch.float64).eps / 2


@pytest.fixture
def scheduler():
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


@pytest.fixture
def flow_mixture(scheduler):
    """The test mixture under SD3's schedule (shift 3, N = 1000), with a null condition."""
    model = mixture_under(sk.FlowSchedule.from_diffusers(scheduler))
    model.null_cond = torch.zeros(1, 3, dtype=torch.float64)
    return model


def _randn(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _target_loss(model):
    target = model.means[2].detach()
    return lambda y: ((y - target) ** 2).flatten(1).mean(1)


def test_unguided_flow_match_euler_is_diffusers_loop(flow_mixture, scheduler):
    x_T = _randn((3, 1, 2, 2))
    steps = 12
    ours = guided_sample(
        flow_mixture, None, x_T, guidance="none", steps=steps, sampler=scheduler, progress=False
    )
    loop = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    loop.set_timesteps(steps)
    sc, x = flow_mixture.schedule, x_T
    for tau, sigma in zip(loop.timesteps, loop.sigmas, strict=False):
        v = flow_mixture.velocity(x, float(sc.t_of_sigma(float(sigma))))
        x = loop.step(v, tau, x).prev_sample
    # sagkit evaluates v at κ_t (x/κ_t), κ = (1 − σ) + σ within 2u of 1: each step's input is
    # off by ≤ 4u|x|, which the step carries on with a Lipschitz factor near 1: 8u|x| a step
    bound = steps * 8 * U64 * float(x.abs().max())
    torch.testing.assert_close(ours, x, rtol=0, atol=bound)


def test_ddim_base_is_the_velocity_frame_solve(flow_mixture):
    """sagkit's DDIM unguided is the DDIM solve from t = 1 in the velocity frame, bit for bit."""
    x_T = _randn((3, 1, 2, 2))
    ours = guided_sample(flow_mixture, None, x_T, guidance="none", steps=10, progress=False)
    ts = sk.time_grid(flow_mixture.schedule, 1.0, 0.0, 10)
    assert torch.equal(ours, sk.solve(flow_mixture, x_T, ts))


@pytest.mark.parametrize("sampler", ["ddim", "scheduler"])
def test_sag_with_one_step_is_freedom_and_guidance_lowers_the_loss(
    flow_mixture, scheduler, sampler
):
    x_T, loss = _randn((6, 1, 2, 2), seed=1), _target_loss(flow_mixture)
    kw = {
        "steps": 16,
        "sampler": scheduler if sampler == "scheduler" else "ddim",
        "window": (0.0, 0.8),
        "generator": None,
        "progress": False,
    }

    def run(guidance, **more):
        gen = torch.Generator().manual_seed(7)
        return guided_sample(
            flow_mixture, loss, x_T, guidance=guidance, **{**kw, "generator": gen}, **more
        )

    freedom, sag1 = run("freedom"), run("sag", n=1)
    assert torch.equal(freedom, sag1)
    plain = run("none")
    for guidance, more in (("sag", {"n": 3}), ("freedom", {}), ("dps", {}), ("backward", {})):
        guided = run(guidance, **more)
        assert float(loss(guided).mean()) < float(loss(plain).mean()), guidance


def test_estimate_gradient_is_exact_from_the_top(flow_mixture, scheduler):
    """At the scheduler's first step (t = 1, α = 0), on the sampler's own grid, the symplectic
    adjoint equals backprop through the n-step estimate."""
    base = make_base(scheduler, flow_mixture, 10)
    assert base.times[0] == 1.0 and base.times[-1] == 0.0
    x_T, loss = _randn((2, 1, 2, 2), seed=2), _target_loss(flow_mixture)
    for k in (0, 4):
        ts = estimate_times(base.times, k, 3, grid="sampler", schedule=flow_mixture.schedule)
        with RoundingChain() as chain:
            _, g_bp = guidance_gradient(
                flow_mixture, loss, x_T, base.times[k], ts=ts, gradient="backprop"
            )
        _, g = guidance_gradient(
            flow_mixture, loss, x_T, base.times[k], ts=ts, gradient="symplectic"
        )
        # two float64 orderings of one computation, each within γ over its chain, relative to
        # the gradient's size
        bound = 2 * roundoff_bound(chain.longest(g_bp), torch.float64) * float(g_bp.abs().max())
        assert float((g - g_bp).abs().max()) <= bound, k


def test_cfg_difference_is_in_eps_units(flow_mixture):
    """Under CFG the RMS rule's Δ is ε_c − ε_u whatever the frame: Δε = (α/(α + σ)) Δv."""
    cfg = sk.ClassifierFreeGuidance(flow_mixture, flow_mixture.null_cond, 3.0)
    x, cond = _randn((4, 1, 2, 2)), _randn((4, 3), seed=3)
    sc, t = flow_mixture.schedule, 0.4
    v, dv = cfg.predict_and_difference(x, t, cond, frame=get_frame("velocity"))
    eps, de = cfg.predict_and_difference(x, t, cond, frame=get_frame("eps"))
    # ε and v are affine in each other at fixed x: rounding of a few operations, 16u
    tol = 16 * U64 * float(de.abs().max() + v.abs().max())
    torch.testing.assert_close(
        get_frame("velocity").eps_difference(sc, t, dv), de, rtol=0, atol=tol
    )
    torch.testing.assert_close(cfg.velocity(x, t, cond), v, rtol=0, atol=0)
    x_T = _randn((4, 1, 2, 2), seed=4)
    out = guided_sample(
        flow_mixture,
        _target_loss(flow_mixture),
        x_T,
        guidance="sag",
        cond=cond,
        cfg_scale=2.0,
        steps=8,
        progress=False,
    )
    assert torch.isfinite(out).all()


def test_schedulers_of_the_other_kind_are_refused(flow_mixture, scheduler):
    x_T = _randn((2, 1, 2, 2))
    with pytest.raises(ValueError, match="diffusion scheduler but the model is a flow"):
        guided_sample(flow_mixture, None, x_T, guidance="none", sampler=DDPMScheduler())
    vp_mixture = mixture_under(sk.VPSchedule.from_diffusers(DDPMScheduler()))
    with pytest.raises(ValueError, match="flow-matching scheduler but the model's schedule"):
        guided_sample(vp_mixture, None, x_T, guidance="none", sampler=scheduler)
