"""The misalignment study: n-step estimates get closer to the final sample as n grows."""

import pytest
import torch

import sagkit as sk
from sagkit.lab import misalignment as misalignment_module
from sagkit.lab.misalignment import commitment

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


# --- commitment: what the distance means in pictures -------------------------------------------


def fake_result(final: torch.Tensor, estimate: torch.Tensor) -> dict:
    """A misalignment result with one time and one n, whose estimate is ``estimate``."""
    return {"times": [0.5], "ns": [1], "final": final, "estimates": {(0.5, 1): estimate}}


def test_commitment_of_the_final_sample_itself_is_complete(digits_mixture):
    final = digits_mixture.means[:5] + 0.01  # five samples near five means
    out = commitment(
        fake_result(final, final), means=digits_mixture.means, labels=digits_mixture.labels
    )
    assert out["same_label"].tolist() == [[1.0]] and out["contrast"].tolist() == [[1.0]]


def test_commitment_of_a_grey_average_and_of_another_class(digits_mixture):
    means, labels = digits_mixture.means, digits_mixture.labels
    final = means[:1]
    other = next(k for k in range(len(labels)) if labels[k] != labels[0])
    grey = torch.zeros_like(final)  # every pixel equal: no contrast at all
    assert commitment(fake_result(final, grey), means=means, labels=labels)["contrast"] == 0
    wrong = commitment(fake_result(final, means[other : other + 1]), means=means, labels=labels)
    assert wrong["same_label"] == 0


def test_n_step_estimates_show_the_final_digit_the_one_step_estimate_blurs(digits_mixture):
    """Notebook 01's reading of the figure: at t = 0.9 the 8-step estimate shows the final
    sample's digit more often and with more contrast than the one-step (posterior-mean)
    estimate, whose contrast is below the final sample's."""
    x_T = torch.randn(32, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    result = sk.misalignment(digits_mixture, x_T, times=(0.9,), ns=(1, 8), steps=40)
    out = commitment(result, means=digits_mixture.means, labels=digits_mixture.labels)
    (one, eight), (c_one, c_eight) = out["same_label"][0].tolist(), out["contrast"][0].tolist()
    assert eight > one and c_one < c_eight and c_one < 1


def test_commitment_refuses_means_or_labels_of_the_wrong_shape(digits_mixture):
    result = fake_result(digits_mixture.means[:2], digits_mixture.means[:2])
    with pytest.raises(ValueError, match=r"means must have shape \(K, 1, 8, 8\)"):
        commitment(result, means=digits_mixture.means[:, 0], labels=digits_mixture.labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(64,\)"):
        commitment(result, means=digits_mixture.means, labels=digits_mixture.labels[:3])


def test_the_progress_bars_advance_per_sampler_step_and_per_estimate(digits_mixture, monkeypatch):
    """No silent stretch: after the sampler's bar, a bar that advances once per estimate."""
    bars = []

    class Recording(misalignment_module.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.updates = 0
            bars.append(self)

        def update(self, n=1):
            self.updates += n
            return super().update(n)

    monkeypatch.setattr(misalignment_module, "tqdm", Recording)
    x_T = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sk.misalignment(digits_mixture, x_T, times=(0.9, 0.5), ns=(1, 2, 4), steps=10, progress=True)
    assert [(b.total, b.updates) for b in bars] == [(6, 6)]
