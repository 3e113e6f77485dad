"""An independent judge of digit images: an RBF support-vector machine on the 8×8 pixels.

The shipped classifier (:mod:`.classifier`) is what guidance pushes on, so its accuracy on
guided samples says how well it was fooled as much as how good the digits are: guidance can
reach it through adversarial pixels: the loss-only leaderboard's backward guidance (scale 512)
makes 48 class-task samples the classifier calls 6, all of them, which this judge calls 4, all
of them, and which all fail the realism check. The judge is another architecture, trained only
on digits the classifier never saw:

    judge = load_judge()                        # frozen, float64, on the CPU
    judge.predict(samples)                      # (B,) digits of (B, 1, 16, 16) images in [-1, 1]

Model (docs/maths.md §13). Ten binary SVCs, one per digit against the rest (scikit-learn's
``OneVsRestClassifier(SVC(kernel="rbf"))``), on the 64 pixels u ∈ [−1, 1]⁶⁴ of an 8×8 image;
digit k's decision function is

    f_k(u) = Σ_i α_ki exp(−γ ‖u − s_i‖²) + b_k,      the judge's digit: argmax_k f_k(u)

over the union of the ten machines' support vectors s_i (α_ki = 0 where s_i is not one of
machine k's). A 16×16 image x (the digits upsampled bilinearly, :func:`.data.digit_images`) is
reduced to u = R x Rᵀ, R = U⁺ (8, 16) the pseudo-inverse of the 1-D bilinear upsampling U
(16, 8): it inverts the upsampling exactly (R U = I), so an upsampled digit is judged as its
8×8 original; 2×2 average pooling blurs it instead (0.75 uᵢ + 0.125 (uᵢ₋₁ + uᵢ₊₁) per axis).

Training (:func:`train_judge`, deterministic): 240 of the 360 held-out digits
(``digits_dataset("test")``: the classifier was trained on ``digits_dataset("train")``, the
other 1437), a split stratified by digit (seed 0); C = 10 and γ = 1/(64 · var(pixels)) =
0.0276 (scikit-learn's ``gamma="scale"``), the best of C ∈ {1, 3, 10, 100} × γ ∈ {"scale",
0.01, 0.02, 0.05} by 5-fold cross-validation on the 240 (0.929; C = 100 ties, the smaller C
kept). 465 support vectors in the ten machines, 190 distinct. Measured accuracy:

- 0.983 (118/120) on the other 120 held-out digits, which it never saw;
- 0.978 (1406/1437) on the 1437 training digits of the classifier, which it never saw;
- on those 1437 at 16×16: reduced by R exactly its 8×8 accuracy, 0.978; reduced by 2×2
  average pooling (the same as bilinear downsampling by 2) 0.965 (1387/1437);
- 0.994 (358/360) on the 360 held-out digits at 16×16 reduced by R, its own 240 among them.

The stored config (``weights/digits-judge/config.json``) holds these numbers; the tests
measure them again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..core.checks import check_count, check_scale, check_tensor
from .data import digits_dataset
from .models import DATA_DIR

__all__ = [
    "JUDGE_DIR",
    "DigitsJudge",
    "load_judge",
    "train_judge",
    "judge_accuracies",
    "upsampling_matrix",
]

JUDGE_DIR = DATA_DIR / "digits-judge"
"""The shipped judge's folder: ``config.json`` and ``model.safetensors``."""
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
NATIVE = 8  # the judge's side length: scikit-learn's digits


def upsampling_matrix(size: int = 16) -> torch.Tensor:
    """U (size, 8) float64: the 1-D bilinear interpolation of :func:`.data.digit_images`, so
    that an 8×8 image u becomes U u Uᵀ (align_corners=False, edges clamped)."""
    check_count(size, "size")
    basis = torch.eye(NATIVE, dtype=torch.float64)[:, None, :, None]  # (8, 1, 8, 1)
    columns = nn.functional.interpolate(basis, size=(size, 1), mode="bilinear", align_corners=False)
    return columns[:, 0, :, 0].T.contiguous()


class DigitsJudge(nn.Module):
    """The judge: ten one-vs-rest RBF support-vector machines on 8×8 images (module docstring).

    Args:
        support: (M, 64) the support vectors s_i, pixels in [-1, 1].
        coef: (10, M) the dual coefficients α_ki (y_i times the Lagrange multiplier).
        intercept: (10,) b_k.
        reduction: (8, 16) R, how a 16×16 image becomes 8×8 (u = R x Rᵀ).
        config: ``gamma`` (γ) and the record of the training (stored as ``config.json``).
    The tensors are buffers: ``.to(device)`` moves them; the judge computes in their dtype.
    """

    def __init__(
        self,
        support: torch.Tensor,
        coef: torch.Tensor,
        intercept: torch.Tensor,
        reduction: torch.Tensor,
        *,
        config: dict,
    ):
        super().__init__()
        self.config = dict(config)
        self.gamma = check_scale(self.config["gamma"], "config['gamma']")
        self.register_buffer("support", torch.as_tensor(support))
        self.register_buffer("coef", torch.as_tensor(coef))
        self.register_buffer("intercept", torch.as_tensor(intercept))
        self.register_buffer("reduction", torch.as_tensor(reduction))

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 64): images x (B, 1, H, W), H = W = 8 or 16, clamped to [-1, 1] (as the
        classifier sees them) and, at 16, reduced by u = R x Rᵀ; in the judge's dtype."""
        check_tensor(x, "x")
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3] or x.shape[2] not in (8, 16):
            raise ValueError(
                f"x must have shape (B, 1, 8, 8) or (B, 1, 16, 16), got {tuple(x.shape)}"
            )
        u = x.to(self.support).clamp(-1, 1)
        if u.shape[-1] != NATIVE:
            u = self.reduction @ u @ self.reduction.T
        return u.flatten(1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 10): f_k(u) = Σ_i α_ki exp(−γ ‖u − s_i‖²) + b_k of images x (B, 1, H, W), H = 8
        or 16, in [-1, 1] (:meth:`pixels`). docs/maths.md §13"""
        u = self.pixels(x)
        distances = (u[:, None, :] - self.support[None]).square().sum(-1)  # (B, M)
        return torch.exp(-self.gamma * distances) @ self.coef.T + self.intercept

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) int64: the judge's digit of each image, argmax_k f_k."""
        return self.logits(x).argmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`logits`."""
        return self.logits(x)

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (the buffers, as they are) to ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config, indent=1) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, path / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=torch.float64) -> DigitsJudge:
        """Load a saved judge, frozen (a module without parameters), in ``dtype`` on ``device``."""
        from safetensors.torch import load_file

        path = Path(path)
        state = load_file(path / WEIGHTS_NAME)
        config = json.loads((path / CONFIG_NAME).read_text())
        judge = cls(
            **{k: state[k] for k in ("support", "coef", "intercept", "reduction")}, config=config
        )
        return judge.to(device=device, dtype=dtype).eval()


def load_judge(*, device=None, dtype=torch.float64, path=None) -> DigitsJudge:
    """The shipped judge (``weights/digits-judge``), or the one saved in ``path``."""
    return DigitsJudge.from_pretrained(
        JUDGE_DIR if path is None else path, device=device, dtype=dtype
    )


def train_judge(out, *, train_size: int = 240, C: float = 10.0, seed: int = 0) -> DigitsJudge:
    """Train the judge on ``train_size`` of the 360 held-out digits and save it to
    ``out/digits-judge`` (``train_judge(DATA_DIR)`` writes the shipped files again, the same
    bytes: the split and libsvm's solver are deterministic).

    The split is stratified by digit (scikit-learn's ``train_test_split``, ``seed``); γ =
    1/(64 · var) of the training pixels. The config records the hyperparameters, the indices
    (into ``digits_dataset("test")``) of the training digits, and the accuracies of the module
    docstring. Returns the judge (float64).
    """
    from sklearn.model_selection import train_test_split
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import SVC

    check_count(train_size, "train_size")
    check_scale(C, "C")
    held_out, held_out_labels = digits_dataset("test", size=NATIVE, dtype=torch.float64)
    mine, rest = train_test_split(
        range(len(held_out_labels)),
        train_size=train_size,
        random_state=seed,
        stratify=held_out_labels.numpy(),
    )
    mine, rest = sorted(mine), sorted(rest)
    pixels = held_out.flatten(1)[mine].numpy()
    gamma = float(1 / (pixels.shape[1] * pixels.var()))
    machines = OneVsRestClassifier(SVC(C=C, kernel="rbf", gamma=gamma))
    machines.fit(pixels, held_out_labels[mine].numpy())
    used = sorted({int(i) for m in machines.estimators_ for i in m.support_})
    column = {i: j for j, i in enumerate(used)}
    coef = torch.zeros(len(machines.estimators_), len(used), dtype=torch.float64)
    for k, m in enumerate(machines.estimators_):
        coef[k, [column[int(i)] for i in m.support_]] = torch.from_numpy(m.dual_coef_[0])
    intercept = torch.tensor(
        [float(m.intercept_[0]) for m in machines.estimators_], dtype=torch.float64
    )
    config = {
        "model": "ten one-vs-rest RBF SVCs on 8x8 pixels in [-1, 1] (scikit-learn SVC)",
        "decision": "f_k(u) = sum_i coef[k, i] exp(-gamma |u - support[i]|^2) + intercept[k]",
        "gamma": gamma,
        "C": C,
        "size": NATIVE,
        "reduction": "a 16x16 image x becomes u = R x R^T, R = pinv(U) (8, 16), U the 1-D "
        "bilinear upsampling of digit_images (align_corners=False): R U = I",
        "training": {
            "images": 'digits_dataset("test"): the 360 digits the classifier never saw',
            "split": f"stratified train_test_split, train_size={train_size}, random_state={seed}",
            "indices": mine,
            "support_vectors": {
                "in the ten machines": int((coef != 0).sum()),
                "distinct": len(used),
            },
        },
    }
    reduction = torch.linalg.pinv(upsampling_matrix(16))
    judge = DigitsJudge(torch.from_numpy(pixels[used]), coef, intercept, reduction, config=config)
    judge.config["accuracy"] = judge_accuracies(judge, rest)
    judge.save_pretrained(Path(out) / "digits-judge")
    return judge


@torch.no_grad()
def judge_accuracies(judge: DigitsJudge, rest) -> dict[str, float]:
    """The judge's accuracy, keyed by what it is measured on:

    - ``held_out_rest``: the held-out digits ``rest`` (indices into ``digits_dataset("test")``)
      it was not trained on, 8×8;
    - ``classifier_train``: the 1437 digits the classifier was trained on, 8×8;
    - ``classifier_train_16_reduced``, ``_16_avg_pool``, ``_16_bilinear``: the same at 16×16,
      reduced by R, by 2×2 average pooling and by bilinear downsampling;
    - ``held_out_16_reduced``: the 360 held-out digits at 16×16 reduced by R (its own
      training digits among them).
    """
    held_out, held_out_labels = digits_dataset("test", size=NATIVE, dtype=torch.float64)
    held_out16, _ = digits_dataset("test", size=16, dtype=torch.float64)
    train, train_labels = digits_dataset("train", size=NATIVE, dtype=torch.float64)
    train16, _ = digits_dataset("train", size=16, dtype=torch.float64)
    rest = list(rest)

    def accuracy(x, labels):
        return float((judge.predict(x) == labels).double().mean())

    bilinear = nn.functional.interpolate(train16, size=(NATIVE, NATIVE), mode="bilinear")
    return {
        "held_out_rest": accuracy(held_out[rest], held_out_labels[rest]),
        "classifier_train": accuracy(train, train_labels),
        "classifier_train_16_reduced": accuracy(train16, train_labels),
        "classifier_train_16_avg_pool": accuracy(
            nn.functional.avg_pool2d(train16, 2), train_labels
        ),
        "classifier_train_16_bilinear": accuracy(bilinear, train_labels),
        "held_out_16_reduced": accuracy(held_out16, held_out_labels),
    }
