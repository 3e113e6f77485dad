"""The shipped digits models in data/: loading, conditioning, gradients, classifier, evaluation."""

import math

import pytest
import torch
from helpers import RoundingChain, gamma, pair_bound, rel, roundoff_bound

import sagkit as sk
from sagkit.digits.evaluation import evaluate_digits, evaluate_samples, frechet_distance


@pytest.fixture(scope="module")
def model():
    return sk.digits.load_pretrained("digits", device="cpu")


@pytest.fixture(scope="module")
def model64():
    return sk.digits.load_pretrained("digits", device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def classifier():
    return sk.digits.load_classifier("digits", device="cpu")


def _frechet_rounding(a: torch.Tensor, b: torch.Tensor) -> float:
    """A bound on the float64 rounding of ``frechet_distance(a, b)`` for features (N, d), with
    Σ the larger covariance: ‖μ_a − μ_b‖² and the traces are sums off by γ_{N+d} of their
    magnitude; each of the d eigenvalues of Σ_a^½ Σ_b Σ_a^½ (two d-long products, then a
    backward-stable eigvalsh) is off by at most γ_3d ‖Σ‖², and its square root, near 0, by at
    most √(γ_3d) ‖Σ‖."""
    stats = []
    for f in (a.double(), b.double()):
        cov = torch.atleast_2d(torch.cov(f.T))
        norm = float(torch.linalg.matrix_norm(cov, ord=2))
        stats.append((norm, float(cov.trace()), float(f.mean(0).square().sum())))
    n, d = max(len(a), len(b)), a.shape[1]
    norm = max(s[0] for s in stats)
    sums = 4 * gamma(n + d, torch.float64) * sum(s[1] + s[2] for s in stats)
    return sums + 2 * d * math.sqrt(gamma(3 * d, torch.float64)) * norm


def test_digits_dataset_split():
    train_x, train_y = sk.digits.digits_dataset("train")
    test_x, test_y = sk.digits.digits_dataset("test")
    all_x, _ = sk.digits.digits_dataset("all", size=8, dtype=torch.float64)
    assert train_x.shape == (1437, 1, 16, 16) and test_x.shape == (360, 1, 16, 16)
    assert train_x.dtype == torch.float32 and all_x.shape == (1797, 1, 8, 8)
    assert train_y.dtype == torch.int64 and set(test_y.tolist()) == set(range(10))
    assert torch.bincount(test_y).min() >= 35  # stratified
    assert train_x.min() >= -1 and train_x.max() <= 1
    # fixed: the same split every call, and no held-out image is a training image
    assert torch.equal(sk.digits.digits_dataset("test")[0], test_x)
    dist = torch.cdist(test_x.flatten(1), train_x.flatten(1))
    assert (dist.min(1).values > 0).float().mean() > 0.99
    with pytest.raises(ValueError, match="split"):
        sk.digits.digits_dataset("valid")


def test_load_pretrained(model):
    assert isinstance(model, sk.digits.DigitsModel) and isinstance(model, sk.DiffusersModel)
    assert model.classes == 10 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.schedule.num_train_timesteps == 1000
    e = model.unet.config.block_out_channels[0] * 4
    assert model.null_cond.shape == (1, e)
    cond = model.cond_for(torch.arange(11))
    assert cond.shape == (11, e) and cond.dtype == torch.float32
    assert torch.equal(cond[10:], model.null_cond) and model.cond_for(3).shape == (1, e)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = model.eps(x, 0.5, model.cond_for([0, 1, 2, 10]))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_load_deterministic_and_float64(model, model64):
    again = sk.digits.load_pretrained("digits", device="cpu")
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.5, 0.9])
    labels = [4, 7, 10]
    with RoundingChain() as chain:
        out = model.eps(x, t, model.cond_for(labels))
        out64 = model64.eps(x.double(), t, model64.cond_for(labels))
    assert torch.equal(out, again.eps(x, t, again.cond_for(labels)))
    assert out64.dtype == torch.float64 and model64.cond_for(labels).dtype == torch.float64
    # the same weights in both: float32 rounding over the counted chain, plus float64's
    bounds = (
        roundoff_bound(chain.longest(out), torch.float32),
        roundoff_bound(chain.longest(out64), torch.float64),
    )
    assert rel(out, out64) <= pair_bound(*bounds)


def test_default_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert sk.digits.load_pretrained("digits").embeddings.device.type == expected
    assert next(sk.digits.load_classifier("digits").parameters()).device.type == expected


def test_from_pretrained_is_used(monkeypatch):
    from diffusers import DDPMScheduler, UNet2DModel

    calls = []

    def spy(cls):
        original = cls.from_pretrained.__func__

        def wrapped(klass, *args, **kwargs):
            calls.append(klass.__name__)
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(wrapped))

    spy(UNet2DModel)
    spy(DDPMScheduler)
    sk.digits.load_pretrained("digits", device="cpu")
    assert calls == ["UNet2DModel", "DDPMScheduler"]


def test_cond_for_rejects_bad_labels(model):
    for bad in ([11], [-1], [0.5], [[1, 2]]):
        with pytest.raises(ValueError, match="labels"):
            model.cond_for(bad)


def test_unknown_names():
    with pytest.raises(ValueError, match="known: digits"):
        sk.digits.load_pretrained("cifar")
    with pytest.raises(ValueError, match="known: digits"):
        sk.digits.load_classifier("mnist")


def test_cond_gradient_matches_finite_differences(model64):
    """∂L(solve)/∂cond through 3 DDIM steps with CFG: finite and equal to central differences."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 16, 16, generator=gen, dtype=torch.float64)
    cond = model64.cond_for([3, 8])
    guided = sk.ClassifierFreeGuidance(model64, model64.null_cond, 2.0)
    ts = sk.time_grid(model64.schedule, 0.8, 0.0, 3)

    def loss(c):
        return sk.solve(guided, x, ts, solver="ddim", cond=c).square().mean()

    c = cond.clone().requires_grad_()
    with RoundingChain() as chain:
        value = loss(c)
    (grad,) = torch.autograd.grad(value, c)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    v = torch.randn(cond.shape, generator=gen, dtype=torch.float64)
    delta = 1e-4

    def central(d):
        return float(loss(cond + d * v) - loss(cond - d * v)) / (2 * d)

    with torch.no_grad():
        fd = (4 * central(delta / 2) - central(delta)) / 3  # Richardson: O(δ⁴)
    # each loss value is off by ≤ γ_N |L|, weighed by 3/δ in all; the truncation f⁽⁵⁾δ⁴/480 is
    # 2e-19 f⁽⁵⁾, negligible
    bound = 3 * roundoff_bound(chain.longest(value), torch.float64) * abs(value.item()) / delta
    assert abs(float((grad * v).sum()) - fd) <= bound


def test_classifier_outputs(classifier):
    assert not classifier.training
    assert not any(p.requires_grad for p in classifier.parameters())
    x = torch.randn(5, 1, 16, 16).clamp(-1, 1)
    assert classifier.logits(x).shape == (5, 10)
    assert classifier.features(x).shape == (5, classifier.config["features"])
    maps = classifier.feature_maps(x)
    assert [m.shape[-1] for m in maps] == [16, 8, 4] and all(m.shape[0] == 5 for m in maps)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(classifier.logits(x)[:, 3].sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    with pytest.raises(ValueError, match="shape"):
        classifier.logits(torch.zeros(2, 1, 8, 8))
    clf64 = sk.digits.load_classifier("digits", device="cpu", dtype=torch.float64)
    with RoundingChain() as chain:
        logits, logits64 = classifier.logits(x.detach()), clf64.logits(x.detach().double())
    # the same weights in both: float32 rounding over the counted chain, plus float64's
    bounds = (
        roundoff_bound(chain.longest(logits), torch.float32),
        roundoff_bound(chain.longest(logits64), torch.float64),
    )
    assert rel(logits, logits64) <= pair_bound(*bounds)


def test_classifier_heldout_accuracy(classifier):
    test_x, test_y = sk.digits.digits_dataset("test")
    result = evaluate_samples(classifier, test_x, test_y, test_x)
    assert result["accuracy"] >= 0.9
    features = classifier.features(test_x)
    assert abs(result["fd"]) <= _frechet_rounding(features, features)  # 0 but for rounding


def test_frechet_distance_one_dimensional():
    """In one dimension the distance is (μ_a − μ_b)² + (s_a − s_b)²."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(500, 1, generator=gen, dtype=torch.float64)
    b = 2 + 3 * torch.randn(400, 1, generator=gen, dtype=torch.float64)
    expected = (a.mean() - b.mean()) ** 2 + (a.std() - b.std()) ** 2
    # float64, d = 1: means and deviations are sums of 500 terms, γ_500 ≈ 6e-14 ≪ 1e-9
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-9)
    c = torch.randn(300, 4, generator=gen)
    d = torch.randn(300, 4, generator=gen) @ torch.randn(4, 4, generator=gen)
    # both orders are the same number; each is off by at most the rounding bound
    assert abs(frechet_distance(c, d) - frechet_distance(d, c)) <= 2 * _frechet_rounding(c, d)


def test_sample_and_evaluate(model, classifier):
    labels = [1, 4, 10]
    a = sk.digits.sample_digits(
        model, labels, scale=2.0, steps=4, generator=torch.Generator().manual_seed(0)
    )
    b = sk.digits.sample_digits(
        model, labels, scale=2.0, steps=4, generator=torch.Generator().manual_seed(0)
    )
    assert a.shape == (3, 1, 16, 16) and torch.isfinite(a).all() and torch.equal(a, b)
    result = evaluate_digits(model, classifier, scales=(2.0,), per_class=3, steps=20)
    assert set(result) == {"heldout", "w=2"}
    assert result["heldout"]["accuracy"] >= 0.9 and result["heldout"]["fd"] > 0
    assert result["w=2"]["accuracy"] >= 0.8 and result["w=2"]["fd"] > 0  # the shipped UNet works
