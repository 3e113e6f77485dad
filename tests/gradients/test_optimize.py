"""DDIM inversion, optimize_latent and morphing (on exact mixtures and tiny random networks)."""

import pytest
import torch
from helpers import RoundingChain, roundoff_bound, tiny_unet, top_time

import sagkit as sk
from sagkit.gradients.optimize import cosine_distance, identity_loss, slerp


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("method", ["adjointdeis-2", "adjointdeis-1-data", "backprop"])
def test_optimize_latent_lowers_the_loss(mixture, method):
    target = mixture.means[1:2].detach().expand(2, -1, -1, -1)
    loss = lambda y: ((y - target) ** 2).flatten(1).sum(1)  # noqa: E731
    ts = sk.time_grid(mixture.schedule, top_time(mixture.schedule), 1e-3, 20, spacing="lambda")
    res = sk.optimize_latent(
        mixture,
        loss,
        _randn((2, 1, 2, 2), 0),
        steps=15,
        lr=0.2,
        method=method,
        ts=ts,
        progress=False,
    )
    assert len(res.losses) == 16
    assert res.losses[-1] < 0.5 * res.losses[0]
    # the same float64 operations on the same x: the very same number
    assert float(loss(sk.solve(mixture, res.x, ts)).sum()) == res.losses[-1]


def test_optimize_cond_only(mixture):
    target = mixture.means[2:3].detach().expand(2, -1, -1, -1)
    loss = lambda y: ((y - target) ** 2).flatten(1).sum(1)  # noqa: E731
    ts = sk.time_grid(mixture.schedule, 1.0, 1e-3, 10)
    x = _randn((2, 1, 2, 2), 0)
    z = torch.zeros(2, 3, dtype=torch.float64)
    res = sk.optimize_latent(
        mixture, loss, x, cond=z, steps=10, lr=0.3, ts=ts, optimize="cond", progress=False
    )
    assert torch.equal(res.x, x)
    assert res.losses[-1] < res.losses[0]
    with pytest.raises(ValueError, match="optimize must be"):
        sk.optimize_latent(mixture, loss, x, cond=z, ts=ts, optimize=("x", "weights"))
    with pytest.raises(ValueError, match="needs a cond"):
        sk.optimize_latent(mixture, loss, x, ts=ts, optimize=("cond",))


def test_slerp_keeps_the_norm_of_orthogonal_equal_vectors():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    with RoundingChain() as chain:
        norm = slerp(a, b).norm(dim=1)
    assert float((norm - 1).abs().max()) <= roundoff_bound(chain.longest(norm), torch.float32)
    assert torch.equal(slerp(a, a), a)  # θ = 0 exactly: ½ a + ½ a, exact in binary


class _TinyDigits(sk.DiffusersModel):
    """A random conditional UNet with a table of conditionings, like sk.digits.DigitsModel."""

    def __init__(self, scheduler):
        super().__init__(tiny_unet(class_embed_type="identity").double().eval(), scheduler)
        self.requires_grad_(False)
        self.table = _randn((3, 32), 7)

    def cond_for(self, labels):
        return self.table[torch.as_tensor(labels)]


def _morph_setup(scheduler, n):
    """A tiny model and 3-class classifier, six 8×8 images of classes 0, 1, 2 and an n-step grid."""
    model = _TinyDigits(scheduler)
    torch.manual_seed(0)
    clf = (
        sk.digits.DigitsClassifier(channels=(4, 8, 8), features=8, classes=3, size=8)
        .double()
        .eval()
    )
    clf.requires_grad_(False)
    images = _randn((6, 1, 8, 8), 1).clamp(-1, 1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, clf, images, labels, sk.time_grid(model.schedule, 1.0, model.schedule.t_min, n)


def test_morph_runs_and_lowers_the_identity_loss(scheduler):
    model, clf, images, labels, ts = _morph_setup(scheduler, 4)
    out = sk.evaluate_morphs(
        model,
        clf,
        images,
        labels,
        n_pairs=3,
        ts=ts,
        steps=6,
        lr=0.1,
        inversion_iters=1,
        progress=False,
    )
    s = out["summary"]
    assert s["pairs"] == 3
    assert s["loss_after"] < s["loss_before"]
    assert out["after"].shape == (3, 1, 8, 8)
    assert out["success_after"].dtype == torch.bool
    assert bool((labels[out["pairs"][:, 0]] != labels[out["pairs"][:, 1]]).all())
    # the identity loss: d_a + d_b + |d_a − d_b|, zero only if e(x) is parallel to both
    loss = identity_loss(clf, out["a"], out["b"])
    d_a = cosine_distance(clf.features(out["after"]), clf.features(out["a"]))
    d_b = cosine_distance(clf.features(out["after"]), clf.features(out["b"]))
    assert torch.allclose(loss(out["after"]), d_a + d_b + (d_a - d_b).abs())


def test_evaluate_morphs_counts_only_realistic_morphs_as_successes(scheduler):
    """A realism check that rejects every image leaves no success, and the summary says how
    many morphs it rejected; one that accepts all leaves the success rates as they were."""
    model, clf, images, labels, ts = _morph_setup(scheduler, 3)
    options = dict(n_pairs=3, ts=ts, steps=2, lr=0.1, inversion_iters=1, progress=False)

    def none_real(x):
        return torch.zeros(len(x), dtype=torch.bool)

    def all_real(x):
        return torch.ones(len(x), dtype=torch.bool)

    plain = sk.evaluate_morphs(model, clf, images, labels, **options)
    rejected = sk.evaluate_morphs(model, clf, images, labels, realism=none_real, **options)
    accepted = sk.evaluate_morphs(model, clf, images, labels, realism=all_real, **options)
    assert rejected["summary"]["rejected_after"] == rejected["summary"]["rejected_before"] == 3
    assert rejected["summary"]["success_after"] == rejected["summary"]["success_before"] == 0
    assert accepted["summary"]["rejected_after"] == 0
    assert accepted["summary"]["success_after"] == plain["summary"]["success_after"]
    assert "rejected_after" not in plain["summary"]
