"""The model protocol: the exact Gaussian mixture (score, ε, posterior mean, conditioning, samples) and shape checks."""

import math

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


def _brute_force_log_density(model, x, t):
    """log p_t(x) for the diffused mixture, written out component by component."""
    alpha, sigma = model.schedule.alpha(t), model.schedule.sigma(t)
    var = alpha**2 * model.std**2 + sigma**2
    d = x[0].numel()
    terms = []
    for k in range(model.means.shape[0]):
        diff = (x - alpha * model.means[k]).flatten(1)
        log_norm = -0.5 * d * math.log(2 * math.pi * var)
        terms.append(model.log_weights[k] + log_norm - diff.pow(2).sum(1) / (2 * var))
    return torch.logsumexp(torch.stack(terms), dim=0)


# under the flow only at t = 1, its endpoint (α = 0): elsewhere the same code on other numbers
@pytest.mark.parametrize(
    "mixture, t",
    [("vp", 0.05), ("vp", 0.3), ("vp", 0.8), ("vp", 1.0), ("flow", 1.0)],
    indirect=["mixture"],
)
def test_mixture_eps_is_scaled_score(mixture, t):
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    score = torch.autograd.grad(_brute_force_log_density(mixture, x, t).sum(), x)[0]
    sigma = mixture.schedule.sigma(t)
    assert torch.allclose(mixture.eps(x, t), -sigma * score, rtol=1e-10, atol=1e-12)


def test_mixture_x0_is_posterior_mean(mixture):
    """E[x_0 | x_t]: each component's Gaussian posterior mean, weighted by its responsibility."""
    t = 0.4
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    alpha, sigma = mixture.schedule.alpha(t), mixture.schedule.sigma(t)
    s2 = mixture.std**2
    var = alpha**2 * s2 + sigma**2
    logits, posts = [], []
    for k in range(3):
        mu = mixture.means[k]
        logits.append(
            mixture.log_weights[k] - (x - alpha * mu).flatten(1).pow(2).sum(1) / (2 * var)
        )
        posts.append(mu + alpha * s2 / var * (x - alpha * mu))  # Gaussian conditioning
    w = torch.softmax(torch.stack(logits, 1), 1)
    expected = sum(w[:, k, None, None, None] * posts[k] for k in range(3))
    assert torch.allclose(mixture.x0(x, t), expected, rtol=1e-12, atol=1e-13)


def test_mixture_cond_logits_shift_weights(mixture):
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    assert torch.allclose(mixture.eps(x, 0.5, cond=torch.zeros(3)), mixture.eps(x, 0.5))
    favour_first = torch.tensor([[50.0, 0.0, 0.0]], dtype=torch.float64)
    one = sk.GaussianMixture(mixture.means[:1], mixture.std, mixture.schedule)
    # the other components keep weights ≈ e^-50 ≈ 2e-22; rounding γ_N |ε| ≈ 1e-15 ≪ 1e-12
    assert torch.allclose(mixture.eps(x, 0.5, cond=favour_first), one.eps(x, 0.5), atol=1e-12)


def test_mixture_sample_statistics(mixture):
    x = mixture.sample(20000, generator=torch.Generator().manual_seed(0))
    mean = (mixture.log_weights.exp()[:, None, None, None] * mixture.means).sum(0)
    assert x.shape == (20000, 1, 2, 2)
    # the sample mean is off by a standard error sd/√n per pixel: allow 6 of them
    assert torch.allclose(x.mean(0), mean, atol=6 * float(x.std(0).max()) / math.sqrt(len(x)))


def test_digits_mixture():
    m = sk.digits.digits_mixture(n_components=100, size=16)
    assert m.means.shape == (100, 1, 16, 16)
    assert float(m.means.min()) >= -1 - 1e-9 and float(m.means.max()) <= 1 + 1e-9
    assert m.labels.shape == (100,) and set(m.labels.tolist()) <= set(range(10))


def test_bad_shapes(mixture, unet_model):
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 2, 2\)"):
        mixture.eps(torch.randn(2, 3, 3, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"):
        unet_model.eps(torch.randn(2, 3, 8, 8, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="t must be a float or a tensor of shape"):
        mixture.eps(torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.tensor([0.1, 0.2, 0.3]))
