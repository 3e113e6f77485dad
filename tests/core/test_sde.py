"""The first-order SDE sampler, its frames, noise recovery and encoding of a given image."""

import math

import pytest
import torch
from helpers import RoundingChain, roundoff_bound, top_time

import sagkit as sk
from sagkit.core.frames import get_frame
from sagkit.core.sde import sde_step


def pairs(ts):
    """The (s, t) of each step of the grid ts, as floats."""
    return [(float(ts[k]), float(ts[k + 1])) for k in range(len(ts) - 1)]


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_eps_step_is_the_sde_dpm_solver_step(mixture):
    """x_t = (α_t/α_s) x_s − 2σ_t(e^h − 1) ε(x_s) + σ_t sqrt(e^{2h} − 1) ξ, h = λ_t − λ_s."""
    sc, s, t = mixture.schedule, 0.7, 0.4
    x, xi = _randn((3, 1, 2, 2), 0), _randn((3, 1, 2, 2), 1)
    h = sc.lam(t) - sc.lam(s)
    want = (
        sc.alpha(t) / sc.alpha(s) * x
        - 2 * sc.sigma(t) * math.expm1(h) * mixture.eps(x, s)
        + sc.sigma(t) * math.sqrt(math.expm1(2 * h)) * xi
    )
    # float64, one step of a few dozen roundings of O(1) terms: γ_50 |x| ≈ 6e-15 ≪ 1e-12
    assert torch.allclose(
        sde_step(mixture, get_frame("eps", sde=True), x, s, t, xi), want, atol=1e-12
    )


def test_data_step_is_the_ddpm_posterior(mixture):
    """SDE-DPM-Solver++-1: x_t = (σ_t/σ_s) e^{−h} x_s + α_t(1 − e^{−2h}) x̂0 + σ_t sqrt(1 − e^{−2h}) ξ."""
    sc, s, t = mixture.schedule, 0.7, 0.4
    x, xi = _randn((3, 1, 2, 2), 0), _randn((3, 1, 2, 2), 1)
    h = sc.lam(t) - sc.lam(s)
    want = (
        sc.sigma(t) / sc.sigma(s) * math.exp(-h) * x
        - sc.alpha(t) * math.expm1(-2 * h) * mixture.x0(x, s)
        + sc.sigma(t) * math.sqrt(-math.expm1(-2 * h)) * xi
    )
    # float64, one step of a few dozen roundings of O(1) terms: γ_50 |x| ≈ 6e-15 ≪ 1e-12
    assert torch.allclose(
        sde_step(mixture, get_frame("data", sde=True), x, s, t, xi), want, atol=1e-12
    )


@pytest.mark.parametrize("param", ["eps", "data"])
def test_noise_recovery_and_encoding_are_exact(mixture, unet_model, param):
    for model, x, t_end in (
        (mixture, _randn((3, 1, 2, 2), 0), 0.0 if param == "eps" else 1e-3),
        (unet_model, _randn((2, 1, 8, 8), 0), unet_model.schedule.t_min),
    ):
        ts = sk.time_grid(model.schedule, top_time(model.schedule), t_end, 12)
        states = []
        with RoundingChain() as chain:  # the roundings behind each result, counted
            x_end, noise = sk.sde_sample(
                model,
                x,
                ts,
                generator=torch.Generator().manual_seed(1),
                parameterisation=param,
                callback=lambda i, t, s, states=states: states.append(s),
            )
            recovered = sk.recover_noise(model, torch.stack(states), ts, parameterisation=param)
        assert noise.shape == (12, *x.shape)
        # x_{k+1} = mean_k + scale_k ξ_k, rounded when sampled and again when solved for ξ_k:
        # each side is off by ≤ γ_N (|x_{k+1}| + |scale_k ξ_k|), divided by scale_k
        frame, sc = get_frame(param, sde=True), model.schedule
        scale = torch.tensor(
            [frame.kappa(sc, t) * math.sqrt(frame.noise_var(sc, s, t)) for s, t in pairs(ts)]
        ).view(-1, *[1] * x.ndim)
        gamma_n = roundoff_bound(chain.longest(recovered), torch.float64)
        bound = 4 * gamma_n * (torch.stack(states)[1:].abs() / scale + noise.abs())
        assert bool(((recovered - noise).abs() <= bound).all())
        again, _ = sk.sde_sample(model, x, ts, noise=noise, parameterisation=param)
        assert torch.equal(again, x_end)
        # a real image: encode, then re-sample it exactly
        image = _randn(x.shape, 5).clamp(-1, 1)
        with torch.no_grad(), RoundingChain() as chain:
            x_T, code = sk.encode(
                model, image, ts, generator=torch.Generator().manual_seed(2), parameterisation=param
            )
            back, _ = sk.sde_sample(model, x_T, ts, noise=code, parameterisation=param)
        # the code's errors (÷ scale_k) are multiplied back by scale_k; the steps do not expand
        # errors (|∂x_t/∂x_s| = κ_t/κ_s ≤ 1 plus the model's term): ≤ 2 γ_N max |x| in all
        size = max(float(x_T.abs().max()), float(image.abs().max()))
        gamma_n = roundoff_bound(chain.longest(back), torch.float64)
        assert float((back - image).abs().max()) <= 2 * gamma_n * size


def test_sde_adjoint_uses_the_given_noise(mixture):
    """The SDE adjoint runs on the sampler's path: with noise it differs from the ODE adjoint,
    and it approaches backprop through the SDE sampler as the steps are refined (slowly, since
    the integrand of the adjoint is evaluated along a rough Brownian path)."""
    x = _randn((3, 1, 2, 2), 0)
    c = _randn((3, 1, 2, 2), 1)
    loss = lambda y: ((y - c) ** 2).flatten(1).sum(1)  # noqa: E731
    gaps = []
    for m in (40, 160):
        ts = sk.time_grid(mixture.schedule, 0.5, 1e-3, m, spacing="lambda")
        noise = _randn((m, *x.shape), 2)
        _, g = sk.adjointdeis_grad(mixture, loss, x, ts, order=2, sde=True, noise=noise)
        leaf = x.clone().requires_grad_(True)
        out = loss(sk.sde_sample(mixture, leaf, ts, noise=noise)[0]).sum()
        (g_bp,) = torch.autograd.grad(out, leaf)
        gaps.append(float((g - g_bp).norm() / g_bp.norm()))
    assert gaps[1] < 0.75 * gaps[0]


def test_bad_input(mixture):
    x = _randn((3, 1, 2, 2), 0)
    ts = sk.time_grid(mixture.schedule, top_time(mixture.schedule), 0.0, 4)
    with pytest.raises(ValueError, match="noise must have shape"):
        sk.sde_sample(mixture, x, ts, noise=torch.zeros(3, *x.shape))
    with pytest.raises(ValueError, match="unknown parameterisation"):
        sk.sde_sample(mixture, x, ts, parameterisation="score")
    with pytest.raises(ValueError, match=r"ts\[-1\] > 0"):
        sk.sde_sample(mixture, x, ts, parameterisation="data")
    with pytest.raises(ValueError, match="states must hold"):
        sk.recover_noise(mixture, torch.zeros(3, *x.shape), ts)
