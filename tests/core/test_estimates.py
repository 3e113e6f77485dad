"""Clean-image estimates: the one-step estimate is Tweedie's, the n-step one approaches the flow."""

import math

import torch

import sagkit as sk

# The float64 tolerances below (1e-14 … 1e-9) bound identities that a few dozen float64
# operations evaluate on O(1) numbers: γ_N = N · 1.1e-16 ≈ 1e-15 for such N, so each leaves
# ≥ 10 γ_N for rounding (1e-10 and 1e-9 also for cancellation in a closed-form inverse and a
# difference of λs), while staying ≪ the 1e-2 error of a wrong formula.
SCHEDULES = {
    "linear": sk.VPSchedule.linear(),
    "cosine": sk.VPSchedule.cosine(),
}


def _one_gaussian(schedule):
    mu = torch.tensor([[[0.7, -1.2], [0.4, 2.0]]], dtype=torch.float64)[:, None]
    return sk.GaussianMixture(mu, 0.5, schedule)


def _exact_flow(model, x_t, t, s):
    """x_s = α_s μ + sqrt(v_s / v_t)(x_t − α_t μ) for one Gaussian (MATH §4)."""
    sch, mu = model.schedule, model.means[0]

    def v(u):
        return sch.alpha(u) ** 2 * model.std**2 + sch.sigma(u) ** 2

    return sch.alpha(s) * mu + math.sqrt(v(s) / v(t)) * (x_t - sch.alpha(t) * mu)


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
