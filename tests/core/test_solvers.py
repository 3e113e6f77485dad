"""The RK solvers: convergence orders, DDIM against diffusers' scheduler and the paper's formula, bad arguments."""

import math

import numpy as np
import pytest
import torch
from helpers import (
    BOTH_SCHEDULES,
    RoundingChain,
    exact_flow,
    one_gaussian,
    pair_bound,
    rel,
    roundoff_bound,
    tiny_unet,
)

import sagkit as sk


# The float64 tolerances below (1e-14 … 1e-9) bound identities that a few dozen float64
# operations evaluate on O(1) numbers: γ_N = N · 1.1e-16 ≈ 1e-15 for such N, so each leaves
# ≥ 10 γ_N for rounding (1e-10 and 1e-9 also for cancellation in a closed-form inverse and a
# difference of λs), while staying ≪ the 1e-2 error of a wrong formula.
@pytest.mark.parametrize("spacing", ["time", "lambda"])
@pytest.mark.parametrize("solver,order", [("ddim", 1), ("heun", 2), ("rk4", 4)])
def test_solver_convergence_order(solver, order, spacing):
    model = one_gaussian(sk.VPSchedule.linear())
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t, s = 0.9, 0.05
    exact = exact_flow(model, x, t, s)
    ns = [16, 32, 64, 128]
    errors = []
    for n in ns:
        out = sk.solve(
            model, x, sk.time_grid(model.schedule, t, s, n, spacing=spacing), solver=solver
        )
        errors.append(float((out - exact).abs().max()))
    slope = -np.polyfit(np.log(ns), np.log(errors), 1)[0]
    assert slope == pytest.approx(order, abs=0.15), f"{solver}: errors {errors}"


def test_ddim_matches_diffusers_scheduler(scheduler):
    unet = tiny_unet().eval()
    model = sk.DiffusersModel(unet, scheduler)
    scheduler.set_timesteps(20)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = x.clone()
    with torch.no_grad(), RoundingChain() as chain:
        for k in scheduler.timesteps:
            eps = unet(ref, k).sample
            ref = scheduler.step(eps, k, ref, eta=0.0).prev_sample
        n = scheduler.config.num_train_timesteps
        ts = [(int(k) + 1) / n for k in scheduler.timesteps] + [0.0]  # the final α is 1
        ours = sk.solve(model, x, ts, solver="ddim")
    # two float32 roundings of the same DDIM map, each within its bound over its counted chain;
    # diffusers' ᾱ come from a float32 cumprod of T factors made before, which lengthens its chain
    chains = (chain.longest(ours), chain.longest(ref) + scheduler.config.num_train_timesteps)
    assert rel(ours, ref) <= pair_bound(*(roundoff_bound(c, torch.float32) for c in chains))


@BOTH_SCHEDULES
def test_ddim_step_is_the_paper_formula(mixture):
    """x_s = (α_s/α_t) x_t − σ_s (e^h − 1) ε(x_t, t), h = λ_s − λ_t (docs/maths.md §2.2)."""
    sch = mixture.schedule
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t, s = 0.7, 0.4
    h = sch.lam(s) - sch.lam(t)
    expected = sch.alpha(s) / sch.alpha(t) * x - sch.sigma(s) * math.expm1(h) * mixture.eps(x, t)
    assert torch.allclose(sk.solve(mixture, x, [t, s], solver="ddim"), expected, rtol=1e-13)


def test_bad_n_solver_spacing_grid(mixture):
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        sk.estimate_x0(mixture, x, 0.5, n=0)
    with pytest.raises(ValueError, match="unknown solver 'euler'.*ddim, heun, rk4"):
        sk.solve(mixture, x, [0.5, 0.0], solver="euler")
    with pytest.raises(ValueError, match="spacing must be"):
        sk.time_grid(mixture.schedule, 0.5, 0.0, 4, spacing="log")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sk.solve(mixture, x, [0.5, 0.6, 0.0])
    with pytest.raises(ValueError, match="needs t_end > 0"):
        sk.time_grid(mixture.schedule, 0.5, 0.0, 4, spacing="lambda")
