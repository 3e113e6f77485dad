"""The direction study: how well each guidance method points along the exact guidance score.

On a :class:`~sagkit.GaussianMixture` with a closed-form loss (:mod:`sagkit.core.tilted`) the
exact guidance score h_t(x) = ∇_x log E[e^{−L(x_0)} | x_t = x] is known at every x and t. A
gradient-guidance method moves x_t along −d for its direction d (B, ...); we report, per sample,

    cos(−d, h_t) = −⟨d, h_t⟩/(‖d‖ ‖h_t‖)        and        ‖d‖/‖h_t‖,

and summarise each by its median and quartiles over the samples at each t (docs/maths.md §14.6).
The network is the mixture itself (its ε, x̂0 and velocity are exact), so every difference is
the estimate's, not a network's error. The directions d, each at (x_t, t):

    name            method                                  d
    "n=1"           FreeDoM, DPS, UGD's forward term,       ∇_{x_t} L(x̂0(x_t)), x̂0 = Tweedie's
                    TFG's ρ-term with γ = 0                 (one-step) estimate through the model
    "n=k"           SAG, "to-zero" grid                     ∇_{x_t} L(Φ_k(x_t)), k DDIM steps t → 0
    "n=k sampler"   SAG, "sampler" grid                     the same on the grid of
                                                            :func:`~sagkit.guidance.estimate_times`
                                                            for a base DDIM of ``sampler_steps``
    "lgd"           LGD (γ = 1, m = 4)                      ∇_{x_t} L̃(x̂0(x_t)), L̃ smoothed, r = σ_t
    "tfg rho"       TFG's ρ-term (γ = 0.1, m = 4)           the same with r = 0.1 σ_t
    "mpgd"          MPGD                                    ∇_{x_t} L(x0(x_t, F̄)), F̄ = F(x_t)
                                                            held fixed: ∇L(x̂0)/α_t for ε

and the μ-terms, which move the estimate x̂0 by Δ0 instead of x_t: Δ0 is compared with the exact
move of the posterior mean x0_shift = Ẽ[x_0 | x_t] − E[x_0 | x_t] = (σ_t²/α_t) h_t (the same
direction as h_t), by cos(Δ0, x0_shift) and the *move ratio* ‖Δ0‖/‖x0_shift‖ at the method's
default scale:

    "ugd mu"        UGD's backward guidance                 Δ0 of 5 normalised steps of size 1
    "tfg mu"        TFG's μ-term                            Δ0 of N_iter = 2 steps of size μ = 1
                                                            on L̃ (γ = 0.1, m = 4); weight s_t = 1

The grid "sampler" at time t: the base DDIM's times are [t, then the ``sampler_steps``-step
grid's times below t] (a DDIM whose current step is at t), handed to ``estimate_times`` at
k = 0: so its estimate ends at the sampler's last time before 0 (SAG's code), and at t below
the grid's first positive time it is the one-step estimate.

The states x_t: draws of the exact *guided* marginal p̃_t, x_0 ~ p̃_0 =
``exact.target.sample``, x_t = α_t x_0 + σ_t ξ: where a correct guided sampler goes
(:func:`guided_states`). Everything is float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..core.checks import check_count, check_time
from ..core.frames import ode_frame
from ..core.schedules import time_grid
from ..core.tilted import ClassLoss, ExactGuidance, LinearLoss, QuadraticLoss
from ..digits.data import digit_images
from ..guidance.family import smoothed_loss, smoothing_noise
from ..guidance.methods import backward_shift, estimate_times, guidance_gradient

__all__ = [
    "GRADIENT_METHODS",
    "MOVE_METHODS",
    "held_out_digit",
    "inpainting_loss",
    "study_losses",
    "effective_components",
    "guided_states",
    "sampler_times",
    "gradient_directions",
    "x0_moves",
    "alignment",
    "summarise",
    "direction_study",
    "estimate_jacobian",
    "plot_directions",
]

GRADIENT_METHODS = ("n=1", "n=2", "n=4", "n=8", "n=2 sampler", "n=4 sampler", "n=8 sampler")
"""The one-step and SAG directions of the study (the ``ns`` of :func:`direction_study`)."""
MOVE_METHODS = ("ugd mu", "tfg mu")
"""The μ-terms: moves of x̂0 compared with the exact move of the posterior mean."""
SMOOTHED = {"lgd": 1.0, "tfg rho": 0.1}
"""The smoothed ρ-terms and their γ (r_t = γ σ_t); m = 4 samples each."""


def held_out_digit(*, n_components: int, seed: int = 0, size: int = 8):
    """The first digit image that :func:`sagkit.digits_mixture` with ``n_components`` and
    ``seed`` leaves out of its means: ``(image (1, size, size) float64, label)``."""
    images, labels = digit_images(size)
    if not 1 <= n_components < len(images):
        raise ValueError(f"n_components must be in [1, {len(images) - 1}], got {n_components}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    index = int(order[n_components])
    return images[index], int(labels[index])


def inpainting_loss(reference: torch.Tensor, *, tau: float) -> QuadraticLoss:
    """Inpainting the top half of ``reference`` (C, H, W): ‖m ⊙ (x − ref)‖²/(2τ²), m = 1 on
    the top ⌊H/2⌋ rows (``QuadraticLoss.masked``)."""
    top = torch.zeros_like(reference)
    top[..., : reference.shape[-2] // 2, :] = 1.0
    return QuadraticLoss.masked(reference, top, tau=tau)


def study_losses(
    mixture,
    reference: torch.Tensor,
    *,
    label: int,
    taus=(0.05, 1.0),
    weights=(5.0, 0.5),
    strengths=(10.0, 1.0),
) -> dict[str, object]:
    """The study's losses on ``mixture``, sharp then broad in each family, by name:

    - "quadratic τ=…": inpainting the top half of ``reference`` (1, H, W),
      :func:`inpainting_loss`;
    - "linear |w|=…": L = ⟨w, x⟩ with w = |w| u, u the unit vector from the mean image of the
      mixture's other digits to the mean of ``label``'s (L falls towards ``label``);
    - "class β=…": ``ClassLoss.for_label(mixture, label, strength=β)``.
    """
    losses: dict[str, object] = {}
    for tau in taus:
        losses[f"quadratic τ={tau:g}"] = inpainting_loss(reference, tau=tau)
    means = mixture.means.detach().reshape(mixture.means.shape[0], -1).to(torch.float64)
    chosen = mixture.labels == label
    u = means[~chosen].mean(0) - means[chosen].mean(0)  # L = ⟨w, x⟩ decreases towards label
    u = (u / u.norm()).reshape(mixture.event_shape)
    for size in weights:
        losses[f"linear |w|={size:g}"] = LinearLoss(size * u)
    for strength in strengths:
        losses[f"class β={strength:g}"] = ClassLoss.for_label(mixture, label, strength=strength)
    return losses


def effective_components(exact: ExactGuidance) -> float:
    """1/Σ_k π̃_k² of the tilted mixture's weights π̃: how many components the guided target
    spreads over (the posterior's sharpness; the untilted digits mixture has K)."""
    weights = exact.target.log_weights.exp()
    return float(1.0 / (weights**2).sum())


def guided_states(
    exact: ExactGuidance, t: float, samples: int, *, generator: torch.Generator
) -> torch.Tensor:
    """x_t = α_t x_0 + σ_t ξ, x_0 ~ p̃_0 (``exact.target.sample``), ξ ~ N(0, I): (samples, ...)
    float64 draws of the exact guided marginal p̃_t. (docs/maths.md §14.6)"""
    x0 = exact.target.sample(samples, generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    schedule = exact.schedule
    return schedule.alpha(float(t)) * x0 + schedule.sigma(float(t)) * noise


def sampler_times(schedule, t: float, *, steps: int) -> list[float]:
    """A base DDIM's times seen from its step at t: [t, then the ``steps``-step grid's times
    below t, down to 0], for ``estimate_times(..., k=0, grid="sampler")``."""
    grid = time_grid(schedule, 1.0, 0.0, steps)
    return [float(t), *(float(s) for s in grid if s < float(t) - 1e-12)]


def _loss_gradient(model, loss_fn, x_t, t, ts) -> torch.Tensor:
    return guidance_gradient(model, loss_fn, x_t, t, ts=ts, gradient="backprop")[1]


def gradient_directions(
    model,
    loss_fn: Callable,
    x_t: torch.Tensor,
    t: float,
    *,
    ns: Sequence[int] = (1, 2, 4, 8),
    sampler_steps: int = 25,
    samples: int = 4,
    seed: int = 0,
    step: int = 0,
) -> dict[str, torch.Tensor]:
    """The directions d (B, ...) of the gradient methods at (x_t, t), by name (module table):
    "n=k" for k in ``ns`` (to-zero), "n=k sampler" for k > 1, "lgd", "tfg rho", "mpgd".

    The smoothed ρ-terms draw ξ (``samples``, B, ...) by ``smoothing_noise(seed, step, ...)``.
    (docs/maths.md §14.6)
    """
    schedule = model.schedule
    out: dict[str, torch.Tensor] = {}
    for n in ns:
        out[f"n={n}"] = _loss_gradient(model, loss_fn, x_t, t, time_grid(schedule, t, 0.0, n))
    base = sampler_times(schedule, t, steps=sampler_steps)
    for n in ns:
        if n > 1:
            ts = estimate_times(base, 0, n, grid="sampler", schedule=schedule)
            out[f"n={n} sampler"] = _loss_gradient(model, loss_fn, x_t, t, ts)
    one_step = time_grid(schedule, t, 0.0, 1)
    for name, gamma in SMOOTHED.items():
        noise = smoothing_noise(seed, step, samples, x_t)
        smoothed = smoothed_loss(loss_fn, noise, gamma * schedule.sigma(float(t)))
        out[name] = _loss_gradient(model, smoothed, x_t, t, one_step)
    frame = ode_frame(schedule)
    with torch.no_grad():
        pred = frame.predict(model, x_t, t)
    with torch.enable_grad():
        leaf = x_t.detach().requires_grad_()
        value = loss_fn(frame.x0(schedule, leaf, t, pred)).sum()
        (out["mpgd"],) = torch.autograd.grad(value, leaf)
    return out


def x0_moves(
    model,
    loss_fn: Callable,
    x_t: torch.Tensor,
    t: float,
    *,
    ugd_steps: int = 5,
    ugd_scale: float = 1.0,
    tfg_steps: int = 2,
    tfg_scale: float = 1.0,
    tfg_gamma: float = 0.1,
    samples: int = 4,
    seed: int = 0,
    step: int = 0,
) -> dict[str, torch.Tensor]:
    """The μ-terms' moves Δ0 (B, ...) of the one-step estimate x̂0(x_t), by name: "ugd mu"
    (backward guidance, :func:`~sagkit.guidance.methods.backward_shift` on L) and "tfg mu"
    (the same on L̃ with r_t = γ σ_t). (docs/maths.md §14.6)"""
    schedule = model.schedule
    frame = ode_frame(schedule)
    with torch.no_grad():
        x0 = frame.x0(schedule, x_t, t, frame.predict(model, x_t, t))
    noise = smoothing_noise(seed, step, samples, x0)
    smoothed = smoothed_loss(loss_fn, noise, tfg_gamma * schedule.sigma(float(t)))
    return {
        "ugd mu": backward_shift(loss_fn, x0, steps=ugd_steps, scale=ugd_scale),
        "tfg mu": backward_shift(smoothed, x0, steps=tfg_steps, scale=tfg_scale),
    }


def alignment(
    direction: torch.Tensor, reference: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos(direction, reference), ‖direction‖/‖reference‖), each (B,), per sample, float64.

    A direction that vanishes (‖d‖ = 0: the loss's gradient underflowed, so the method does
    not move) has cosine 0; where the reference vanishes (h_t = 0 to float64: the exact
    guidance does not move either) both are NaN, and :func:`summarise` leaves that sample out.
    (docs/maths.md §14.6)
    """
    a = direction.reshape(direction.shape[0], -1).to(torch.float64)
    b = reference.reshape(reference.shape[0], -1).to(torch.float64)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cosine = torch.where(na > 0, (a * b).sum(1) / (na * nb).clamp(min=1e-300), 0.0)
    undefined = nb == 0
    return cosine.masked_fill(undefined, math.nan), (na / nb).masked_fill(undefined, math.nan)


def summarise(values: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """{"median", "q1", "q3", "count"}: per row (a time) of per-sample ``values``, the median
    and the quartiles (linear interpolation between order statistics) of its non-NaN values,
    and how many there were (NaN statistics where none)."""
    out: dict[str, list] = {"median": [], "q1": [], "q3": [], "count": []}
    levels = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    for row in values:
        r = torch.as_tensor(row, dtype=torch.float64)
        r = r[~torch.isnan(r)]
        q = torch.quantile(r, levels).tolist() if r.numel() else [math.nan] * 3
        out["q1"].append(q[0])
        out["median"].append(q[1])
        out["q3"].append(q[2])
        out["count"].append(int(r.numel()))
    return out


def direction_study(
    mixture,
    loss,
    *,
    times: Sequence[float] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1),
    samples: int = 64,
    ns: Sequence[int] = (1, 2, 4, 8),
    sampler_steps: int = 25,
    seed: int = 0,
    states: str = "guided",
    progress: bool = False,
) -> dict:
    """Each method's alignment with the exact guidance at ``samples`` states per t in ``times``.

    Args:
        mixture: a :class:`~sagkit.GaussianMixture` (float64), also the network.
        loss: a closed-form loss of :mod:`sagkit.core.tilted`.
        states: "guided" (x_t ~ p̃_t, :func:`guided_states`) or "prior" (x_t ~ p_t).
    Returns:
        a plain dict (JSON-ready): ``times``, ``samples``, ``methods`` (names, gradient methods
        then μ-terms), ``kinds`` {name: "gradient" or "move"}, ``cosine`` and ``ratio``
        {name: per t a list of per-sample values}, ``summary`` {name: {"cosine": summarise(...),
        "ratio": summarise(...)}}, ``vanished`` {name: per t the fraction of samples whose
        direction is 0}, ``h_norm`` (the median ‖h_t‖ per t) and ``effective_components``.
    The cosine of a gradient method is cos(−d, h_t) and its ratio ‖d‖/‖h_t‖; a μ-term's
    cos(Δ0, x0_shift) and ‖Δ0‖/‖x0_shift‖ (module docstring; docs/maths.md §14.6).
    """
    times = _checked_study_options(times, samples, ns, states)
    exact = ExactGuidance(mixture, loss)
    generator = torch.Generator().manual_seed(seed)
    cosine: dict[str, list] = {}
    ratio: dict[str, list] = {}
    kinds: dict[str, str] = {}
    h_norm = []
    for k, t in enumerate(tqdm(times, desc="direction study", disable=not progress)):
        x_t = _study_states(exact, mixture, t, samples, states=states, generator=generator)
        h = exact.score(x_t, t)
        h_norm.append(float(h.reshape(samples, -1).norm(dim=1).median()))
        found = _step_alignments(
            exact, mixture, loss, x_t, t, h, ns=ns, sampler_steps=sampler_steps, seed=seed, step=k
        )
        for name, kind, (c, r) in found:
            cosine.setdefault(name, []).append(c.tolist())
            ratio.setdefault(name, []).append(r.tolist())
            kinds[name] = kind
    return _study_result(exact, times, samples, states, kinds, cosine, ratio, h_norm)


def _checked_study_options(times, samples, ns, states) -> list[float]:
    """Check :func:`direction_study`'s options; returns ``times`` as a list of floats."""
    times = [float(t) for t in times]
    check_time(times, "times")
    check_count(samples, "samples", low=2)
    for n in ns:
        check_count(n, "ns entries")
    if states not in ("guided", "prior"):
        raise ValueError(f"states must be 'guided' or 'prior', got {states!r}")
    return times


def _study_states(exact, mixture, t, samples, *, states, generator) -> torch.Tensor:
    """``samples`` states x_t: of the guided marginal p̃_t (:func:`guided_states`) for
    ``states`` "guided", else of the prior p_t, x_t = α_t x_0 + σ_t ξ with x_0 ~ p_0 and
    ξ ~ N(0, I) (float64). (docs/maths.md §14.6)"""
    if states == "guided":
        return guided_states(exact, t, samples, generator=generator)
    x0 = exact.prior.sample(samples, generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    return mixture.schedule.alpha(t) * x0 + mixture.schedule.sigma(t) * noise


def _step_alignments(exact, mixture, loss, x_t, t, h, *, ns, sampler_steps, seed, step):
    """(name, kind, (cosine, ratio)) of each method at the states x_t of time t, the gradient
    methods first (:func:`gradient_directions`, kind "gradient": :func:`alignment` of −d with
    h_t = ``h``), then the μ-terms (:func:`x0_moves`, kind "move": of Δ0 with the exact
    x0_shift). (docs/maths.md §14.6)"""
    found = gradient_directions(
        mixture, loss, x_t, t, ns=ns, sampler_steps=sampler_steps, seed=seed, step=step
    )
    out = [(name, "gradient", alignment(-d, h)) for name, d in found.items()]
    shift = exact.x0_shift(x_t, t)
    moves = x0_moves(mixture, loss, x_t, t, seed=seed, step=step)
    return out + [(name, "move", alignment(move, shift)) for name, move in moves.items()]


def _study_result(exact, times, samples, states, kinds, cosine, ratio, h_norm) -> dict:
    """:func:`direction_study`'s dict from its per-sample values: their summaries
    (:func:`summarise`), the fraction of vanished directions (ratio 0) and the tilted
    mixture's :func:`effective_components`."""
    methods = list(cosine)
    return {
        "times": times,
        "samples": samples,
        "states": states,
        "methods": methods,
        "kinds": kinds,
        "cosine": cosine,
        "ratio": ratio,
        "summary": {
            m: {"cosine": summarise(cosine[m]), "ratio": summarise(ratio[m])} for m in methods
        },
        "vanished": {m: [sum(r == 0 for r in row) / samples for row in ratio[m]] for m in methods},
        "h_norm": h_norm,
        "effective_components": effective_components(exact),
    }


def estimate_jacobian(model, x_t: torch.Tensor, t: float, *, n: int) -> torch.Tensor:
    """J = ∂Φ_n(x_t)/∂x_t of the n-step to-zero estimate, (B, D, D) float64, one row per
    output pixel (D reverse passes; n = 1: Tweedie's estimate, whose Jacobian is
    (α_t/σ_t²) Cov[x_0 | x_t]). (docs/maths.md §14.6)"""
    batch, dim = x_t.shape[0], x_t[0].numel()
    ts = time_grid(model.schedule, t, 0.0, n)
    rows = []
    for i in range(dim):
        pixel = lambda x, i=i: x.reshape(x.shape[0], -1)[:, i]  # noqa: E731
        rows.append(_loss_gradient(model, pixel, x_t, t, ts).reshape(batch, dim))
    return torch.stack(rows, 1)


def plot_directions(
    studies: Mapping[tuple[str, str], dict],
    *,
    statistic: str = "cosine",
    methods: Sequence[str] | None = None,
):
    """Median ``statistic`` ("cosine" or "ratio") against t, one line per method with its
    quartiles shaded; one panel per (loss, schedule) key of ``studies`` (rows the losses,
    columns the schedules). Ratios are drawn on a log axis. Returns the Figure."""
    if statistic not in ("cosine", "ratio"):
        raise ValueError(f"statistic must be 'cosine' or 'ratio', got {statistic!r}")
    if not studies:
        raise ValueError("studies must hold at least one study")
    import matplotlib.pyplot as plt

    losses = list(dict.fromkeys(key[0] for key in studies))
    schedules = list(dict.fromkeys(key[1] for key in studies))
    fig, axes = plt.subplots(
        len(losses),
        len(schedules),
        figsize=(4.2 * len(schedules), 2.8 * len(losses)),
        squeeze=False,
        sharex=True,
    )
    for (loss, schedule), study in studies.items():
        ax = axes[losses.index(loss)][schedules.index(schedule)]
        shown = [m for m in (methods or study["methods"]) if m in study["summary"]]
        for m in shown:
            s = study["summary"][m][statistic]
            style = "--" if "sampler" in m else (":" if study["kinds"][m] == "move" else "-")
            (line,) = ax.plot(study["times"], s["median"], style, marker="o", ms=3, label=m)
            ax.fill_between(study["times"], s["q1"], s["q3"], color=line.get_color(), alpha=0.12)
        if statistic == "ratio":
            ax.set_yscale("log")
            ax.axhline(1.0, color="k", lw=0.6)
        else:
            ax.set_ylim(-1.05, 1.05)
            ax.axhline(0.0, color="k", lw=0.6)
        ax.set_title(f"{loss}, {schedule}", fontsize=9)
        ax.set_xlabel("t")
        ax.set_ylabel("median cos(−d, h)" if statistic == "cosine" else "‖d‖/‖h‖")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    return fig
