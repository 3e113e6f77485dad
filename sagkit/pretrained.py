"""The shipped models: a class-conditional digits UNet and a digits classifier, with their data.

    model = sk.load_pretrained("digits")           # a DigitsModel (a sk.DiffusersModel)
    clf = sk.load_classifier("digits")              # a DigitsClassifier, frozen
    x = sample_digits(model, [3, 7], scale=2.0)     # (2, 1, 16, 16) in about [-1, 1]

Both were trained by ``python -m sagkit.train digits`` on :func:`digits_dataset` ("train"),
scikit-learn's 8×8 digits upsampled to 16×16. The UNet is conditioned through a continuous
embedding vector (``class_embed_type="identity"``), so gradients with respect to the
conditioning exist; a learned table holds one vector per digit plus a null class for
unconditional sampling and classifier-free guidance.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch
from torch import nn

from .classifier import DigitsClassifier
from .models import ClassifierFreeGuidance, DiffusersModel
from .schedules import time_grid
from .solvers import solve

__all__ = [
    "DATA_DIR",
    "DigitsModel",
    "digits_dataset",
    "load_pretrained",
    "load_classifier",
    "sample_digits",
    "frechet_distance",
    "evaluate_samples",
    "evaluate_digits",
]

# The weights are package data of sagkit.digits (weights/<folder>/), so a wheel carries them.
DATA_DIR = Path(str(files("sagkit.digits") / "weights"))
EMBEDDINGS_NAME = "class_embeddings.safetensors"
HELDOUT = 360  # held-out images (20 %), stratified by digit


def digits_dataset(split: str = "train", size: int = 16, dtype=torch.float32):
    """scikit-learn's digits as images in [-1, 1], with a fixed stratified split.

    Args:
        split: "train" (1437 images), "test" (the 360 held out) or "all" (1797).
        size: side length; 8 is native, larger sizes are bilinear upsamplings.
    Returns:
        ``(images, labels)``: (N, 1, size, size) in ``dtype`` and (N,) int64 digits.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float64)[:, None] / 8.0 - 1.0
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    if size != 8:
        images = nn.functional.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False
        )
    if split != "all":
        train, test = train_test_split(
            range(len(labels)), test_size=HELDOUT, random_state=0, stratify=data.target
        )
        idx = torch.as_tensor(sorted(train if split == "train" else test))
        images, labels = images[idx], labels[idx]
    return images.to(dtype), labels


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class DigitsModel(DiffusersModel):
    """A class-conditional ``UNet2DModel`` with a table of conditioning embeddings.

    Args:
        unet: a ``UNet2DModel`` with ``class_embed_type="identity"``.
        scheduler: the diffusers scheduler it was trained with.
        embeddings: (classes + 1, E) conditioning vectors; the last row is the null class.
            E is the UNet's time-embedding width.
    The network parameters and the table are frozen (requires_grad False); differentiate
    with respect to ``cond`` (a tensor from :meth:`cond_for`, made to require grad) or call
    ``requires_grad_()``.
    """

    def __init__(self, unet: nn.Module, scheduler, embeddings: torch.Tensor):
        super().__init__(unet, scheduler)
        self.scheduler = scheduler
        self.register_buffer("embeddings", torch.as_tensor(embeddings).detach().clone())
        self.classes = self.embeddings.shape[0] - 1

    def cond_for(self, labels) -> torch.Tensor:
        """The conditioning vectors (B, E) for integer labels (B,) in 0..classes (classes = null)."""
        labels = torch.atleast_1d(torch.as_tensor(labels, device=self.embeddings.device))
        if labels.is_floating_point() or labels.ndim != 1:
            raise ValueError(
                f"labels must be a 1-D integer tensor, got {labels.dtype}, {tuple(labels.shape)}"
            )
        if labels.numel() and not bool(((labels >= 0) & (labels <= self.classes)).all()):
            raise ValueError(f"labels must lie in 0..{self.classes}, got {labels.tolist()}")
        return self.embeddings[labels]

    @property
    def null_cond(self) -> torch.Tensor:
        """The null-class (unconditional) vector, (1, E)."""
        return self.embeddings[self.classes :]

    def save_pretrained(self, path) -> None:
        """Write the UNet (``save_pretrained``), the scheduler config and the table to ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        self.unet.save_pretrained(path)
        self.scheduler.save_pretrained(path)
        save_file({"embeddings": self.embeddings.detach().float().cpu()}, path / EMBEDDINGS_NAME)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=torch.float32) -> DigitsModel:
        """Load what :meth:`save_pretrained` wrote, with diffusers' ``from_pretrained``, offline."""
        from diffusers import DDPMScheduler, UNet2DModel
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / EMBEDDINGS_NAME).is_file():
            raise FileNotFoundError(f"no saved digits model in {path}")
        unet = UNet2DModel.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(path, local_files_only=True)
        model = cls(unet, scheduler, load_file(path / EMBEDDINGS_NAME)["embeddings"])
        return model.to(device=_device(device), dtype=dtype).eval().requires_grad_(False)


_MODELS = {"digits": (DigitsModel, "digits-unet")}
_CLASSIFIERS = {"digits": (DigitsClassifier, "digits-classifier")}


def _load(registry: dict, kind: str, name: str, device, dtype, path):
    try:
        cls, folder = registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(registry)}") from None
    return cls.from_pretrained(DATA_DIR / folder if path is None else path, _device(device), dtype)


def load_pretrained(name: str, device=None, dtype=torch.float32, path=None) -> DigitsModel:
    """A shipped diffusion model (``"digits"``), in eval mode with frozen parameters.

    Args:
        name: the model's name.
        device: where to put it; ``None`` means CUDA when available, else CPU.
        dtype: float32 or float64.
        path: load from this directory instead of the shipped weights (``DATA_DIR``).
    """
    return _load(_MODELS, "pretrained model", name, device, dtype, path)


def load_classifier(name: str, device=None, dtype=torch.float32, path=None) -> DigitsClassifier:
    """A shipped classifier (``"digits"``), in eval mode with frozen parameters.

    Arguments as for :func:`load_pretrained`.
    """
    return _load(_CLASSIFIERS, "classifier", name, device, dtype, path)


@torch.no_grad()
def sample_digits(
    model: DigitsModel, labels, scale: float = 1.0, steps: int = 50, generator=None
) -> torch.Tensor:
    """Class-conditional samples with classifier-free guidance and DDIM.

    Args:
        model: a :class:`DigitsModel`.
        labels: (B,) digits (``model.classes`` samples unconditionally).
        scale: the guidance scale w (1: the conditional model).
        steps: DDIM steps from t = 1 to the schedule's ``t_min``.
        generator: a CPU ``torch.Generator`` for the initial noise.
    Returns:
        (B, 1, S, S) samples in the model's dtype and device.
    """
    cond = model.cond_for(labels)
    size = model.unet.config.sample_size
    x = torch.randn((cond.shape[0], 1, size, size), generator=generator, dtype=torch.float64)
    guided = ClassifierFreeGuidance(model, model.null_cond, scale)
    ts = time_grid(model.schedule, 1.0, model.schedule.t_min, steps)
    return solve(guided, x.to(cond), ts, "ddim", cond=cond)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½) of two feature sets (N, D), (M, D)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = (torch.atleast_2d(torch.cov(f.T)) for f in (a, b))
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@torch.no_grad()
def evaluate_samples(
    classifier: DigitsClassifier,
    samples: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor,
    batch_size: int = 512,
) -> dict[str, float]:
    """How well images match their labels and a reference set, in the classifier's eyes.

    Args:
        classifier: a :class:`DigitsClassifier`.
        samples: (N, 1, S, S) images (samples or data), clamped to [-1, 1] here.
        labels: (N,) the digits they should show.
        reference: (M, 1, S, S) images to compare with (held-out data).
    Returns:
        ``{"accuracy": ..., "fd": ...}``: the classifier's accuracy on ``samples`` and the
        Fréchet distance between ``samples`` and ``reference`` in its feature space.
    """
    p = next(classifier.parameters())

    def run(x):
        chunks = [x[i : i + batch_size].to(p).clamp(-1, 1) for i in range(0, len(x), batch_size)]
        feats = [classifier.features(c) for c in chunks]
        return torch.cat(feats), torch.cat([classifier.out(f) for f in feats])

    feats, logits = run(samples)
    accuracy = (logits.argmax(-1).cpu() == torch.as_tensor(labels).cpu()).double().mean()
    return {"accuracy": float(accuracy), "fd": frechet_distance(feats, run(reference)[0])}


def evaluate_digits(
    model: DigitsModel,
    classifier: DigitsClassifier,
    scales=(1.0, 2.0),
    per_class: int = 100,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 500,
) -> dict:
    """Evaluate the digits models against the held-out data.

    Returns a dict with ``"heldout"`` (the classifier on the test split, ``"fd"`` against the
    same number of training images: the data-vs-data floor) and, for each guidance scale w,
    ``"w=<w>"``: the classifier's accuracy on ``per_class`` samples of each digit and their
    Fréchet distance to the test split (see :func:`evaluate_samples`).
    """
    test_x, test_y = digits_dataset("test")
    train_x, train_y = digits_dataset("train")
    n = per_class * model.classes
    floor = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:n]
    heldout = evaluate_samples(classifier, test_x, test_y, test_x)
    heldout["fd"] = evaluate_samples(classifier, train_x[floor], train_y[floor], test_x)["fd"]
    results = {"heldout": heldout}
    labels = torch.arange(model.classes).repeat_interleave(per_class)
    for w in scales:
        generator = torch.Generator().manual_seed(seed)
        samples = torch.cat(
            [
                sample_digits(model, labels[i : i + batch_size], w, steps, generator).cpu()
                for i in range(0, n, batch_size)
            ]
        )
        results[f"w={w:g}"] = evaluate_samples(classifier, samples, labels, test_x)
    return results
