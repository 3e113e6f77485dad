"""The exact guidance targets of a mixture (sagkit.core.tilted) against what they must equal:
the mixture itself when untilted, self-normalised importance sampling from p_0 for the tilt,
finite differences of log E[e^{−L} | x_t] and Monte Carlo over the exact posterior p(x_0 | x_t)
for the guidance score (docs/maths.md §14)."""

import math

import pytest
import torch
from helpers import gamma, seeded

import sagkit as sk
from sagkit.core.tilted import (
    ClassLoss,
    ExactGuidance,
    LinearLoss,
    QuadraticLoss,
    TiltedMixture,
    pooling_matrix,
)

F64 = torch.float64
SIGMAS = 5  # Monte-Carlo checks: within 5 standard errors (a false alarm at 5.7e-7 per entry)


def top_half():
    mask = torch.zeros(1, 8, 8, dtype=F64)
    mask[:, :4] = 1
    return mask


def reference(mixture):
    """A digit that is not one of the mixture's means: its mean plus a fixed offset."""
    return mixture.means[0].detach() + 0.2 * torch.randn(1, 8, 8, dtype=F64, generator=seeded(7))


def losses(mixture):
    """Every closed-form family, at a posterior broad enough for importance sampling."""
    ref = reference(mixture)
    dense = torch.randn(5, 64, dtype=F64, generator=seeded(3)) / 8
    return {
        "inpaint": QuadraticLoss.masked(ref, top_half(), tau=0.5),
        "downsample": QuadraticLoss(
            pooling_matrix((1, 8, 8), 2), pooling_matrix((1, 8, 8), 2) @ ref.flatten(), tau=0.3
        ),
        "dense": QuadraticLoss(dense, dense @ ref.flatten(), tau=0.4),
        "linear": LinearLoss(0.5 * torch.randn(1, 8, 8, dtype=F64, generator=seeded(4))),
        "class": ClassLoss.for_label(mixture, int(mixture.labels[0]), strength=3.0),
    }


@pytest.fixture(scope="module", params=["vp", "flow"])
def digits(request):
    schedule = (
        sk.VPSchedule.linear() if request.param == "vp" else sk.FlowSchedule.rectified(shift=3.0)
    )
    return sk.digits.digits_mixture(n_components=32, schedule=schedule)


def test_the_untilted_mixture_is_the_mixture(mixture):
    prior = TiltedMixture.of(mixture)
    x = torch.randn(6, *mixture.event_shape, dtype=F64, generator=seeded(0))
    for t in (0.0, 0.3, 0.8, 0.999):
        a = mixture.schedule.alpha(t)
        v = a**2 * mixture.std**2 + mixture.schedule.sigma(t) ** 2
        mu = mixture.means.detach().abs().max()
        # q_k expanded into three products of D terms, each at most (|x| + α|μ|)²/v: the logits
        # err by γ_{3D+3} times that, the softmax weights by twice it, x̂0 and ε by that × |μ|.
        logit = gamma(3 * x[0].numel() + 3, F64) * float((x.abs().max() + a * mu) ** 2 / v) * 4
        scale = float(x.abs().max() + mu)
        tol = logit * scale + gamma(8, F64) * scale / min(v, 1.0)
        assert (prior.x0(x, t) - mixture.x0(x, t)).abs().max() <= tol
        assert (prior.eps(x, t) - mixture.eps(x, t)).abs().max() <= tol


@pytest.mark.parametrize("name", ["inpaint", "downsample", "dense", "linear", "class"])
def test_the_tilt_is_what_importance_sampling_gives(name):
    """p_0 e^{−L}/Z against self-normalised importance sampling from p_0: Z, the mean and the
    second moment of every pixel, within 5 standard errors (delta method). The tilt is at
    t = 0, the same under every schedule."""
    digits = sk.digits.digits_mixture(n_components=32)
    loss = losses(digits)[name]
    target = loss.tilt(digits)
    n = 100_000
    x = digits.sample(n, generator=seeded(1)).reshape(n, -1)
    weights = torch.exp(-loss(x.reshape(n, 1, 8, 8)))
    z, z_err = weights.mean(), weights.std() / math.sqrt(n)
    assert abs(float(z) - math.exp(target.log_normaliser)) <= SIGMAS * float(z_err)
    w = weights / weights.sum()
    pi = target.log_weights.exp()
    basis = torch.eye(64, dtype=F64) if target.basis is None else target.basis
    mean = pi @ target.means  # Σ_k π̃_k m_k
    second = pi @ target.means**2 + (basis**2) @ target.variances  # + diag(U diag(d) Uᵀ)
    for moment, truth in ((x, mean), (x**2, second)):
        estimate = (w[:, None] * moment).sum(0)
        error = ((w[:, None] ** 2) * (moment - estimate) ** 2).sum(0).sqrt()
        assert ((estimate - truth).abs() <= SIGMAS * error).all(), name


def test_the_class_tilt_is_the_mixture_conditioned_on_its_logits(digits):
    loss = losses(digits)["class"]
    target = loss.tilt(digits)
    x = torch.randn(4, 1, 8, 8, dtype=F64, generator=seeded(0))
    for t in (0.2, 0.7):
        ref = digits.eps(x, t, cond=loss.logits)
        # two evaluations of the same softmax average, by the expansion and by the mixture:
        # as in the untilted test, γ_{3D+3} (|x| + |μ|)²/v_t of the logits, times |ε|'s scale
        v = digits.schedule.alpha(t) ** 2 * digits.std**2 + digits.schedule.sigma(t) ** 2
        tol = (
            gamma(3 * 64 + 3, F64)
            * float((x.abs().max() + 1) ** 2 / v)
            * 4
            * float(x.abs().max() + 1)
        )
        assert (target.eps(x, t) - ref).abs().max() <= tol


def central_difference_error(f, directional, *, error, delta=1e-2):
    """|R(δ/2) − ``directional``| and its bound, R(δ) = (4 D(δ/2) − D(δ))/3 Richardson's
    extrapolation of the central difference D of f at 0 (§5.5). Truncation: R's error is
    O(δ⁴), so |R(δ) − R(δ/2)| ≈ 15/16 of R(δ)'s error bounds R(δ/2)'s. Rounding: f errs by
    ``error``, D(d) by error/d, so R(δ/2) = (4 D(δ/4) − D(δ/2))/3 by (16 + 2)/3 · error/δ."""

    def central(d):
        return (f(d) - f(-d)) / (2 * d)

    def richardson(d):
        return (4 * central(d / 2) - central(d)) / 3

    truncation = (richardson(delta) - richardson(delta / 2)).abs()
    return (richardson(delta / 2) - directional).abs(), 6 * error / delta + truncation


def test_the_guidance_score_is_the_gradient_of_log_e(digits):
    """h_t against autograd of log E[e^{−L} | x_t] (to roundoff) and against its central
    differences with Richardson extrapolation (docs/maths.md §5.5)."""
    x = torch.randn(3, 1, 8, 8, dtype=F64, generator=seeded(5))
    v = torch.randn(3, 1, 8, 8, dtype=F64, generator=seeded(6))
    for name, loss in losses(digits).items():
        exact = ExactGuidance(digits, loss)
        for t in (0.3, 0.8):
            h = exact.score(x, t)
            leaf = x.clone().requires_grad_()
            (auto,) = torch.autograd.grad(exact.log_expected(leaf, t).sum(), leaf)
            # both differentiate sums of D terms over K components: γ_{4DK} × the scale
            assert (auto - h).abs().max() <= gamma(4 * 64 * 32, F64) * float(h.abs().max() + 1)
            # log E = log p̃_t − log p_t + log Z, each a logsumexp of quadratic forms of D
            # terms up to |x|²/σ_t²: γ_{3D+8} of those magnitudes
            size = exact.target.log_prob(x, t).abs() + exact.prior.log_prob(x, t).abs()
            size = size + x.flatten(1).pow(2).sum(1) / digits.schedule.sigma(t) ** 2
            error, bound = central_difference_error(
                lambda d, exact=exact, t=t: exact.log_expected(x + d * v, t),
                (h * v).flatten(1).sum(1),
                error=gamma(3 * 64 + 8, F64) * size,
            )
            assert (error <= bound).all(), (name, t)


def test_the_guidance_score_matches_monte_carlo_over_the_exact_posterior(digits):
    """log E[e^{−L} | x_t] and Ẽ[x_0 | x_t] − E[x_0 | x_t] = (σ_t²/α_t) h_t from draws of
    p(x_0 | x_t), within 5 standard errors (delta method for the ratio)."""
    m = 40_000
    for name, loss in losses(digits).items():
        exact = ExactGuidance(digits, loss)
        t = 0.6
        x0 = exact.target.sample(2, generator=seeded(8))
        a, s = digits.schedule.alpha(t), digits.schedule.sigma(t)
        x = a * x0 + s * torch.randn(x0.shape, dtype=F64, generator=seeded(9))
        draws = exact.prior.posterior_sample(x, t, m, generator=seeded(10))  # (m, 2, 1, 8, 8)
        w = torch.exp(-loss(draws.reshape(-1, 1, 8, 8)).reshape(m, 2))
        mean_w, err_w = w.mean(0), w.std(0) / math.sqrt(m)
        log_e = exact.log_expected(x, t)
        assert ((torch.log(mean_w) - log_e).abs() <= SIGMAS * err_w / mean_w).all(), name
        flat = draws.reshape(m, 2, -1)
        tilted = (w[..., None] * flat).sum(0) / w.sum(0)[:, None]
        error = ((w[..., None] ** 2 * (flat - tilted) ** 2).sum(0)).sqrt() / w.sum(0)[:, None]
        plain = flat.mean(0)
        shift = exact.x0_shift(x, t).reshape(2, -1)
        mc = tilted - plain
        bound = SIGMAS * (error + flat.std(0) / math.sqrt(m))
        assert ((mc - shift).abs() <= bound).all(), name
        # the same shift is (σ²/α) h: Tweedie's formula for both p and p̃
        h = exact.score(x, t).reshape(2, -1)
        assert torch.allclose(shift, (s**2 / a) * h, rtol=1e-9, atol=1e-12)


def test_the_prediction_shift_in_each_frame(digits):
    loss = losses(digits)["inpaint"]
    exact = ExactGuidance(digits, loss)
    x = torch.randn(2, 1, 8, 8, dtype=F64, generator=seeded(0))
    t = 0.5
    s = digits.schedule.sigma(t)
    eps = sk.core.frames.get_frame("eps")
    # ε̃ − ε* = −σ_t h_t; the velocity shift is ε's minus x̂0's
    assert torch.allclose(exact.pred_shift(x, t, frame=eps), -s * exact.score(x, t), atol=1e-12)
    velocity = sk.core.frames.get_frame("velocity")
    expected = exact.pred_shift(x, t, frame=eps) - exact.x0_shift(x, t)
    assert torch.allclose(exact.pred_shift(x, t, frame=velocity), expected, atol=1e-12)


def test_pooling_matrix_is_average_pooling():
    image = torch.randn(2, 3, 4, 6, dtype=F64, generator=seeded(0))
    a = pooling_matrix((3, 4, 6), 2)
    pooled = torch.nn.functional.avg_pool2d(image, 2).reshape(2, -1)
    assert torch.allclose(image.reshape(2, -1) @ a.T, pooled, atol=1e-15)


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda m: QuadraticLoss.masked(m.means[0], torch.ones(3, 3), tau=0.5),
            "mask must broadcast",
        ),
        (lambda m: QuadraticLoss(torch.eye(4), torch.zeros(4), tau=0.0), "tau must be positive"),
        (lambda m: QuadraticLoss(torch.eye(4), torch.zeros(3), tau=1.0), "matrix must be"),
        (
            lambda m: QuadraticLoss(torch.eye(4), torch.zeros(4), tau=1.0).tilt(m),
            "matrix must have 64",
        ),
        (lambda m: LinearLoss(torch.ones(5)).tilt(m), "weight must have 64"),
        (lambda m: ClassLoss(m, torch.ones(m.means.shape[0])), "logits must be ≤ 0"),
        (lambda m: ClassLoss(m, torch.zeros(3)), "logits must have shape"),
        (
            lambda m: ClassLoss.for_label(m, 1, strength=2).tilt(
                sk.digits.digits_mixture(n_components=32)
            ),
            "tilts the mixture",
        ),
        (
            lambda m: TiltedMixture.of(m).eps(torch.zeros(1, 1, 8, 8), 0.5, torch.zeros(3)),
            "takes no cond",
        ),
        (lambda m: TiltedMixture.of(m).eps(torch.zeros(1, 8, 8), 0.5), "x must have shape"),
    ],
)
def test_bad_inputs_are_refused_by_name(build, match):
    with pytest.raises(ValueError, match=match):
        build(sk.digits.digits_mixture(n_components=32))


def test_exact_guidance_needs_a_closed_form_loss():
    with pytest.raises(TypeError, match="loss must be"):
        ExactGuidance(sk.digits.digits_mixture(n_components=32), lambda x: x.sum())
