"""The misalignment study: n-step estimates get closer to the final sample as n grows."""

import importlib
import math

import pytest
import torch

import sagkit as sk
from sagkit.core.estimates import rms
from sagkit.lab.misalignment import commitment, matched_window, misalignment_by_noise_level

# the module, not the function sagkit.lab exports under the same name
misalignment_module = importlib.import_module("sagkit.lab.misalignment")

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
    out = sk.lab.misalignment(digits_mixture, x_T, times=(0.9, 0.5), ns=(1, 2, 4), steps=40)
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
    result = sk.lab.misalignment(digits_mixture, x_T, times=(0.9,), ns=(1, 8), steps=40)
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
    sk.lab.misalignment(
        digits_mixture, x_T, times=(0.9, 0.5), ns=(1, 2, 4), steps=10, progress=True
    )
    assert [(b.total, b.updates) for b in bars] == [(6, 6)]


# --- across schedules: matched noise levels -------------------------------------------------

VP, FLOW = sk.VPSchedule.linear(), sk.FlowSchedule.rectified()
MEAN = torch.tensor(
    [[[[-0.5, 0.3], [0.3, 0.3]]]], dtype=torch.float64
)  # one component, (1, 1, 2, 2)
STD = 0.5


def one_gaussian(schedule):
    return sk.GaussianMixture(MEAN, STD, schedule)


def one_step_misalignment(schedule, x_T, lam):
    """The closed form for one Gaussian N(μ, s² I): the exact flow is linear,
    x_t − α_t μ = sqrt(v_t/v_1)(x_1 − α_1 μ) with v_t = α_t² s² + σ_t², so with
    z = (x_T − α_1 μ)/sqrt(v_1) the exact final sample is μ + s z, the one-step estimate (the
    posterior mean) μ + (α_t s²/sqrt(v_t)) z, and their distance s (1 − s/sqrt(s² + e^{−2λ}))
    RMS(z) depends on λ alone, not on the schedule (docs/maths.md §3.4)."""
    a1, s1 = schedule.alpha(1.0), schedule.sigma(1.0)
    z = (x_T - a1 * MEAN) / math.sqrt(a1**2 * STD**2 + s1**2)
    gain = STD * (1 - STD / math.sqrt(STD**2 + math.exp(-2 * lam)))
    return float((gain * rms(z)).mean())


def test_states_are_kept_at_exactly_the_requested_noise_levels():
    x_T = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    models = {"vp": one_gaussian(VP), "flow": one_gaussian(FLOW)}
    lams = (-2.0, 0.5)
    out = misalignment_by_noise_level(models, x_T, lams=lams, ns=(1, 2), steps=10)
    for name, model in models.items():
        assert out["results"][name]["times"] == out["times"][name]
        got = [model.schedule.lam(t) for t in out["times"][name]]
        assert got == pytest.approx(lams, abs=1e-12)
        assert out["rms"][name].shape == (2, 2)
    assert torch.equal(out["ratio"]["flow"], out["rms"]["vp"] / out["rms"]["flow"])
    assert torch.equal(out["ratio"]["vp"], torch.ones(2, 2, dtype=torch.float64))


def test_the_one_step_misalignment_converges_to_the_closed_form_under_both_schedules():
    """DDIM is first order: the error against the closed form halves when the steps double (its
    error C h + O(h²), h ≤ 1/100, leaves the ratio within 0.5 ± 0.1)."""
    x_T = torch.randn(8, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    models = {"vp": one_gaussian(VP), "flow": one_gaussian(FLOW)}
    lams = (-2.0, 0.0, 1.5)
    errors = {}
    for steps in (100, 200):
        out = misalignment_by_noise_level(models, x_T, lams=lams, ns=(1,), steps=steps)
        for name, model in models.items():
            exact = torch.tensor([one_step_misalignment(model.schedule, x_T, lam) for lam in lams])
            errors[name, steps] = (out["rms"][name][:, 0] - exact.double()).abs()
    for name in models:
        halving = errors[name, 200] / errors[name, 100]
        assert bool(((halving > 0.4) & (halving < 0.6)).all()), (name, halving)


def test_the_one_step_estimate_depends_on_x_over_alpha_and_lambda_only(digits_mixture):
    """At the same λ and the same x_t/α_t the one-step estimate (the posterior mean) is the same
    under VP and under the rectified flow (float64 rounding of a softmax over 64 components)."""
    flow = sk.digits.digits_mixture(n_components=64, schedule=FLOW)
    y = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for lam in (-3.0, 0.0, 2.0):
        t_vp, t_flow = VP.t_of_lam(lam), FLOW.t_of_lam(lam)
        a = digits_mixture.x0(VP.alpha(t_vp) * y, t_vp)
        b = flow.x0(FLOW.alpha(t_flow) * y, t_flow)
        assert float((a - b).norm() / a.norm()) <= 1e-12


def test_misalignment_by_noise_level_refuses_bad_input():
    x_T = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    models = {"vp": one_gaussian(VP), "flow": one_gaussian(FLOW)}
    with pytest.raises(TypeError, match="at least two models"):
        misalignment_by_noise_level({"vp": models["vp"]}, x_T)
    with pytest.raises(ValueError, match=r"lams must be finite noise levels λ above"):
        misalignment_by_noise_level(models, x_T, lams=(-6.0,))  # below λ(1) ≈ −5.02 of VP
    with pytest.raises(ValueError, match="lams must be finite"):
        misalignment_by_noise_level(models, x_T, lams=(math.inf,))
    with pytest.raises(ValueError, match="ns entries"):
        misalignment_by_noise_level(models, x_T, ns=(0,))


# --- matched_window ---------------------------------------------------------------------------


def test_matched_window_guides_the_same_noise_levels():
    lo, hi = matched_window((0.3, 0.7), schedule=FLOW, reference=VP)
    assert FLOW.lam(1 - lo) == pytest.approx(VP.lam(0.7), abs=1e-12)
    assert FLOW.lam(1 - hi) == pytest.approx(VP.lam(0.3), abs=1e-12)
    assert lo < 0.3 and hi < 0.7  # VP's noise levels come earlier in a flow run
    assert matched_window((0.3, 0.7), schedule=VP, reference=VP) == pytest.approx((0.3, 0.7))
    assert matched_window((0.0, 1.0), schedule=FLOW, reference=VP) == (0.0, 1.0)


def test_matched_window_refuses_bad_input():
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        matched_window((0.7, 0.3), schedule=FLOW, reference=VP)
    with pytest.raises(ValueError, match="pair"):
        matched_window(0.5, schedule=FLOW, reference=VP)
    with pytest.raises(TypeError, match="reference must be a Schedule"):
        matched_window((0.3, 0.7), schedule=FLOW, reference="vp")
