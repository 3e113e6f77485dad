"""Twisted SMC (sagkit.guidance.smc) against what it must equal: the kernels against
torch.distributions and diffusers' DDPM step, a two-step run's weights computed by hand,
systematic resampling's expected counts, the Oracle's weights flattening as the steps grow,
and the distance of one draw per run to exact samples falling to the noise floor with the
particles (docs/maths.md §14.8)."""

import math

import pytest
import torch
from helpers import gamma

import sagkit as sk
from sagkit.core.models import GaussianMixture
from sagkit.core.tilted import ClassLoss, ExactGuidance, LinearLoss, TiltedMixture
from sagkit.guidance.oracle import Oracle
from sagkit.guidance.smc import (
    EstimateTwist,
    ExactTwist,
    ancestral_kernel,
    effective_sample_size,
    kernel_log_prob,
    log_kernel_ratio,
    sample_smc,
    systematic_resample,
)
from sagkit.lab.distances import noise_floor, sliced_w2

F64 = torch.float64


@pytest.fixture(scope="module")
def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_kernel_log_densities_match_torch_distributions():
    x = torch.randn(6, 1, 4, 4, dtype=F64, generator=seeded(0))
    mean_p = torch.randn(6, 1, 4, 4, dtype=F64, generator=seeded(1))
    mean_q = mean_p + 0.3 * torch.randn(6, 1, 4, 4, dtype=F64, generator=seeded(2))
    std = 0.37
    normal_p = torch.distributions.Normal(mean_p, std).log_prob(x).flatten(1).sum(1)
    normal_q = torch.distributions.Normal(mean_q, std).log_prob(x).flatten(1).sum(1)
    # sums of 16 terms of a few rounded operations each, relative to the largest term
    tol = gamma(64, F64) * (normal_p.abs() + normal_q.abs()).max()
    assert (kernel_log_prob(x, mean_p, std) - normal_p).abs().max() <= tol
    assert (log_kernel_ratio(x, mean_p, mean_q, std) - (normal_p - normal_q)).abs().max() <= tol


def test_ancestral_kernel_is_diffusers_ddpm_step(ddpm):
    schedule = sk.VPSchedule.from_diffusers(ddpm)
    scheduler = type(ddpm).from_config(ddpm.config)
    scheduler.set_timesteps(50)
    x = torch.randn(3, 1, 8, 8, dtype=F64, generator=seeded(0))
    eps = torch.randn(3, 1, 8, 8, dtype=F64, generator=seeded(1))
    n_train = ddpm.config.num_train_timesteps
    for tau in scheduler.timesteps[[0, 20, 48]].tolist():
        prev = tau - n_train // 50
        t, s = (tau + 1) / n_train, (prev + 1) / n_train
        x0 = (x - schedule.sigma(t) * eps) / schedule.alpha(t)
        mean, std = ancestral_kernel(schedule, x, t, s, x0)
        out = scheduler.step(eps, tau, x, generator=seeded(5)).prev_sample
        noise = torch.randn(x.shape, generator=seeded(5), dtype=F64)
        # diffusers' ᾱ is a float32 product of up to N factors: γ_N of float32 in the
        # coefficients (as check_same_schedule bounds it), times the magnitudes they scale
        tol = (
            4
            * gamma(n_train, torch.float32)
            * (x.abs().max() + eps.abs().max() / schedule.alpha(t))
        )
        assert (out - (mean + std * noise)).abs().max() <= tol


def one_gaussian(ddpm):
    """N(μ, s² I) on (1, 2, 2) images, with the DDPM scheduler's schedule."""
    mu = torch.tensor([[[[0.5, -0.3], [0.2, 0.8]]]], dtype=F64)
    return GaussianMixture(mu, 0.4, sk.VPSchedule.from_diffusers(ddpm))


def test_two_step_weights_by_hand(ddpm):
    """Two DDPM steps (t_0 → t_1 stochastic, t_1 → 0 a point mass) with the Oracle's proposal on
    one Gaussian and a linear loss: the weights telescope to p/q(x_1) e^{−L(x_0)}, all in
    closed form: x̂0(x, t) = μ + α s²/v (x − α μ), v = α² s² + σ², the tilt moves μ by −s² w."""
    model = one_gaussian(ddpm)
    w = torch.tensor([[[1.0, -2.0], [0.5, 0.0]]], dtype=F64)
    loss = LinearLoss(w)
    exact = ExactGuidance(model, loss)
    x_T = torch.randn(1, 32, 1, 2, 2, dtype=F64, generator=seeded(0))
    result = sample_smc(
        model, loss, x_T, twist=ExactTwist(exact), guidance=Oracle(exact), steps=2,
        sampler=ddpm, ess_threshold=0.0, generator=seeded(1), progress=False,
    )  # fmt: skip
    mu, s2 = model.means[0].detach(), model.std**2
    acp = lambda t: float(model.schedule.alpha(t)) ** 2  # noqa: E731  (ᾱ at t)
    # 1 − ᾱ from the schedule's σ: 1 − ᾱ of ᾱ ≈ 1 − 10⁻⁴ would lose four digits
    one_minus = lambda t: float(model.schedule.sigma(t)) ** 2  # noqa: E731

    def x0_of(x, t, centre):
        a, v = math.sqrt(acp(t)), acp(t) * s2 + one_minus(t)
        return centre + a * s2 / v * (x - a * centre)

    t0, t1 = 501 / 1000, 1 / 1000  # DDPM's τ = 500, 0 at 2 steps
    beta = 1 - acp(t0) / acp(t1)  # DDPM's posterior: coefficients of x̂0 and x_t, variance
    c_x0 = math.sqrt(acp(t1)) * beta / one_minus(t0)
    c_x = math.sqrt(1 - beta) * one_minus(t1) / one_minus(t0)
    var = one_minus(t1) / one_minus(t0) * beta
    x = x_T[0]
    mean_p = c_x0 * x0_of(x, t0, mu) + c_x * x
    mean_q = c_x0 * x0_of(x, t0, mu - s2 * w) + c_x * x
    x1 = mean_q + math.sqrt(var) * torch.randn(x.shape, generator=seeded(1), dtype=F64)
    x0 = x0_of(x1, t1, mu)  # the last step: the point mass at p's mean, ᾱ = 1 at t = 0
    log_w = ((x1 - mean_q).pow(2) - (x1 - mean_p).pow(2)).flatten(1).sum(1) / (2 * var)
    log_w = log_w - (x0 * w).flatten(1).sum(1)
    # a few dozen rounded operations on O(1) values, and the weights' magnitudes
    assert (result.particles[0] - x0).abs().max() <= gamma(64, F64) * 4
    got = result.log_weights[0] + result.log_normaliser[0] + math.log(32)
    assert (got - log_w).abs().max() <= gamma(256, F64) * (1 + log_w.abs().max())


def test_oracle_weights_flatten_as_the_steps_grow(ddpm):
    """With the Oracle's proposal and the exact twisting each incremental weight is 1 up to
    the DDPM discretisation: the spread of the final log weights (no resampling) falls with
    the steps, like h^{1/2} (measured 1.5 → 0.5 from 25 to 100 steps on 64 components)."""
    mixture = sk.digits.digits_mixture(n_components=32, schedule=sk.VPSchedule.from_diffusers(ddpm))
    loss = ClassLoss.for_label(mixture, 3, strength=3.0)
    exact = ExactGuidance(mixture, loss)
    network = TiltedMixture.of(mixture)
    spread = {}
    for steps in (20, 80):
        x_T = torch.randn(1, 192, 1, 8, 8, dtype=F64, generator=seeded(steps))
        result = sample_smc(
            network, loss, x_T, twist=ExactTwist(exact), guidance=Oracle(exact), steps=steps,
            sampler=ddpm, ess_threshold=0.0, generator=seeded(0), progress=False,
        )  # fmt: skip
        spread[steps] = float(result.log_weights.std())
    # h^{1/2} halves the spread; the standard deviation of 192 draws is within ~5 %
    assert spread[80] < 0.6 * spread[20]
    assert spread[20] > 0.05  # the weights are not trivially constant on this task


def test_systematic_resampling_is_unbiased():
    weights = torch.tensor([0.05, 0.1, 0.2, 0.25, 0.4], dtype=F64)
    rows, n = 20000, 5
    index = systematic_resample(weights.log().expand(rows, n), generator=seeded(0))
    counts = torch.nn.functional.one_hot(index, n).sum(1).double()  # (rows, n)
    expected = n * weights
    # every count is ⌊N W⌋ or ⌈N W⌉ (rounding of the cumulative sums aside)
    assert bool(((counts >= expected.floor() - 1e-9) & (counts <= expected.ceil() + 1e-9)).all())
    # a count is ⌊NW⌋ + Bernoulli(frac(NW)): standard error ≤ 0.5/sqrt(rows); within 4 of them
    assert (counts.mean(0) - expected).abs().max() <= 4 * 0.5 / math.sqrt(rows)


def test_effective_sample_size_bounds():
    assert torch.allclose(effective_sample_size(torch.zeros(2, 7)), torch.full((2,), 7.0))
    one = torch.tensor([[0.0, -math.inf, -math.inf]])
    assert float(effective_sample_size(one)[0]) == 1.0


def test_draw_takes_the_weighted_particle():
    from sagkit.guidance.smc import SMCResult

    particles = torch.arange(6, dtype=F64).reshape(2, 3, 1, 1, 1)
    log_weights = torch.tensor([[-math.inf, 0.0, -math.inf], [-math.inf, -math.inf, 0.0]])
    result = SMCResult(particles, log_weights, torch.zeros(2), torch.ones(1, 2), torch.zeros(0, 2))
    assert result.draw(generator=seeded(0)).flatten().tolist() == [1.0, 5.0]


def test_exact_twisting_reaches_the_noise_floor(ddpm):
    """A broad target (the class tilt of 32 digits), the model itself as a bad proposal: one
    particle is the untilted model, far from the target; 16 particles with the exact twisting
    land within two standard errors of the floor (one draw per run, 4 groups of 64 runs)."""
    mixture = sk.digits.digits_mixture(n_components=32, schedule=sk.VPSchedule.from_diffusers(ddpm))
    loss = ClassLoss.for_label(mixture, 3, strength=4.0)
    exact = ExactGuidance(mixture, loss)
    network = TiltedMixture.of(mixture)
    groups, runs = 4, 64

    def distance(n):
        x_T = torch.randn(groups * runs, n, 1, 8, 8, dtype=F64, generator=seeded(n))
        result = sample_smc(
            network, loss, x_T, twist=ExactTwist(exact), guidance="none", steps=40,
            sampler=ddpm, generator=seeded(n + 1), progress=False,
        )  # fmt: skip
        draws, refs = (
            result.draw(generator=seeded(2)),
            exact.target.sample(groups * runs, generator=seeded(3)),
        )
        values = torch.tensor(
            [sliced_w2(draws[g::groups], refs[g::groups], seed=g) for g in range(groups)]
        )
        return float(values.mean()), float(values.std() / math.sqrt(groups))

    floor, floor_error = noise_floor(
        lambda m, g: exact.target.sample(m, generator=g), runs, repeats=16, seed=5
    )
    far, _ = distance(1)
    near, near_error = distance(16)
    both = math.hypot(near_error, floor_error)
    assert abs(near - floor) <= 2 * both
    assert far - floor > 10 * both


def test_estimate_twist_is_minus_the_loss_of_the_estimate(ddpm):
    mixture = sk.digits.digits_mixture(n_components=8, schedule=sk.VPSchedule.from_diffusers(ddpm))
    loss = ClassLoss.for_label(mixture, 3, strength=2.0)
    x = torch.randn(4, 1, 8, 8, dtype=F64, generator=seeded(0))
    got = EstimateTwist(loss, n=1)(mixture, x, 0.4)
    assert torch.allclose(got, -loss(mixture.x0(x, 0.4)), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"x_T": torch.zeros(4, 4)}, "x_T"),
        ({"ess_threshold": 1.5}, "ess_threshold"),
        ({"twist": 3.0}, "twist"),
        ({"repeats": 2}, "repeats"),
    ],
)
def test_bad_inputs_name_the_argument(ddpm, change, match):
    model = one_gaussian(ddpm)
    loss = LinearLoss(torch.ones(1, 2, 2, dtype=F64))
    args = {
        "x_T": torch.zeros(2, 3, 1, 2, 2, dtype=F64),
        "twist": ExactTwist(ExactGuidance(model, loss)),
        "steps": 2,
        "sampler": ddpm,
        "progress": False,
    }
    args.update(change)
    x_T = args.pop("x_T")
    with pytest.raises((ValueError, TypeError), match=match):
        sample_smc(model, loss, x_T, **args)
