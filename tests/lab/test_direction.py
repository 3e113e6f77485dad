"""The direction study: closed-form truths on a single Gaussian, the methods' identities (SAG
n = 1 is the one-step estimate, the "sampler" grid with one remaining time too), the study's
summaries computed from its per-sample values, the figure, and a tiny benchmark run."""

import json
import math

import pytest
import torch
from helpers import SCHEDULES, load_benchmark, unit_roundoff

import sagkit as sk
from sagkit.core.tilted import ExactGuidance, LinearLoss
from sagkit.guidance.methods import estimate_times, guidance_gradient
from sagkit.lab.direction import (
    alignment,
    direction_study,
    estimate_jacobian,
    gradient_directions,
    guided_states,
    held_out_digit,
    inpainting_loss,
    plot_directions,
    sampler_times,
    study_losses,
    summarise,
    x0_moves,
)


@pytest.fixture(scope="module")
def small():
    """The 16-component digits mixture (VP) and the digit it leaves out, loaded once."""
    return sk.digits.digits_mixture(n_components=16), held_out_digit(n_components=16)[0]


U = unit_roundoff(torch.float64)
TIMES = (0.1, 0.5, 0.9)


def single_gaussian(schedule, std=0.3):
    """K = 1: N(μ, s² I) on 4×4 images, float64."""
    mu = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return sk.GaussianMixture(mu, std, schedule)


def top_half_loss(tau):
    g = torch.Generator().manual_seed(2)
    return inpainting_loss(torch.randn(1, 4, 4, generator=g, dtype=torch.float64), tau=tau)


def states(exact, t, n=8, seed=3):
    return guided_states(exact, t, n, generator=torch.Generator().manual_seed(seed))


def cancellation(exact, x, t):
    """The factors by which cancellation amplifies rounding, per sample: ‖∇log p_t‖/‖h_t‖ in
    h_t = ∇log p̃_t − ∇log p_t, plus v_t/(α_t² s²) in Tweedie's Jacobian (I − σ_t ∂ε/∂x)/α_t,
    whose two terms (I and ≈ σ_t²/v_t I) differ by α_t² s²/v_t (K = 1)."""
    h = exact.score(x, t).reshape(x.shape[0], -1).norm(dim=1)
    schedule, s = exact.schedule, exact.mixture.std
    a, sigma = schedule.alpha(t), schedule.sigma(t)
    tweedie = (a**2 * s**2 + sigma**2) / (a**2 * s**2)
    return exact.prior.score(x, t).reshape(x.shape[0], -1).norm(dim=1) / h + tweedie


# --- K = 1: what holds exactly ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("t", TIMES)
def test_one_step_is_exact_in_direction_for_inpainting_one_gaussian(name, t):
    """K = 1: x_0 | x_t ~ N(m, c I), c = s²σ²/v, and the one-step d = (α/σ²) c ∇L(m); the tilted
    posterior mean moves by −C̃ ∇L(m), C̃ = (I/c + AᵀA/τ²)⁻¹, so −h = (α/σ²) C̃ ∇L(m). For a
    mask, ∇L(m) lives on the masked pixels, where C̃ = c τ²/(τ² + c) I: cos(−d, h) = 1 and
    ‖d‖/‖h‖ = 1 + c/τ² = 1 + s²σ_t²/(v_t τ²)."""
    schedule, tau = SCHEDULES[name], 0.2
    mixture, loss = single_gaussian(schedule), top_half_loss(tau)
    exact = ExactGuidance(mixture, loss)
    x = states(exact, t)
    d = gradient_directions(mixture, loss, x, t, ns=(1,))["n=1"]
    cosine, ratio = alignment(-d, exact.score(x, t))
    a, sigma, s = schedule.alpha(t), schedule.sigma(t), mixture.std
    v = a**2 * s**2 + sigma**2
    expected = 1 + s**2 * sigma**2 / (v * tau**2)
    # rounding: 64 u for the few dozen operations of each side, times their cancellation
    bound = 64 * U * cancellation(exact, x, t)
    assert ((cosine - 1).abs() <= bound).all()
    assert ((ratio / expected - 1).abs() <= bound).all()


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("t", TIMES)
def test_every_estimate_points_exactly_for_a_linear_loss_on_one_gaussian(name, t):
    """K = 1, L = ⟨w, x⟩: −h = (α/σ²) c w exactly (the tilt moves the posterior mean by −c w),
    so the one-step d = Jᵀw = (α/σ²) c w equals −h (ratio 1); every n-step DDIM map of an
    isotropic Gaussian is x ↦ a x + b with a scalar a, so its d = a w points along h too."""
    schedule = SCHEDULES[name]
    mixture = single_gaussian(schedule)
    w = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loss = LinearLoss(w)
    exact = ExactGuidance(mixture, loss)
    x = states(exact, t)
    found = gradient_directions(mixture, loss, x, t, ns=(1, 8))
    h = exact.score(x, t)
    bound = 64 * U * cancellation(exact, x, t)  # as above
    for name_ in ("n=1", "n=8", "n=8 sampler", "lgd", "tfg rho", "mpgd"):
        cosine, _ = alignment(-found[name_], h)
        assert ((cosine - 1).abs() <= bound).all(), name_
    _, ratio = alignment(-found["n=1"], h)
    assert ((ratio - 1).abs() <= bound).all()
    # the μ-terms: Δ0 = −(steps · c) √D w/‖w‖ against x0_shift = −c_t w
    shift = exact.x0_shift(x, t)
    moves = x0_moves(mixture, loss, x, t)
    for name_, length in (("ugd mu", 5.0), ("tfg mu", 2.0)):
        cosine, ratio = alignment(moves[name_], shift)
        expected = length * math.sqrt(16) / shift.reshape(8, -1).norm(dim=1)
        assert ((cosine - 1).abs() <= bound).all(), name_
        assert ((ratio / expected - 1).abs() <= bound).all(), name_


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_one_step_jacobian_of_one_gaussian_is_alpha_s2_over_v(name):
    """K = 1: ∂E[x_0 | x_t]/∂x_t = (α_t s²/v_t) I (Tweedie's gain)."""
    schedule, t = SCHEDULES[name], 0.6
    mixture = single_gaussian(schedule)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    jac = estimate_jacobian(mixture, x, t, n=1)
    a, sigma, s = schedule.alpha(t), schedule.sigma(t), mixture.std
    v = a**2 * s**2 + sigma**2
    expected = a * s**2 / v * torch.eye(16, dtype=torch.float64)
    assert jac.shape == (3, 16, 16)
    # a few dozen operations, 64 u, times the cancellation v/(α² s²) in (I − σ ∂ε/∂x)/α
    assert (jac - expected).abs().max() <= 64 * U * v / (a**2 * s**2) * expected.max()


# --- the methods' identities -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sag_with_one_step_is_the_one_step_direction_bit_for_bit(name, small):
    vp, ref = small
    mixture = sk.GaussianMixture(vp.means, vp.std, SCHEDULES[name])
    mixture.labels = vp.labels
    loss = study_losses(mixture, ref, label=3)["quadratic τ=0.05"]
    x = states(ExactGuidance(mixture, loss), 0.6, n=4)
    one = gradient_directions(mixture, loss, x, 0.6, ns=(1,))["n=1"]
    for grid in ("to-zero", "sampler"):
        ts = estimate_times(
            sampler_times(mixture.schedule, 0.6, steps=25), 0, 1, grid=grid,
            schedule=mixture.schedule,
        )  # fmt: skip
        _, g = guidance_gradient(mixture, loss, x, 0.6, ts=ts)
        assert torch.equal(g, one), grid
    _, g = guidance_gradient(mixture, loss, x, 0.6, n=1)
    assert torch.equal(g, one)


def test_sampler_grid_with_one_remaining_time_is_the_one_step_direction(small):
    """Below the 25-step grid's first positive time (0.04) the only remaining time is t itself:
    estimate_times gives [t, 0], so every n is the one-step estimate, bit for bit."""
    mixture, _ = small
    loss = LinearLoss(torch.ones(1, 8, 8, dtype=torch.float64))
    t = 0.03
    assert sampler_times(mixture.schedule, t, steps=25) == [0.03, 0.0]
    x = states(ExactGuidance(mixture, loss), t, n=4)
    found = gradient_directions(mixture, loss, x, t, ns=(1, 2, 8))
    assert torch.equal(found["n=8 sampler"], found["n=1"])
    assert torch.equal(found["n=2 sampler"], found["n=1"])
    assert not torch.equal(found["n=8"], found["n=1"])  # the to-zero grid still takes 8 steps


def test_sampler_grid_ends_at_the_samplers_last_time():
    schedule = sk.VPSchedule.linear()
    times = sampler_times(schedule, 0.5, steps=25)
    assert times[0] == 0.5 and times[1] == pytest.approx(0.48) and times[-1] == 0.0
    ts = estimate_times(times, 0, 4, grid="sampler", schedule=schedule)
    assert ts[0] == 0.5 and float(ts[-1]) == pytest.approx(0.04) and len(ts) == 5


def test_mpgd_direction_is_the_estimates_gradient_over_alpha_under_vp(small):
    """With ε held fixed, ∂x̂0/∂x_t = I/α_t: d = ∇L(x̂0)/α_t."""
    mixture, ref = small
    loss = study_losses(mixture, ref, label=3)["quadratic τ=1"]
    t = 0.7
    x = states(ExactGuidance(mixture, loss), t, n=4)
    d = gradient_directions(mixture, loss, x, t, ns=(1,))["mpgd"]
    x0 = mixture.x0(x, t).requires_grad_()
    (grad,) = torch.autograd.grad(loss(x0).sum(), x0)
    expected = grad / mixture.schedule.alpha(t)
    # the two x̂0 differ by the rounding of Tweedie's division ((x − σε)/α against the mixture's
    # closed form), amplified by 1/α_t ≈ 20 and the loss's 1/τ² = 1: 1e4 u ≈ 2e-12 relative
    assert (d - expected).norm() <= 1e4 * U * expected.norm()


def test_held_out_digit_is_not_a_mean():
    mixture = sk.digits.digits_mixture(n_components=64)
    ref, label = held_out_digit(n_components=64)
    distances = (mixture.means - ref).reshape(64, -1).norm(dim=1)
    assert distances.min() > 0 and 0 <= label <= 9


# --- alignment, summaries, the study ---------------------------------------------------------


def test_alignment_conventions():
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    cosine, ratio = alignment(d, ref)
    assert cosine[0] == 1.0 and ratio[0] == 2.0
    assert cosine[1] == 0.0 and ratio[1] == 0.0  # no move: cosine 0
    assert math.isnan(cosine[2]) and math.isnan(ratio[2])  # no reference: undefined
    s = summarise([[1.0, math.nan, 3.0, 2.0]])
    assert s["median"] == [2.0] and s["count"] == [3] and s["q1"] == [1.5]


def test_study_summaries_come_from_its_per_sample_values(small):
    mixture, ref = small
    loss = study_losses(mixture, ref, label=3)["linear |w|=5"]
    study = direction_study(mixture, loss, times=(0.7, 0.2), samples=5, ns=(1, 2))
    assert study["methods"] == [
        "n=1", "n=2", "n=2 sampler", "lgd", "tfg rho", "mpgd", "ugd mu", "tfg mu"
    ]  # fmt: skip
    for m in study["methods"]:
        for stat in ("cosine", "ratio"):
            values = study[stat][m]
            assert len(values) == 2 and all(len(row) == 5 for row in values)
            medians = [
                float(torch.tensor(row, dtype=torch.float64).nanmedian()) for row in values
            ]  # odd count
            assert study["summary"][m][stat]["median"] == pytest.approx(medians, abs=0)
            assert study["summary"][m][stat] == summarise(values)
        assert study["vanished"][m] == [sum(r == 0 for r in row) / 5 for row in study["ratio"][m]]
    # the same seed gives the same study; the one-step direction is the best on this loss
    again = direction_study(mixture, loss, times=(0.7, 0.2), samples=5, ns=(1, 2))
    assert again["cosine"] == study["cosine"]
    json.dumps(study)  # a plain structure


def test_guided_states_follow_the_guided_marginal(small):
    """At t the mean of x_t is α_t Ẽ[x_0]: within 4 standard errors per pixel (σ_t/√n bounds
    the noise's part; the data's std ≤ 1 + s adds at most α_t/√n)."""
    mixture, _ = small
    loss = LinearLoss(3 * torch.ones(1, 8, 8, dtype=torch.float64) / 8)
    exact = ExactGuidance(mixture, loss)
    t, n = 0.3, 4000
    x = states(exact, t, n=n)
    alpha, sigma = mixture.schedule.alpha(t), mixture.schedule.sigma(t)
    weights = exact.target.log_weights.exp()
    mean = alpha * (weights @ exact.target.means).reshape(1, 8, 8)
    se = (sigma + alpha * 1.1) / math.sqrt(n)
    assert (x.mean(0) - mean).abs().max() <= 4 * se * 1.5  # 64 pixels: a margin for the max
    # the guided marginal is not the prior's: its mean moved against w
    prior_mean = alpha * mixture.means.mean(0)
    assert (x.mean(0) - prior_mean).sum() < -10 * se


def test_bad_inputs_name_the_argument(small):
    mixture, _ = small
    loss = LinearLoss(torch.ones(1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="samples"):
        direction_study(mixture, loss, samples=1)
    with pytest.raises(ValueError, match="times"):
        direction_study(mixture, loss, times=(0.5, 1.5))
    with pytest.raises(ValueError, match="states"):
        direction_study(mixture, loss, states="posterior")
    with pytest.raises(ValueError, match="statistic"):
        plot_directions({("a", "b"): {}}, statistic="angle")


# --- the figure and the benchmark ------------------------------------------------------------


def test_plot_directions_draws_a_panel_per_loss_and_schedule(small):
    mixture, _ = small
    loss = LinearLoss(torch.ones(1, 8, 8, dtype=torch.float64))
    study = direction_study(mixture, loss, times=(0.6, 0.3), samples=3, ns=(1,))
    studies = {(loss_, sched): study for loss_ in ("a", "b", "c") for sched in ("VP", "flow")}
    fig = plot_directions(studies)
    assert len(fig.axes) == 6
    for ax in fig.axes:
        assert len(ax.lines) == len(study["methods"]) + 1  # + the zero line
        assert ax.get_xlabel() == "t"
    fig = plot_directions(studies, statistic="ratio", methods=["n=1", "mpgd"])
    assert all(len(ax.lines) == 3 and ax.get_yscale() == "log" for ax in fig.axes)


def test_benchmark_tiny_run(tmp_path):
    module = load_benchmark("direction_study")
    result = module.main(["--fast", "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "direction.json").read_text())
    assert len(stored["cases"]) == 12
    assert {c["schedule"] for c in stored["cases"]} == {"VP", "flow"}
    assert stored["cases"][0]["study"]["summary"]["n=1"]["cosine"]["median"] == pytest.approx(
        result["cases"][0]["study"]["summary"]["n=1"]["cosine"]["median"], nan_ok=True
    )
    assert set(stored["probe"]) == {"guided", "prior"}
    text = (tmp_path / "direction.md").read_text()
    assert "## Median cosine, n = 1, 2, 4, 8" in text and "| n=8 |" in text
    assert (tmp_path / "direction.png").stat().st_size > 0
