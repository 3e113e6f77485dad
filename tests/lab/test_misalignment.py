"""The misalignment study: n-step estimates get closer to the final sample as n grows."""

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


def test_misalignment_falls_with_n(digits_mixture):
    x_T = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = sk.misalignment(digits_mixture, x_T, times=(0.9, 0.5), ns=(1, 2, 4), steps=40)
    rms = out["rms"]
    assert rms.shape == (2, 3)
    assert bool((rms[:, 1:] < rms[:, :-1]).all())
    assert out["final"].shape == x_T.shape


# --- bad input -------------------------------------------------------------------------------
