"""The independent judge (sagkit.digits.judge): its torch decision function is scikit-learn's,
its stored accuracies are measured again, retraining gives the stored files, and it never saw
a digit the guiding classifier was trained on."""

import json

import pytest
import torch
from helpers import gamma, unit_roundoff

from sagkit.digits.data import digits_dataset
from sagkit.digits.judge import (
    JUDGE_DIR,
    DigitsJudge,
    judge_accuracies,
    load_judge,
    train_judge,
    upsampling_matrix,
)

U64 = unit_roundoff(torch.float64)
D = 64  # pixels of an 8×8 image


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def held_out():
    return digits_dataset("test", size=8, dtype=torch.float64)


@pytest.fixture(scope="module")
def trained(judge, held_out):
    """scikit-learn's one-vs-rest SVC fitted as the stored config says."""
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import SVC

    images, labels = held_out
    mine = judge.config["training"]["indices"]
    svc = SVC(C=judge.config["C"], kernel="rbf", gamma=judge.config["gamma"])
    return OneVsRestClassifier(svc).fit(images.flatten(1)[mine].numpy(), labels[mine].numpy())


def _decision_bound(judge) -> torch.Tensor:
    """(10,) the float64 rounding bound of each f_k between two implementations (see the use)."""
    chain = judge.coef.shape[1] + 2 + 4 * judge.gamma * D * (D + 2)
    return 2 * gamma(round(chain) + 1, torch.float64) * judge.coef.abs().sum(1)


def test_decision_function_is_scikit_learns(judge, trained):
    x, _ = digits_dataset("train", size=8, dtype=torch.float64)
    theirs = torch.from_numpy(trained.decision_function(x.flatten(1).numpy()))
    # each side: d² (D squares of |u − s| ≤ 2) within 4D(D+2)u, so K_i within (4γD(D+2)+1)u relatively; a sum of M terms adds Mu: |Δf_k| ≤ 2γ_{M+2+4γD(D+2)} Σ_i|α_ki|
    assert ((judge.logits(x) - theirs).abs() <= _decision_bound(judge)).all()
    assert torch.equal(judge.predict(x), torch.from_numpy(trained.predict(x.flatten(1).numpy())))


def test_sixteen_pixels_reduce_to_the_original_eight(judge, held_out):
    """R inverts the bilinear upsampling: the 16×16 held-out digits get the 8×8 logits."""
    x8, _ = held_out
    x16, _ = digits_dataset("test", size=16, dtype=torch.float64)
    R = judge.reduction
    assert torch.equal(R, torch.linalg.pinv(upsampling_matrix(16)))
    norm = R.abs().sum(1).max()  # ‖R‖∞
    # u = R x Rᵀ sums 16·16 products of |R| ≤ ‖R‖∞ with pixels ≤ 1 that the upsampling rounded by 2u: per pixel ≤ (γ_32 + 2u)‖R‖∞²; d² moves by ≤ 4D that (|u − s| ≤ 2 twice), f_k by γ that Σ|α_ki|, plus each side's rounding
    pixel = (gamma(32, torch.float64) + 2 * U64) * norm**2
    bound = judge.gamma * 4 * D * pixel * judge.coef.abs().sum(1) + _decision_bound(judge)
    assert ((judge.logits(x16) - judge.logits(x8)).abs() <= bound).all()
    assert torch.equal(judge.predict(x16), judge.predict(x8))


def test_stored_accuracies_are_measured_again(judge, held_out):
    images, labels = held_out
    stored = judge.config["accuracy"]
    rest = sorted(set(range(len(labels))) - set(judge.config["training"]["indices"]))
    assert len(rest) == 120
    correct = int((judge.predict(images[rest]) == labels[rest]).sum())
    assert correct / len(rest) == stored["held_out_rest"]
    train, train_labels = digits_dataset("train", size=16)
    assert len(train) == 1437
    correct = int((judge.predict(train) == train_labels).sum())  # float32 16×16, as samples come
    assert (
        correct / len(train) == stored["classifier_train"] == stored["classifier_train_16_reduced"]
    )
    assert judge_accuracies(judge, rest) == stored
    # the stored 118/120 less 4 images, room for a libsvm whose solver moves a few boundary digits
    assert stored["held_out_rest"] >= 114 / 120
    # a digit reduced by 2×2 average pooling is blurred, not the original: it scores lower
    assert stored["classifier_train_16_avg_pool"] < stored["classifier_train_16_reduced"]


def test_retraining_reproduces_the_stored_files(tmp_path):
    judge = train_judge(tmp_path)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "digits-judge" / name).read_bytes() == (JUDGE_DIR / name).read_bytes()
    assert judge.config == json.loads((JUDGE_DIR / "config.json").read_text())


def test_trained_only_on_digits_the_classifier_never_saw(judge, held_out):
    """Its training digits are 240 distinct held-out digits, each unlike every one of the 1437
    the classifier was trained on (no held-out image equals a training image), and its
    support vectors are among them."""
    images, labels = held_out
    mine = judge.config["training"]["indices"]
    assert len(set(mine)) == len(mine) == 240 and set(mine) <= set(range(len(labels)))
    seen, _ = digits_dataset("train", size=8, dtype=torch.float64)
    distances = torch.cdist(images.flatten(1)[mine], seen.flatten(1))
    assert distances.min() > 0
    same = judge.support[:, None, :] == images.flatten(1)[mine][None]
    assert same.all(-1).any(1).all()
    # stratified: each digit's share of the 240 is 2/3 of its held-out count, up to rounding
    assert ((torch.bincount(labels[mine]) - torch.bincount(labels) * 2 / 3).abs() < 1).all()


def test_shapes_and_inputs(judge):
    x = torch.zeros(3, 1, 16, 16)
    assert judge.logits(x).shape == (3, 10) and judge.predict(x).dtype == torch.int64
    assert judge.logits(x).dtype == torch.float64
    for bad in (torch.zeros(3, 16, 16), torch.zeros(3, 1, 12, 12), torch.zeros(3, 3, 8, 8)):
        with pytest.raises(ValueError, match="x must have shape"):
            judge.predict(bad)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        judge.predict(torch.zeros(3, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        judge.predict([[0.0]])
    with pytest.raises(ValueError, match="config\\['gamma'\\]"):
        DigitsJudge(
            judge.support, judge.coef, judge.intercept, judge.reduction, config={"gamma": -1}
        )
