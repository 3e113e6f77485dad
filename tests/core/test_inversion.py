"""DDIM inversion: round trips on the mixture and a UNet, bad input."""

import math

import pytest
import torch
from helpers import BOTH_SCHEDULES, RoundingChain, roundoff_bound, unit_roundoff

import sagkit as sk
from sagkit.core.estimates import rms_distance


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@BOTH_SCHEDULES
def test_inversion_round_trip(mixture):
    # 25 steps: the naive inversion's error is 0.085 (VP) and 0.082 (flow), half of that at 50
    ts = sk.time_grid(mixture.schedule, 1.0, 0.0, 25)
    x0 = mixture.sample(4, generator=torch.Generator().manual_seed(0))
    err = sk.inversion_error(mixture, x0, ts, iters=(0, 1, 3))
    assert err[0] < 0.1  # naive DDIM inversion: O(h)
    assert err[3] < err[1] < err[0]
    # fixed-point iterations converge to the exact inverse of the DDIM map: contracting by
    # q = err[1]/err[0] per iteration, log u / log q of them reach the rounding floor, where
    # the round trip is within γ_N of x0 (N its counted chain)
    u = unit_roundoff(torch.float64)
    iters = math.ceil(math.log(u) / math.log(err[1] / err[0])) + 1
    with RoundingChain() as chain:
        back = sk.solve(mixture, sk.invert(mixture, x0, ts, fixed_point_iters=iters), ts)
    size = float(rms_distance(x0, torch.zeros_like(x0)).max())
    assert (
        float(rms_distance(back, x0).max())
        <= roundoff_bound(chain.longest(back), torch.float64) * size
    )


def test_inversion_round_trip_unet(unet_model):
    ts = sk.time_grid(unet_model.schedule, 1.0, unet_model.schedule.t_min, 8)
    with torch.no_grad():
        x0 = sk.solve(unet_model, _randn((2, 1, 8, 8), 0), ts)
    err = sk.inversion_error(unet_model, x0, ts, iters=(0, 4))
    assert err[4] < err[0] / 5


def test_inversion_bad_input(mixture):
    ts = sk.time_grid(mixture.schedule, 1.0, 0.0, 5)
    with pytest.raises(ValueError, match="fixed_point_iters"):
        sk.invert(mixture, torch.zeros(1, 1, 2, 2, dtype=torch.float64), ts, fixed_point_iters=-1)
