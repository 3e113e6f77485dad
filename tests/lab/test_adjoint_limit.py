"""The discrete adjoint and its continuous limit; the per-step factors of each method on one
Gaussian, against the library's gradients; the measured segment ratios against their
prediction."""

import math

import pytest
import torch

import sagkit as sk
from sagkit.gradients.reference import exact_gradient
from sagkit.lab.adjoint_limit import (
    adjoint_limit,
    discrete_adjoint,
    segment_ratios,
    step_factors,
)

EPS64 = torch.finfo(torch.float64).eps
SCHEDULE = sk.VPSchedule.linear()


@pytest.fixture(scope="module")
def mixture():
    means = torch.tensor(
        [[[1.0, -0.5], [0.3, 0.8]], [[-1.0, 0.2], [0.5, -0.7]], [[0.0, 0.9], [-0.8, 0.1]]]
    )
    return sk.GaussianMixture(means[:, None].double(), 0.3, SCHEDULE, weights=[0.5, 0.3, 0.2])


def gaussian(std, *, mean=0.0):
    return sk.GaussianMixture(torch.full((1, 1, 2, 2), mean, dtype=torch.float64), std, SCHEDULE)


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=gen)
    c = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=gen)
    return x, c


def quadratic(c):
    return lambda y: (c * y + y**2).flatten(1).sum(1)


def linear(c):
    return lambda y: (c * y).flatten(1).sum(1)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("solver", ["ddim", "rk4"])
def test_discrete_adjoint_is_the_gradient_of_the_solve_at_every_grid_point(mixture, solver):
    x, c = batch()
    loss = quadratic(c)
    ts = sk.time_grid(SCHEDULE, 0.9, 1e-3, 6, spacing="lambda")
    states, lams = discrete_adjoint(mixture, loss, x, ts, solver=solver)
    assert states.shape == lams.shape == (7, *x.shape)
    # Two orderings of the same float64 operations: n steps of s stages, each a softmax over
    # 3 components of sums over D = 4 pixels: relative rounding of order n·s·D·u; 4× that.
    tol = 4 * 6 * 4 * 4 * EPS64
    end = sk.solve(mixture, x, ts, solver=solver)
    assert rel(states[-1], end) <= tol
    for k in (0, 3):
        g = sk.loss_grad(mixture, loss, states[k], ts[k:], method="backprop", solver=solver)[1]
        assert rel(lams[k], g) <= tol, k


@pytest.mark.parametrize("solver, order", [("ddim", 1), ("heun", 2)])
def test_discrete_adjoint_converges_to_the_continuous_one_at_the_solver_order(solver, order):
    model = sk.digits.digits_mixture(n_components=64)  # notebook 02's model
    gen = torch.Generator().manual_seed(0)
    x, c = (torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    result = adjoint_limit(
        model,
        quadratic(c),
        x,
        t_start=0.9,
        t_end=1e-3,
        ns=(8, 16, 32, 64),
        solver=solver,
        reference_steps=128,
    )
    d = [result["distance"][n] for n in result["ns"]]
    assert all(b < a for a, b in zip(d, d[1:], strict=False))
    assert abs(result["order"] - order) < 0.3  # pre-asymptotic curvature over 16..64 steps
    assert result["reference"]["error"] < d[-1] / 100  # the reference is not the error
    assert len(result["norms"][8]) == 9 and len(result["reference"]["norms"]) == 129


def test_adjoint_limit_refuses_grids_that_do_not_nest(mixture):
    x, c = batch()
    with pytest.raises(ValueError, match="divide reference_steps"):
        adjoint_limit(mixture, quadratic(c), x, t_start=0.9, t_end=1e-3, ns=(3,), reference_steps=8)
    with pytest.raises(ValueError, match="ns"):
        adjoint_limit(mixture, quadratic(c), x, t_start=0.9, t_end=1e-3, ns=(0,))


@pytest.mark.parametrize("std", [0.5, 1.0, 2.0])
def test_step_factors_are_what_each_method_does_to_the_adjoint_on_one_gaussian(std):
    """For one Gaussian every Jacobian is a multiple of I, so a linear loss's gradient is c
    times the product of the method's per-step factors, whatever the states."""
    model = gaussian(std, mean=0.4)
    x, c = batch(1)
    loss = linear(c)
    ts = sk.time_grid(SCHEDULE, 1.0, 1e-3, 12)
    f = step_factors(SCHEDULE, ts, variance=std**2)
    got = {
        "exact": exact_gradient(model, loss, x, 1.0, 1e-3)[1],
        "ddim (backprop)": sk.loss_grad(model, loss, x, ts, method="backprop")[1],
    }
    for param in ("eps", "data"):
        got[f"adjointdeis-1 ({param})"] = sk.adjointdeis_grad(
            model, loss, x, ts, order=1, parameterisation=param
        )[1]
    # Each factor is a dozen float64 operations, the library's route another dozen per step:
    # relative rounding ≤ 2 · 12 · n · u, with n = 12 steps.
    tol = 2 * 12 * 12 * EPS64
    for key, g in got.items():
        assert rel(g, float(f[key].prod()) * c) <= tol, key


def test_step_factors_of_a_point_mass_and_of_wide_data():
    ts = sk.time_grid(SCHEDULE, 1.0, 1e-3, 7)
    a, s = SCHEDULE.alpha(ts), SCHEDULE.sigma(ts)
    point = step_factors(SCHEDULE, ts, variance=0.0)
    sigma_ratio = s[1:] / s[:-1]
    # a few float64 operations per factor, and the DDIM sum cancels α_t/α_s down to σ_t/σ_s
    tol = 16 * EPS64 * float((a[1:] / a[:-1] / sigma_ratio).max())
    # DDIM and the data form are exact for a point mass (docs/maths.md §6.7) ...
    for key in ("exact", "ddim (backprop)", "adjointdeis-1 (data)"):
        assert torch.allclose(point[key], sigma_ratio, rtol=tol, atol=0), key
    # ... the eps form is the §6.7 factor (α_t/α_s)(1 − (e^{|h|} − 1))
    abs_h = SCHEDULE.lam(ts[1:]) - SCHEDULE.lam(ts[:-1])
    expected = a[1:] / a[:-1] * (1 - (abs_h.exp() - 1))
    assert torch.allclose(point["adjointdeis-1 (eps)"], expected, rtol=tol, atol=tol)
    # variance ∞ is the limit of large variances: relative gap of order σ²/(α² s²) ≤ 1e-6 here
    wide, huge = (
        step_factors(SCHEDULE, ts, variance=math.inf),
        step_factors(SCHEDULE, ts, variance=1e12),
    )
    gap = float((s**2 / (a**2 * 1e12)).max())
    for key in wide:
        assert torch.allclose(wide[key], huge[key], rtol=4 * gap, atol=0), key
    with pytest.raises(ValueError, match="variance"):
        step_factors(SCHEDULE, ts, variance=-1.0)
    with pytest.raises(ValueError, match="ts\\[-1\\] > 0"):
        step_factors(SCHEDULE, sk.time_grid(SCHEDULE, 1.0, 0.0, 4))


def test_segment_ratios_match_the_prediction_exactly_on_unit_variance_data():
    """N(0, I) data: ε = σ x exactly, so δ = 0, the tolerance is 0 and the prediction holds to
    rounding."""
    x, c = batch(2)
    ts = sk.time_grid(SCHEDULE, 1.0, 1e-3, 10)
    out = segment_ratios(gaussian(1.0), linear(c), x, ts, start=0, stop=4)
    assert float(out["deviation"]["adjoint"].max()) <= 8 * EPS64
    tol = 2 * 12 * 10 * EPS64  # a dozen float64 operations per step each way, 10 steps
    for key, predicted in out["predicted"].items():
        assert out["ratio"][key] == pytest.approx(predicted, rel=tol), key
        assert out["tolerance"][key] <= tol, key
        # every Jacobian is a multiple of I: the gradients are parallel (the first step of
        # this coarse grid flips the sign of the eps form's adjoint)
        assert abs(out["cosine"][key]) == pytest.approx(1.0, abs=tol), key


@pytest.mark.parametrize("std", [0.6, 1.5])
def test_segment_ratios_stay_within_the_first_order_tolerance_of_the_prediction(std):
    x, c = batch(3)
    ts = sk.time_grid(SCHEDULE, 1.0, 1e-3, 10)
    out = segment_ratios(gaussian(std), quadratic(c), x, ts, start=0, stop=4)
    for key, predicted in out["predicted"].items():
        gap = abs(math.log(out["ratio"][key] / predicted))
        assert 0 < gap <= out["tolerance"][key], (key, gap, out["tolerance"][key])
    with pytest.raises(ValueError, match="start < stop"):
        segment_ratios(gaussian(std), quadratic(c), x, ts, start=4, stop=4)
