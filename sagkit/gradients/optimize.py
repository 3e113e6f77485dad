"""Optimising the initial noise and the conditioning of a sampler against a loss; morphing.

    result = sk.optimize_latent(model, loss_fn, x_T, cond=z, ts=ts, method="adjointdeis-2",
                                optimize=("x", "cond"), steps=20, lr=0.05)

Every gradient of :data:`sagkit.METHODS` can drive it ("adjointdeis-1/2", "symplectic",
"checkpoint", "backprop", "adjoint"). Morphing follows AdjointDEIS's face-morphing experiment
(Blasingame & Liu 2024, "AdjointDEIS: Efficient Gradients for Diffusion Models"): two
images a, b are encoded (DDIM inversion), the morph starts from the slerp of their noises and
the lerp of their conditionings, and both are optimised so that the sample x sits between a and
b in a feature space e (there a face-recognition network; here the digits classifier's
penultimate features):

    L(x) = d(e(x), e(a)) + d(e(x), e(b)) + |d(e(x), e(a)) − d(e(x), e(b))|,   d = 1 − cos.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.checks import check_count
from ..core.inversion import invert
from ..core.schedules import time_grid
from ..core.solvers import solve
from ..gradients.api import evaluate_loss, loss_grad

__all__ = [
    "OptimizeResult",
    "optimize_latent",
    "slerp",
    "cosine_distance",
    "identity_loss",
    "morph",
    "evaluate_morphs",
]


@dataclass
class OptimizeResult:
    """What :func:`optimize_latent` returns.

    x: (B, ...) the optimised initial state. cond: the optimised conditioning (or the one
    given). sample: Φ(x, cond), the final sample. losses: the loss before each update and,
    last, after the final one (``steps + 1`` floats).
    """

    x: torch.Tensor
    cond: torch.Tensor | None
    sample: torch.Tensor
    losses: list[float] = field(default_factory=list)


def _default_grid(model, ts):
    return time_grid(model.schedule, 1.0, model.schedule.t_min, 20) if ts is None else ts


def _check_optimize(optimize, cond, *, steps) -> tuple[str, ...]:
    """The names of the optimised inputs, ``optimize`` as a tuple; refuses other names, repeats,
    "cond" without a ``cond`` tensor and a number of ``steps`` that is not an integer >= 0."""
    names = (optimize,) if isinstance(optimize, str) else tuple(optimize)
    if not names or any(n not in ("x", "cond") for n in names) or len(set(names)) != len(names):
        raise ValueError(f"optimize must be ('x',), ('cond',) or ('x', 'cond'), got {optimize!r}")
    if "cond" in names and cond is None:
        raise ValueError("optimize='cond' needs a cond tensor")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return names


def optimize_latent(
    model,
    loss_fn,
    x_T: torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    steps: int = 20,
    lr: float = 0.05,
    method: str = "adjointdeis-2",
    ts=None,
    optimize=("x",),
    solver: str = "ddim",
    progress: bool = True,
    callback=None,
) -> OptimizeResult:
    """Minimise L(Φ(x_T, cond)) over x_T and/or cond with Adam, gradients from ``method``.

    Args:
        model: a model of the protocol.
        loss_fn: maps the sample (B, ...) to a scalar or (B,) values (summed).
        x_T: (B, ...) the initial state at ``ts[0]``.
        cond: conditioning; optimised when "cond" is in ``optimize``.
        steps: Adam updates.
        lr: Adam's learning rate.
        method: a name in :data:`sagkit.METHODS`.
        ts: the sampling grid; 20 DDIM steps uniform in t from 1 to ``schedule.t_min`` when
            omitted.
        optimize: ("x",), ("cond",) or ("x", "cond").
        solver: the sampler, as in :func:`sagkit.loss_grad`.
        progress: a tqdm bar showing the loss.
        callback: called as ``callback(i, loss, x, cond)`` after every update.
    Returns:
        An :class:`OptimizeResult`.
    """
    names = _check_optimize(optimize, cond, steps=steps)
    ts = _default_grid(model, ts)
    x = x_T.detach().clone()
    z = None if cond is None else cond.detach().clone()
    leaves = {"x": x, "cond": z}
    opt = torch.optim.Adam([leaves[n] for n in names], lr=lr)
    losses = []
    bar = tqdm(range(steps), desc=f"optimize ({method})", disable=not progress, leave=False)
    for i in bar:
        loss, grads = loss_grad(
            model, loss_fn, x, ts, method=method, solver=solver, cond=z, wrt=names
        )
        for n, g in zip(names, grads, strict=True):
            leaves[n].grad = g.to(leaves[n])
        opt.step()
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
        if callback is not None:
            callback(i, losses[-1], x, z)
    with torch.no_grad():
        sample = solve(model, x, ts, solver=solver, cond=z)
        losses.append(float(evaluate_loss(loss_fn, sample)))
    return OptimizeResult(x=x, cond=z, sample=sample, losses=losses)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float = 0.5) -> torch.Tensor:
    """Spherical interpolation per sample: sin((1−w)θ)/sin θ · a + sin(wθ)/sin θ · b, θ the angle
    between a and b (flattened). (B, ...) → (B, ...)."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (F.normalize(fa, dim=1) * F.normalize(fb, dim=1)).sum(1).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)[:, None]
    sin = torch.sin(theta)
    safe = sin.abs() > 1e-6
    ca = torch.where(safe, torch.sin((1 - w) * theta) / sin.where(safe, 1.0), 1 - w)
    cb = torch.where(safe, torch.sin(w * theta) / sin.where(safe, 1.0), w)
    return (ca * fa + cb * fb).reshape(a.shape)


def cosine_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """1 − cos(u, v) per row: (B, F), (B, F) → (B,)."""
    return 1 - F.cosine_similarity(u, v, dim=1)


def identity_loss(classifier, a: torch.Tensor, b: torch.Tensor):
    """L(x) = d_a + d_b + |d_a − d_b|, d_a = 1 − cos(e(x), e(a)), e = ``classifier.features``.

    a, b: (B, C, H, W) the two images of each pair. Returns a callable x (B, C, H, W) → (B,).
    """
    with torch.no_grad():
        fa, fb = classifier.features(a), classifier.features(b)

    def loss(x: torch.Tensor) -> torch.Tensor:
        fx = classifier.features(x)
        da, db = cosine_distance(fx, fa.to(fx)), cosine_distance(fx, fb.to(fx))
        return da + db + (da - db).abs()

    return loss


@torch.no_grad()
def _distances(classifier, x, a, b):
    fx, fa, fb = classifier.features(x), classifier.features(a), classifier.features(b)
    return cosine_distance(fx, fa), cosine_distance(fx, fb), cosine_distance(fa, fb)


def morph(
    model,
    classifier,
    a: torch.Tensor,
    b: torch.Tensor,
    cond_a: torch.Tensor,
    cond_b: torch.Tensor,
    *,
    ts=None,
    steps: int = 20,
    lr: float = 0.05,
    method: str = "adjointdeis-2",
    inversion_iters: int = 2,
    progress: bool = True,
) -> dict:
    """Morph image pairs (a_i, b_i) by optimising the noise and conditioning of the sampler.

    a, b are encoded by DDIM inversion (with ``inversion_iters`` fixed-point iterations) under
    their own conditionings; the morph starts from x_T = slerp(x_a, x_b), z = (z_a + z_b)/2,
    and :func:`optimize_latent` minimises :func:`identity_loss` over both.

    Args:
        a, b: (B, C, H, W) images in [-1, 1].
        cond_a, cond_b: (B, E) their conditionings (e.g. ``model.cond_for(labels)``).
        ts: the sampling grid (as for :func:`optimize_latent`).
    Returns:
        A dict: ``before`` and ``after`` (B, C, H, W) morphs; ``x_T``, ``cond`` the optimised
        inputs; ``losses`` the optimisation history (batch sums); ``loss_before``,
        ``loss_after`` (B,); ``success_before``, ``success_after`` (B,) bools: the morph is
        closer to both a and b than they are to each other, d(m, a) < d(a, b) > d(m, b).
    """
    ts = _default_grid(model, ts)
    x_a = invert(model, a, ts, cond=cond_a, fixed_point_iters=inversion_iters)
    x_b = invert(model, b, ts, cond=cond_b, fixed_point_iters=inversion_iters)
    x_T, z = slerp(x_a, x_b), 0.5 * (cond_a + cond_b)
    loss_fn = identity_loss(classifier, a, b)
    with torch.no_grad():
        before = solve(model, x_T, ts, solver="ddim", cond=z)
    result = optimize_latent(
        model,
        loss_fn,
        x_T,
        cond=z,
        steps=steps,
        lr=lr,
        method=method,
        ts=ts,
        optimize=("x", "cond"),
        progress=progress,
    )
    out = {"before": before, "after": result.sample, "x_T": result.x, "cond": result.cond}
    out["losses"] = result.losses
    for key, img in (("before", before), ("after", result.sample)):
        with torch.no_grad():
            out[f"loss_{key}"] = loss_fn(img)
        d_a, d_b, d_ab = _distances(classifier, img, a, b)
        out[f"success_{key}"] = (d_a < d_ab) & (d_b < d_ab)
    return out


def _check_labels(images: torch.Tensor, labels, *, n_pairs) -> torch.Tensor:
    """``labels`` as a tensor, one per image and of at least two classes; ``n_pairs`` a count."""
    labels = torch.as_tensor(labels)
    check_count(n_pairs, "n_pairs")
    if labels.shape != (len(images),):
        raise ValueError(
            f"labels must have shape ({len(images)},), one per image, got {tuple(labels.shape)}"
        )
    if len(torch.unique(labels)) < 2:
        raise ValueError(
            "labels must hold at least two different classes: evaluate_morphs pairs images of "
            "different labels"
        )
    return labels


def _random_pairs(labels: torch.Tensor, *, n_pairs: int, seed: int) -> torch.Tensor:
    """(n_pairs, 2) indices of images with different labels, drawn uniformly (with a generator
    seeded with ``seed``) until there are ``n_pairs`` of them."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    while len(pairs) < n_pairs:
        i, j = torch.randint(len(labels), (2,), generator=gen).tolist()
        if labels[i] != labels[j]:
            pairs.append((i, j))
    return torch.tensor(pairs)


def _apply_realism(out: dict, realism) -> None:
    """Add ``realistic_before``/``realistic_after`` to the :func:`morph` dict ``out``, and keep
    a success only where the morph passes the ``realism`` check."""
    for key in ("before", "after"):
        real = torch.as_tensor(realism(out[key])).to(out[f"success_{key}"].device)
        out[f"realistic_{key}"] = real
        out[f"success_{key}"] = out[f"success_{key}"] & real


def _summary(out: dict, *, n_pairs: int) -> dict:
    """The summary of :func:`evaluate_morphs` from its dict ``out``: mean losses, the fraction of
    pairs whose loss fell, success rates and, after a realism check, how many it rejected."""
    lb, la = out["loss_before"], out["loss_after"]
    summary = {
        "pairs": n_pairs,
        "loss_before": float(lb.mean()),
        "loss_after": float(la.mean()),
        "loss_fell": float((la < lb).double().mean()),
        "success_before": float(out["success_before"].double().mean()),
        "success_after": float(out["success_after"].double().mean()),
    }
    for key in ("before", "after"):
        if f"realistic_{key}" in out:
            summary[f"rejected_{key}"] = int((~out[f"realistic_{key}"]).sum())
    return summary


def evaluate_morphs(
    model,
    classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_pairs: int = 32,
    seed: int = 0,
    realism=None,
    **morph_kwargs,
) -> dict:
    """Morph ``n_pairs`` random pairs of images with different labels, in one batch.

    Args:
        images: (N, C, H, W) real (held-out) images; labels: (N,) their classes.
        realism: optional images (B, C, H, W) → (B,) bools, True for an image that looks like
            data (e.g. :func:`sagkit.digits.evaluation.realism_check`). The identity loss alone
            can be fooled by an image off the data manifold (noise), so with a check a morph
            succeeds only when it also passes it.
        morph_kwargs: passed to :func:`morph` (ts, steps, lr, method, inversion_iters, progress).
    Returns:
        The :func:`morph` dict plus ``a``, ``b`` (the pairs), ``pairs`` (n_pairs, 2) indices and a
        ``summary``: mean loss before/after, the fraction of pairs whose loss fell, and the
        success rates before/after (closer to both a and b than they are to each other). With
        ``realism``: ``realistic_before``/``realistic_after`` (B,) bools in the dict, the
        summary's ``rejected_before``/``rejected_after`` (how many morphs the check rejects)
        and success rates that count only morphs passing it.
    """
    labels = _check_labels(images, labels, n_pairs=n_pairs)
    pairs = _random_pairs(labels, n_pairs=n_pairs, seed=seed)
    a, b = images[pairs[:, 0]], images[pairs[:, 1]]
    cond_for = model.cond_for
    out = morph(
        model,
        classifier,
        a,
        b,
        cond_for(labels[pairs[:, 0]]),
        cond_for(labels[pairs[:, 1]]),
        **morph_kwargs,
    )
    out.update(a=a, b=b, pairs=pairs)
    if realism is not None:
        _apply_realism(out, realism)
    out["summary"] = _summary(out, n_pairs=n_pairs)
    return out
