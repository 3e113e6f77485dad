"""The referees: finite differences against float64 backprop, Richardson, the closed-form Jacobian of one Gaussian."""

import pytest
import torch
from helpers import SCHEDULES, RoundingChain, grid, make_loss, mixture_under, noise, roundoff_bound

import sagkit as sk

SOLVERS = ("ddim", "heun", "rk4")


def test_one_gaussian_gradient_is_the_closed_form_jacobian():
    """K = 1: ∂x_s/∂x_t = sqrt(v_s / v_t) I for the exact flow; n-step RK4 converges to it."""
    mean = torch.tensor([[[[0.5, -0.2], [0.1, 0.3]]]], dtype=torch.float64)
    model = sk.GaussianMixture(mean, 0.5, sk.VPSchedule.linear())
    x = noise((1, 2, 2), batch=1)
    v = lambda t: model.schedule.alpha(t) ** 2 * 0.25 + model.schedule.sigma(t) ** 2  # noqa: E731
    expected = (v(0.0) / v(0.5)) ** 0.5
    errors = []
    for n in (32, 64):
        ts = sk.time_grid(model.schedule, 0.5, 0.0, n)
        _, g = sk.loss_grad(model, lambda out: out.sum(), x, ts, method="symplectic", solver="rk4")
        errors.append(float((g - expected).abs().max()) / expected)
    # RK4's O(h⁴) error shrinks by 2⁴ per halving of h in the limit: demand at least 2³ (order
    # ≥ 3); a wrong closed form would leave an error that does not shrink at all.
    assert errors[1] <= errors[0] / 2**3, errors


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("which", [*SCHEDULES, "digits_mixture", "unet_model"])
def test_finite_differences_agree_with_float64_backprop(request, which, solver):
    """which: the test mixture under a schedule of SCHEDULES, or a fixture."""
    model = (
        mixture_under(SCHEDULES[which]) if which in SCHEDULES else request.getfixturevalue(which)
    )
    x = noise(model.means.shape[1:] if which != "unet_model" else (1, 8, 8))
    v = noise(x.shape[1:], seed=3)
    ts, loss_fn, delta = grid(model), make_loss(), 1e-4
    with RoundingChain() as chain:
        loss, g = sk.loss_grad(model, loss_fn, x, ts, method="backprop", solver=solver)
    fd = sk.finite_difference(model, loss_fn, x, ts, v, solver=solver, delta=delta)
    assert isinstance(fd, float)
    # rounding: each loss value is off by ≤ γ_N |L| (N its forward chain), and the Richardson
    # combination (4 D(δ/2) − D(δ))/3 weighs them by 3/δ in all; truncation f⁽⁵⁾δ⁴/480 is 1e-16
    # smaller than f⁽⁵⁾ and negligible for these smooth losses.
    bound = 3 * roundoff_bound(chain.longest(loss), torch.float64) * abs(float(loss)) / delta
    assert abs(fd - float((g * v).sum())) <= bound


def test_richardson_improves_on_the_plain_central_difference(mixture):
    x, v = noise((1, 2, 2), batch=3), noise((1, 2, 2), batch=3, seed=4)
    ts, loss_fn = grid(mixture), make_loss()
    _, g = sk.loss_grad(mixture, loss_fn, x, ts, method="backprop")
    exact = float((g * v).sum())
    plain = sk.finite_difference(mixture, loss_fn, x, ts, v, delta=1e-2, richardson=False)
    extrapolated = sk.finite_difference(mixture, loss_fn, x, ts, v, delta=1e-2)
    assert abs(extrapolated - exact) < abs(plain - exact) / 10


def test_finite_difference_refuses_anything_but_float64(mixture):
    x, v = noise((1, 2, 2), batch=3), noise((1, 2, 2), batch=3, seed=4)
    ts, loss_fn = grid(mixture), make_loss()
    with pytest.raises(TypeError, match="float64"):
        sk.finite_difference(mixture, loss_fn, x.float(), ts, v)
    with pytest.raises(TypeError, match="float64"):
        sk.finite_difference(mixture, loss_fn, x, ts, v.float())
    with pytest.raises(TypeError, match="model parameter"):
        sk.finite_difference(mixture.float(), loss_fn, x, ts, v)
    with pytest.raises(ValueError, match="shape"):
        sk.finite_difference(mixture.double(), loss_fn, x, ts, v[:1])
    with pytest.raises(ValueError, match="delta"):
        sk.finite_difference(mixture.double(), loss_fn, x, ts, v, delta=0.0)


# --- the vanilla continuous adjoint: approximate, converging with n --------------------------
