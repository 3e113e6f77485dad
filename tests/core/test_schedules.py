"""Schedules and time grids: identities, diffusers' discrete schedule, bad times."""

import pytest
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
    sched = sk.VPSchedule.linear(beta_min=0.1, beta_max=20.0)
    t = 0.37
    assert sched.log_alpha(t) == pytest.approx(-0.25 * t**2 * 19.9 - 0.05 * t, rel=1e-14)


def test_time_grid():
    sched = sk.VPSchedule.linear()
    ts = sk.time_grid(sched, 1.0, 0.0, 10)
    assert ts.shape == (11,) and ts[0] == 1.0 and ts[-1] == 0.0
    tl = sk.time_grid(sched, 0.9, 0.01, 8, spacing="lambda")
    lams = sched.lam(tl)
    assert torch.allclose(lams.diff(), lams.diff()[0].expand(8), rtol=1e-9)


def test_bad_times(mixture):
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    for t in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="t must lie in"):
            sk.estimate_x0(mixture, x, t)
    with pytest.raises(ValueError, match="t_start"):
        sk.time_grid(mixture.schedule, 1.2, 0.0, 4)
