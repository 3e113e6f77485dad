"""Schedules, exact models, solvers and estimates (the foundation every other module uses)."""

import math

import numpy as np
import pytest
import torch
from helpers import RoundingChain, pair_bound, rel, roundoff_bound, tiny_unet

import sagkit as sk

# The float64 tolerances below (1e-14 … 1e-9) bound identities that a few dozen float64
# operations evaluate on O(1) numbers: γ_N = N · 1.1e-16 ≈ 1e-15 for such N, so each leaves
# ≥ 10 γ_N for rounding (1e-10 and 1e-9 also for cancellation in a closed-form inverse and a
# difference of λs), while staying ≪ the 1e-2 error of a wrong formula.
SCHEDULES = {
    "linear": sk.VPSchedule.linear(),
    "cosine": sk.VPSchedule.cosine(),
}


def _diffusers_schedule():
    from diffusers import DDPMScheduler

    return sk.VPSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000))


@pytest.mark.parametrize("name", ["linear", "cosine", "diffusers"])
def test_schedule_identities(name):
    sched = _diffusers_schedule() if name == "diffusers" else SCHEDULES[name]
    t = torch.linspace(1e-3, 1.0, 257, dtype=torch.float64)
    assert torch.allclose(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, torch.ones_like(t), atol=1e-14)
    lam = sched.lam(t)
    assert bool((lam[1:] < lam[:-1]).all()), "λ must decrease strictly in t"
    assert (sched.t_of_lam(lam) - t).abs().max() < 1e-10
    # floats in, floats out; tensors keep their dtype
    assert isinstance(sched.alpha(0.5), float)
    assert sched.sigma(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float32
    assert sched.alpha(0.0) == pytest.approx(1.0)


def test_from_diffusers_reproduces_alphas_cumprod(scheduler):
    sched = sk.VPSchedule.from_diffusers(scheduler)
    n = scheduler.config.num_train_timesteps
    t_n = (torch.arange(n, dtype=torch.float64) + 1) / n  # t_n = (n + 1) / N
    expected = scheduler.alphas_cumprod.double()
    assert torch.allclose(sched.alpha(t_n) ** 2, expected, rtol=1e-12, atol=0)
    assert sched.num_train_timesteps == n


def test_linear_schedule_matches_closed_form():
    sched = sk.VPSchedule.linear(0.1, 20.0)
    t = 0.37
    assert sched.log_alpha(t) == pytest.approx(-0.25 * t**2 * 19.9 - 0.05 * t, rel=1e-14)


def _brute_force_log_density(model, x, t):
    """log p_t(x) for the diffused mixture, written out component by component."""
    alpha, sigma = model.schedule.alpha(t), model.schedule.sigma(t)
    var = alpha**2 * model.std**2 + sigma**2
    d = x[0].numel()
    terms = []
    for k in range(model.means.shape[0]):
        diff = (x - alpha * model.means[k]).flatten(1)
        log_norm = -0.5 * d * math.log(2 * math.pi * var)
        terms.append(model.log_weights[k] + log_norm - diff.pow(2).sum(1) / (2 * var))
    return torch.logsumexp(torch.stack(terms), dim=0)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.8, 1.0])
def test_mixture_eps_is_scaled_score(mixture, t):
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    score = torch.autograd.grad(_brute_force_log_density(mixture, x, t).sum(), x)[0]
    sigma = mixture.schedule.sigma(t)
    assert torch.allclose(mixture.eps(x, t), -sigma * score, rtol=1e-10, atol=1e-12)


def test_mixture_x0_is_posterior_mean(mixture):
    """E[x_0 | x_t]: each component's Gaussian posterior mean, weighted by its responsibility."""
    t = 0.4
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    alpha, sigma = mixture.schedule.alpha(t), mixture.schedule.sigma(t)
    s2 = mixture.std**2
    var = alpha**2 * s2 + sigma**2
    logits, posts = [], []
    for k in range(3):
        mu = mixture.means[k]
        logits.append(
            mixture.log_weights[k] - (x - alpha * mu).flatten(1).pow(2).sum(1) / (2 * var)
        )
        posts.append(mu + alpha * s2 / var * (x - alpha * mu))  # Gaussian conditioning
    w = torch.softmax(torch.stack(logits, 1), 1)
    expected = sum(w[:, k, None, None, None] * posts[k] for k in range(3))
    assert torch.allclose(mixture.x0(x, t), expected, rtol=1e-12, atol=1e-13)


def test_mixture_cond_logits_shift_weights(mixture):
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    assert torch.allclose(mixture.eps(x, 0.5, cond=torch.zeros(3)), mixture.eps(x, 0.5))
    favour_first = torch.tensor([[50.0, 0.0, 0.0]], dtype=torch.float64)
    one = sk.GaussianMixture(mixture.means[:1], mixture.std, mixture.schedule)
    # the other components keep weights ≈ e^-50 ≈ 2e-22; rounding γ_N |ε| ≈ 1e-15 ≪ 1e-12
    assert torch.allclose(mixture.eps(x, 0.5, cond=favour_first), one.eps(x, 0.5), atol=1e-12)


def test_mixture_sample_statistics(mixture):
    x = mixture.sample(20000, generator=torch.Generator().manual_seed(0))
    mean = (mixture.log_weights.exp()[:, None, None, None] * mixture.means).sum(0)
    assert x.shape == (20000, 1, 2, 2)
    # the sample mean is off by a standard error sd/√n per pixel: allow 6 of them
    assert torch.allclose(x.mean(0), mean, atol=6 * float(x.std(0).max()) / math.sqrt(len(x)))


def test_digits_mixture():
    m = sk.GaussianMixture.digits(n_components=100, size=16)
    assert m.means.shape == (100, 1, 16, 16)
    assert float(m.means.min()) >= -1 - 1e-9 and float(m.means.max()) <= 1 + 1e-9
    assert m.labels.shape == (100,) and set(m.labels.tolist()) <= set(range(10))


def _one_gaussian(schedule):
    mu = torch.tensor([[[0.7, -1.2], [0.4, 2.0]]], dtype=torch.float64)[:, None]
    return sk.GaussianMixture(mu, 0.5, schedule)


def _exact_flow(model, x_t, t, s):
    """x_s = α_s μ + sqrt(v_s / v_t)(x_t − α_t μ) for one Gaussian (MATH §4)."""
    sch, mu = model.schedule, model.means[0]

    def v(u):
        return sch.alpha(u) ** 2 * model.std**2 + sch.sigma(u) ** 2

    return sch.alpha(s) * mu + math.sqrt(v(s) / v(t)) * (x_t - sch.alpha(t) * mu)


@pytest.mark.parametrize("spacing", ["time", "lambda"])
@pytest.mark.parametrize("solver,order", [("ddim", 1), ("heun", 2), ("rk4", 4)])
def test_solver_convergence_order(solver, order, spacing):
    model = _one_gaussian(sk.VPSchedule.linear())
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t, s = 0.9, 0.05
    exact = _exact_flow(model, x, t, s)
    ns = [16, 32, 64, 128]
    errors = []
    for n in ns:
        out = sk.solve(model, x, sk.time_grid(model.schedule, t, s, n, spacing), solver)
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
        ours = sk.solve(model, x, ts, "ddim")
    # two float32 roundings of the same DDIM map, each within its bound over its counted chain;
    # diffusers' ᾱ come from a float32 cumprod of T factors made before, which lengthens its chain
    chains = (chain.longest(ours), chain.longest(ref) + scheduler.config.num_train_timesteps)
    assert rel(ours, ref) <= pair_bound(*(roundoff_bound(c, torch.float32) for c in chains))


def test_ddim_step_is_the_paper_formula(mixture):
    """x_s = (α_s/α_t) x_t − σ_s (e^h − 1) ε(x_t, t), h = λ_s − λ_t (MATH §2)."""
    sch = mixture.schedule
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t, s = 0.7, 0.4
    h = sch.lam(s) - sch.lam(t)
    expected = sch.alpha(s) / sch.alpha(t) * x - sch.sigma(s) * math.expm1(h) * mixture.eps(x, t)
    assert torch.allclose(sk.solve(mixture, x, [t, s], "ddim"), expected, rtol=1e-13)


def test_one_step_estimate_is_tweedie(mixture):
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = 0.6
    sch = mixture.schedule
    tweedie = (x - sch.sigma(t) * mixture.eps(x, t)) / sch.alpha(t)
    assert torch.allclose(sk.estimate_x0(mixture, x, t, n=1), tweedie, rtol=1e-13)
    assert torch.allclose(sk.estimate_x0(mixture, x, t, n=1), mixture.x0(x, t), rtol=1e-10)


def test_n_step_estimate_approaches_the_flow():
    model = _one_gaussian(sk.VPSchedule.linear())
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    exact = _exact_flow(model, x, 0.8, 0.0)
    errs = [float((sk.estimate_x0(model, x, 0.8, n=n) - exact).abs().max()) for n in (1, 4, 16)]
    assert errs[0] > errs[1] > errs[2]


def test_time_grid():
    sched = sk.VPSchedule.linear()
    ts = sk.time_grid(sched, 1.0, 0.0, 10)
    assert ts.shape == (11,) and ts[0] == 1.0 and ts[-1] == 0.0
    tl = sk.time_grid(sched, 0.9, 0.01, 8, spacing="lambda")
    lams = sched.lam(tl)
    assert torch.allclose(lams.diff(), lams.diff()[0].expand(8), rtol=1e-9)


def test_misalignment_falls_with_n(digits_mixture):
    x_T = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = sk.misalignment(digits_mixture, x_T, times=(0.9, 0.5), ns=(1, 2, 4), steps=40)
    rms = out["rms"]
    assert rms.shape == (2, 3)
    assert bool((rms[:, 1:] < rms[:, :-1]).all())
    assert out["final"].shape == x_T.shape


# --- bad input -------------------------------------------------------------------------------
def test_bad_times(mixture):
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    for t in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="t must lie in"):
            sk.estimate_x0(mixture, x, t)
    with pytest.raises(ValueError, match="t_start"):
        sk.time_grid(mixture.schedule, 1.2, 0.0, 4)


def test_bad_n_solver_spacing_grid(mixture):
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        sk.estimate_x0(mixture, x, 0.5, n=0)
    with pytest.raises(ValueError, match="unknown solver 'euler'.*ddim, heun, rk4"):
        sk.solve(mixture, x, [0.5, 0.0], "euler")
    with pytest.raises(ValueError, match="spacing must be"):
        sk.time_grid(mixture.schedule, 0.5, 0.0, 4, spacing="log")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sk.solve(mixture, x, [0.5, 0.6, 0.0])
    with pytest.raises(ValueError, match="needs t_end > 0"):
        sk.time_grid(mixture.schedule, 0.5, 0.0, 4, spacing="lambda")


def test_bad_shapes(mixture, unet_model):
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 2, 2\)"):
        mixture.eps(torch.randn(2, 3, 3, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"):
        unet_model.eps(torch.randn(2, 3, 8, 8, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="t must be a float or a tensor of shape"):
        mixture.eps(torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.tensor([0.1, 0.2, 0.3]))
