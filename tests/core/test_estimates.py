"""Clean-image estimates: the one-step estimate is Tweedie's, the n-step one approaches the flow."""

import torch
from helpers import exact_flow, one_gaussian

import sagkit as sk


# The float64 tolerances below (1e-14 … 1e-9) bound identities that a few dozen float64
# operations evaluate on O(1) numbers: γ_N = N · 1.1e-16 ≈ 1e-15 for such N, so each leaves
# ≥ 10 γ_N for rounding (1e-10 and 1e-9 also for cancellation in a closed-form inverse and a
# difference of λs), while staying ≪ the 1e-2 error of a wrong formula.
def test_one_step_estimate_is_tweedie(mixture):
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = 0.6
    sch = mixture.schedule
    tweedie = (x - sch.sigma(t) * mixture.eps(x, t)) / sch.alpha(t)
    assert torch.allclose(sk.estimate_x0(mixture, x, t, n=1), tweedie, rtol=1e-13)
    assert torch.allclose(sk.estimate_x0(mixture, x, t, n=1), mixture.x0(x, t), rtol=1e-10)


def test_n_step_estimate_approaches_the_flow():
    model = one_gaussian(sk.VPSchedule.linear())
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    exact = exact_flow(model, x, 0.8, 0.0)
    errs = [float((sk.estimate_x0(model, x, 0.8, n=n) - exact).abs().max()) for n in (1, 4, 16)]
    assert errs[0] > errs[1] > errs[2]
