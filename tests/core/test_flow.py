"""Rectified flow (SD3's and FLUX's schedule): the schedule, the velocity frame, the mixture's
exact velocity, and solves that start at t = 1 where α = 0 (docs/maths.md §1.5, §2.5, §4.3).

The exactness tests elsewhere take the ``mixture`` fixture (the VP schedule), and run under the
flow too where the flow changes the code path (``BOTH_SCHEDULES`` in tests/helpers.py)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from helpers import RoundingChain, mixture_under, roundoff_bound

import sagkit as sk
from sagkit.core.frames import VelocityFrame, get_frame, ode_frame

U64 = torch.finfo(torch.float64).eps / 2


def _randn(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gaussian(schedule):
    """One Gaussian N(μ, s² I), s = 0.3: the ODE flow map is linear in closed form."""
    mu = torch.tensor([[[0.5, -0.3], [0.2, 0.8]]], dtype=torch.float64)[:, None]
    return sk.GaussianMixture(mu, 0.3, schedule)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_schedule_formulas(shift):
    sc = sk.FlowSchedule.rectified(shift=shift)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    sigma = shift * t / (1 + (shift - 1) * t)
    # a few roundings of t-sized numbers each: 8u
    torch.testing.assert_close(sc.sigma(t), sigma, rtol=8 * U64, atol=8 * U64)
    torch.testing.assert_close(sc.alpha(t), 1 - sigma, rtol=8 * U64, atol=8 * U64)
    inner = t[1:-1]
    lam = sc.lam(inner)
    torch.testing.assert_close(lam, torch.log(sc.alpha(inner) / sc.sigma(inner)))
    # t(λ(t)) = t: the inverse's sigmoid and division lose a few u relative to t
    torch.testing.assert_close(sc.t_of_lam(lam), inner, rtol=16 * U64, atol=16 * U64)
    torch.testing.assert_close(sc.t_of_sigma(sc.sigma(t)), t, rtol=16 * U64, atol=16 * U64)
    assert sc.lam(1.0) == -math.inf and sc.lam(0.0) == math.inf
    assert sc.t_of_lam(-math.inf) == 1.0 and sc.t_of_lam(math.inf) == 0.0
    assert sc.alpha(1.0) == 0.0 and sc.ode is VelocityFrame


def test_from_diffusers_visits_the_schedulers_sigmas():
    """FlowMatchEuler's σ's, shifted from a uniform grid, are σ_t on sagkit's uniform grid."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sc = sk.FlowSchedule.from_diffusers(scheduler)
    assert (sc.shift, sc.num_train_timesteps) == (3.0, 1000)
    scheduler.set_timesteps(10)
    # diffusers ends its uniform grid at its shifted training σ_min = σ(1/N), then shifts again
    t = torch.linspace(1.0, float(sc.sigma(1.0 / sc.num_train_timesteps)), 10, dtype=torch.float64)
    # diffusers computes its σ's in float32: one float32 rounding of each of a few operations
    u32 = torch.finfo(torch.float32).eps / 2
    torch.testing.assert_close(
        scheduler.sigmas[:-1].double(), sc.sigma(t), rtol=8 * u32, atol=8 * u32
    )
    with pytest.raises(TypeError, match="not a flow-matching scheduler"):
        sk.FlowSchedule.from_diffusers(DDPMScheduler())
    for shift in (0.0, -1.0, math.inf, math.nan):  # an infinite shift: σ = ∞/∞, NaN
        with pytest.raises(ValueError, match="shift must be a positive finite number"):
            sk.FlowSchedule.rectified(shift=shift)


# α = 0 (the prior-mean branch) only under the flow at t = 1; at the other times both schedules
# run the same code, so the flow there would repeat the VP cases on other numbers
@pytest.mark.parametrize(
    "mixture, t",
    [("vp", 0.0), ("vp", 0.3), ("vp", 0.7), ("vp", 1.0), ("flow", 1.0)],
    indirect=["mixture"],
)
def test_mixture_velocity_and_posterior_mean(mixture, t):
    """v = ε − x̂0, x̂0 = E[x_0 | x_t] finite everywhere; at α = 0 it is the prior mean."""
    x, cond = _randn((4, 1, 2, 2)), _randn((4, 3), seed=1)
    v, x0, eps = (f(x, t, cond) for f in (mixture.velocity, mixture.x0, mixture.eps))
    assert torch.isfinite(v).all() and torch.isfinite(x0).all()
    torch.testing.assert_close(v, eps - x0, rtol=0, atol=0)
    sc = mixture.schedule
    if 0 < sc.alpha(t):
        # Tweedie's (x − σ ε)/α: rounding of order u |x|/α
        torch.testing.assert_close(
            x0, (x - sc.sigma(t) * eps) / sc.alpha(t), rtol=64 * U64, atol=64 * U64 / sc.alpha(t)
        )
    else:  # α = 0: x_1 = ε carries nothing about x_0; the posterior is the (conditioned) prior
        prior = torch.softmax(mixture.log_weights + cond, -1) @ mixture.means.flatten(1)
        torch.testing.assert_close(x0, prior.view_as(x), rtol=8 * U64, atol=8 * U64)
        # ε = −σ ∇log p = Σ_k w_k x with Σ_k w_k = 1 up to K roundings: 8u |x|
        torch.testing.assert_close(v, x - x0, rtol=0, atol=8 * U64 * float(x.abs().max()))


def test_velocity_frame_euler_is_ddim():
    """The Euler step of the velocity frame is DDIM, α_s x̂0 + σ_s ε̂, and for the rectified
    flow it is x + (σ_s − σ_t) v: the step of FlowMatchEulerDiscreteScheduler."""
    model = mixture_under(sk.FlowSchedule.rectified(shift=3.0))
    sc, frame = model.schedule, ode_frame(model.schedule)
    x = _randn((3, 1, 2, 2))
    for t, s in ((1.0, 0.8), (0.6, 0.35), (0.2, 0.0)):
        v = model.velocity(x, t)
        step = frame.euler(sc, x, t, s, v)
        x0 = frame.x0(sc, x, t, v)
        eps = x0 + v  # v = ε − x̂0
        # rounding of a few operations on numbers of size |x|: 16u max|x|
        tol = 16 * U64 * float(x.abs().max() + v.abs().max())
        torch.testing.assert_close(step, sc.alpha(s) * x0 + sc.sigma(s) * eps, rtol=0, atol=tol)
        torch.testing.assert_close(step, x + (sc.sigma(s) - sc.sigma(t)) * v, rtol=0, atol=tol)
        torch.testing.assert_close(frame.pred_of_x0(sc, x, t, x0), v, rtol=0, atol=tol)


def test_solve_from_t1_converges_to_the_closed_form():
    """From t = 1 (α = 0) the ODE of one Gaussian maps x_1 to μ + s x_1: DDIM converges at
    order 1 and RK4 at order 4 in the velocity frame; n = 1 is the posterior mean μ."""
    model = gaussian(sk.FlowSchedule.rectified(shift=3.0))
    mu = model.means[0]
    x1 = _randn((2, 1, 2, 2))
    exact = mu + model.std * x1  # (x_1 − α_1 μ)/sqrt(v_1) = x_1, v_1 = 1
    torch.testing.assert_close(sk.estimate_x0(model, x1, 1.0), mu.expand_as(x1))

    def errors(solver, ns):
        grids = (sk.time_grid(model.schedule, 1.0, 0.0, n) for n in ns)
        return [float((sk.solve(model, x1, ts, solver=solver) - exact).abs().max()) for ts in grids]

    ddim = errors("ddim", (64, 128))
    assert abs(math.log2(ddim[0] / ddim[1]) - 1) < 0.1, ddim
    # RK4's O(h⁴) error shrinks by 2⁴ per halving of h in the limit: demand at least 2³ (the
    # 8-component error is not yet in its asymptotic regime at these n: measured 2^6.5, 2^8)
    rk4 = errors("rk4", (8, 16, 32))
    assert rk4[1] <= rk4[0] / 2**3 and rk4[2] <= rk4[1] / 2**3, rk4


def test_engines_are_exact_from_t1():
    """Symplectic adjoint and checkpointing equal backprop through a solve from t = 1."""
    model = mixture_under(sk.FlowSchedule.rectified(shift=3.0))
    x = _randn((2, 1, 2, 2))
    ts = sk.time_grid(model.schedule, 1.0, 0.0, 6)
    target = _randn((2, 1, 2, 2), seed=5)

    def loss(y):
        return ((y - target) ** 2).flatten(1).sum(1)

    with RoundingChain() as chain:
        _, g_bp = sk.loss_grad(model, loss, x, ts, method="backprop", solver="heun")
    bound = roundoff_bound(chain.longest(g_bp), torch.float64)
    for method in ("symplectic", "checkpoint"):
        _, g = sk.loss_grad(model, loss, x, ts, method=method, solver="heun")
        # two float64 orderings of one computation: each within γ of its chain, relative to |g|
        assert float((g - g_bp).abs().max()) <= 2 * bound * float(g_bp.abs().max()) * 16


def test_frames_that_need_alpha_refuse_t1():
    model = mixture_under(sk.FlowSchedule.rectified())
    x = _randn((2, 1, 2, 2))
    ts = sk.time_grid(model.schedule, 1.0, 1e-3, 4)
    with pytest.raises(ValueError, match="'eps' frame needs α > 0"):
        sk.adjointdeis_grad(model, lambda y: y.sum(), x, ts, parameterisation="eps")
    with pytest.raises(ValueError, match="'eps-sde' frame needs α > 0"):
        sk.sde_sample(model, x, ts)
    with pytest.raises(ValueError, match="finite λ at t_start"):
        sk.time_grid(model.schedule, 1.0, 1e-3, 4, spacing="lambda")
    assert get_frame("velocity").name == "velocity"
    with pytest.raises(ValueError, match="no SDE frame"):
        get_frame("velocity", sde=True)
