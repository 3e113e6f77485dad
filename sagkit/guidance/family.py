"""The TFG family: LGD, MPGD, universal guidance and TFG's unified step, on the shared sampler.

TFG (Ye et al. 2024, "TFG: Unified Training-Free Guidance for Diffusion Models") writes the
training-free methods as one guided step with three scales (ρ, μ, γ) and two loops. At a
guided step t → s with the network's prediction ε(x_t) and its one-step estimate
x̂0(x_t) = (x_t − σ_t ε)/α_t (docs/maths.md §8.13):

    L̃(x) = −log (1/m) Σ_j exp(−L(x + r_t ξ_j)),   r_t = γ σ_t,   ξ_j ~ N(0, I)   smoothing
    Δ0 ← Δ0 − μ_t ∇L̃(x̂0 + Δ0)/RMS(∇L̃)      N_iter times from Δ0 = 0        μ-term on x̂0
    pred ← pred_of_x0(x_t, x̂0 + Δ0)            the prediction of the moved estimate
    x_s = Base(x_t, pred)                       the base sampler's update
    x_s ← x_s − ρ_t g,  g = ∇_{x_t} L̃(x̂0(x_t)),  ρ_t = ρ s_t · RMS(Δ)/RMS(g)   ρ-term

and the whole step is taken N_recur times with time travel between (docs/maths.md §8.5).
With γ = 0 the smoothing is the loss itself (L̃ = L); m is ``samples``. Δ in ρ's rule is
sagkit's RMS rule (:func:`~sagkit.guidance.methods.rms_step_size`): ε_c − ε_u under CFG, else
the base update x_s − x_t. The weights s_t of ``rho_schedule`` and ``mu_schedule`` (TFG's):
"constant" 1, "increase" a_k = α²_{t_k}/α²_{t_{k+1}}, "decrease" 1 − a_k, each divided by
its mean over the base sampler's K steps.

    method   ρ-term                  μ-term                  γ      N_recur   paper
    DPS      ρ, rule ζ/sqrt(L)       —                       0      1         Chung et al. 2023
    LGD      ρ                       —                       1      1         Song et al. 2023
    FreeDoM  ρ                       —                       0      ≥ 1       Yu et al. 2023
    MPGD     —                       μ, N_iter = 1           0      1         He et al. 2024
    UGD      ρ (forward)             μ, N_iter (backward)    0      ≥ 1       Bansal et al. 2023
    TFG      ρ                       μ, N_iter               γ      N_recur   Ye et al. 2024

- :class:`LGD`: loss-guided diffusion's Monte-Carlo smoothing of the estimate,
  r_t = σ_t (γ = 1: the posterior's spread σ_t/sqrt(1 + σ_t²) of LGD's VE time, which is σ_t
  of the VP schedule) and m = 4 samples by default; the gradient runs through x̂0(x_t).
- :class:`MPGD`: one step on x̂0 itself (no gradient through the network), the base step
  then taken with the prediction of the moved x̂0. On a latent model sagkit's loss is already
  L(D(z)) (:func:`sagkit.sd.latent.decoded_loss`), so the step is on the latent z0 with the
  gradient through the decoder D: MPGD's latent step; its "-AE" variant, which steps on the
  decoded image and re-encodes it, needs the encoder and is not offered.
- :class:`UGD`: universal guidance, forward guidance (FreeDoM's step) + backward guidance
  (N_iter normalised steps on x̂0, :func:`~sagkit.guidance.methods.backward_shift`) +
  self-recurrence (``recur`` repeats).
- :class:`TFG`: the unified step; ``estimate`` = n > 1 takes the ρ-term's gradient through
  SAG's n-step estimate (:meth:`~sagkit.guidance.methods.GuidanceRun.evaluate_with_gradient`
  with the configured engine and estimate grid): "TFG + SAG's estimate". A guided step then
  costs SAG's network calls for that n (n with backprop or a budget that holds the graphs,
  2n with the symplectic adjoint; the base step's ε is the estimate's first call), plus
  (1 + N_iter) batched loss evaluations of m·B images, which call no network; with ρ = 0 it
  costs one call.

Special cases (tested): TFG with ρ = c, μ = γ = 0 and constant schedules is FreeDoM with scale
c, sample for sample; with ρ = 0, μ = c, N_iter = m, γ = 0 it is backward guidance with
m steps; :class:`UGD` and :class:`MPGD` are TFG with their columns above; TFG with
``estimate = 1`` is the n-less step.

The Monte-Carlo noise ξ of step k is drawn from its own generator, seeded by a hash of the
method's ``seed`` field and k (:func:`smoothing_noise`): a configured method is a frozen value
that many runs and ranks share, so it holds no generator state, and drawing from the sampler's
time-travel generator instead would change the time-travel noise of every γ > 0 run and break
the γ = 0 cases' equality with FreeDoM. The repeats of a step share its ξ; ξ is drawn for the
whole batch, (m, B, ...), so a sample's ξ depends on its place in the batch, as the
time-travel noise does.

Scales are fields of the objects (``TFG(rho=..., mu=..., gamma=...)``); the configuration's
``scale`` and ``backward_steps`` are the built-in methods' and are not read here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..core.checks import check_count, check_name, check_scale
from ..core.frames import per_sample
from .methods import (
    GUIDANCE,
    GuidanceMethod,
    backward_shift,
    per_sample_loss,
    rms_step_size,
)
from .step import GuidanceRun, GuidedStep

__all__ = [
    "Terms",
    "UnifiedGuidance",
    "LGD",
    "MPGD",
    "UGD",
    "TFG",
    "SCHEDULES",
    "schedule_weights",
    "smoothing_noise",
    "smoothed_loss",
]

SCHEDULES = ("constant", "increase", "decrease")
"""TFG's weights of ρ_t and μ_t over the steps (docs/maths.md §8.13)."""


@dataclass(frozen=True)
class Terms:
    """The unified step's settings: ρ, μ, γ with N_iter (``iterations``), m (``samples``), the
    ρ and μ schedules, the ρ-term's estimate steps and the Monte-Carlo ``seed``."""

    rho: float
    mu: float
    gamma: float
    iterations: int
    samples: int
    rho_schedule: str = "constant"
    mu_schedule: str = "constant"
    estimate: int = 1
    seed: int = 0


def schedule_weights(schedule, times, kind: str) -> torch.Tensor:
    """TFG's weights s_k of steps k = 0 … K − 1 of the times t_0 > … > t_K, float64 (K,),
    mean 1: "constant" 1; "increase" a_k = α²_{t_k}/α²_{t_{k+1}}; "decrease" 1 − a_k.

    (docs/maths.md §8.13)
    """
    steps = len(times) - 1
    if kind == "constant":
        return torch.ones(steps, dtype=torch.float64)
    a = torch.tensor(
        [(schedule.alpha(times[k]) / schedule.alpha(times[k + 1])) ** 2 for k in range(steps)],
        dtype=torch.float64,
    )
    w = a if kind == "increase" else 1 - a
    return w / w.mean()


def smoothing_noise(seed: int, k: int, samples: int, like: torch.Tensor) -> torch.Tensor:
    """The Monte-Carlo noise ξ of step k, (samples, *like.shape) in like's dtype and device,
    from a generator seeded by a hash of (seed, k) alone."""
    digest = hashlib.sha256(repr(("smoothing", seed, k)).encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    noise = torch.randn((samples, *like.shape), generator=generator, dtype=like.dtype)
    return noise.to(like.device)


def smoothed_loss(loss_fn: Callable, noise: torch.Tensor, radius: float) -> Callable:
    """x ↦ L̃(x) = −log (1/m) Σ_j exp(−L(x + r ξ_j)), (B,), for ξ = ``noise`` (m, B, ...) and
    r = ``radius``: the m·B images go through ``loss_fn`` in one batch (a log-sum-exp).

    (docs/maths.md §8.13)
    """
    m = noise.shape[0]

    def loss(x: torch.Tensor) -> torch.Tensor:
        flat = (x[None] + radius * noise).reshape(m * x.shape[0], *x.shape[1:])
        values = per_sample_loss(loss_fn, flat).reshape(m, x.shape[0])
        return math.log(m) - torch.logsumexp(-values, dim=0)

    return loss


class UnifiedGuidance(GuidanceMethod):
    """TFG's unified step (docs/maths.md §8.13); a subclass gives its :meth:`terms`."""

    reads_scale = False  # the scales are the object's fields

    def terms(self) -> Terms:
        raise NotImplementedError

    def estimate_steps(self, n: int) -> int:
        """The ρ-term's estimate steps: the method's own (``n`` is SAG's option)."""
        return self.terms().estimate

    def _loss(self, run: GuidanceRun, k: int, like: torch.Tensor) -> Callable:
        """The loss of step k: L̃ with r_t = γ σ_t, or L itself where γ = 0."""
        terms = self.terms()
        if terms.gamma == 0:
            return run.loss_fn
        radius = terms.gamma * run.schedule.sigma(run.base.times[k])
        noise = smoothing_noise(terms.seed, k, terms.samples, like)
        return smoothed_loss(run.loss_fn, noise, radius)

    def _weight(self, run: GuidanceRun, k: int, kind: str) -> float:
        return float(schedule_weights(run.schedule, run.base.times, kind)[k])

    def evaluate(self, run: GuidanceRun, k: int, x_t: torch.Tensor) -> GuidedStep:
        """ε(x_t), with the gradient of L̃ through the estimate where ρ > 0."""
        terms = self.terms()
        if terms.rho == 0:
            return run.evaluate(k, x_t)
        smoothed = replace(run, loss_fn=self._loss(run, k, x_t))
        return smoothed.evaluate_with_gradient(k, x_t, terms.estimate)

    def shift_pred(self, run: GuidanceRun, step: GuidedStep) -> torch.Tensor:
        """The prediction whose one-step estimate is x̂0 + Δ0 (``run.pred_of_x0`` of it, taken
        in closed form: ε − (α_t/σ_t) Δ0 for ε), Δ0 from N_iter normalised steps of size μ_t
        on L̃ (:func:`~sagkit.guidance.methods.backward_shift`)."""
        terms = self.terms()
        if terms.mu == 0:
            return step.pred
        scale = terms.mu * self._weight(run, step.k, terms.mu_schedule)
        shift = backward_shift(
            self._loss(run, step.k, step.x0),
            step.x0,
            steps=terms.iterations,
            scale=scale,
            per_batch=run.config.per_batch,
        )
        return run.frame.shift_x0(run.schedule, step.t, step.pred, shift)

    def correct(self, run: GuidanceRun, step: GuidedStep, x_s: torch.Tensor) -> torch.Tensor:
        """x_s − ρ_t g with ρ_t = ρ s_t · RMS(Δ)/RMS(g)."""
        terms = self.terms()
        if terms.rho == 0:
            return x_s
        _, g = step.gradient
        delta = step.cfg_difference if step.cfg_difference is not None else x_s - step.x_t
        scale = terms.rho * self._weight(run, step.k, terms.rho_schedule)
        rho = rms_step_size(delta, g, scale=scale, per_batch=run.config.per_batch)
        return x_s - per_sample(rho, x_s) * g


def _check_fields(method, scales=(), counts=(), schedules=()) -> None:
    for name in scales:
        check_scale(getattr(method, name), name)
    for name in counts:
        check_count(getattr(method, name), name)
    for name in schedules:
        check_name(getattr(method, name), name, SCHEDULES)
    check_count(getattr(method, "seed", 0), "seed", low=0)


@dataclass(frozen=True)
class LGD(UnifiedGuidance):
    """Loss-guided diffusion (Song et al. 2023): the gradient of the Monte-Carlo smoothed loss.

    Fields: ``scale`` c of the RMS rule (default 2, FreeDoM's); ``smoothing`` γ, r_t = γ σ_t
    (1: LGD's r_t = σ_t); ``samples`` m (default 4); ``seed`` of the Monte-Carlo noise.
    """

    scale: float = 2.0
    smoothing: float = 1.0
    samples: int = 4
    seed: int = 0

    name: ClassVar[str] = "lgd"
    rule: ClassVar[str] = "lgd"
    description: ClassVar[str] = "Monte-Carlo smoothed one-step estimate (Song et al. 2023)"

    def __post_init__(self):
        _check_fields(self, ("scale", "smoothing"), ("samples",))

    def terms(self) -> Terms:
        return Terms(
            rho=self.scale,
            mu=0.0,
            gamma=self.smoothing,
            iterations=1,
            samples=self.samples,
            seed=self.seed,
        )


@dataclass(frozen=True)
class MPGD(UnifiedGuidance):
    """Manifold-preserving guided diffusion (He et al. 2024): a step on x̂0, no network gradient.

    Fields: ``scale`` c, the step's length in RMS pixels (default 1, backward guidance's).
    """

    scale: float = 1.0

    name: ClassVar[str] = "mpgd"
    rule: ClassVar[str] = "mpgd"
    description: ClassVar[str] = "one step on x̂0, mapped to the prediction (He et al. 2024)"

    def __post_init__(self):
        _check_fields(self, ("scale",))

    def terms(self) -> Terms:
        return Terms(rho=0.0, mu=self.scale, gamma=0.0, iterations=1, samples=1)


@dataclass(frozen=True)
class UGD(UnifiedGuidance):
    """Universal guidance (Bansal et al. 2023): forward + backward guidance + self-recurrence.

    Fields: ``forward`` c of FreeDoM's step (default 2); ``backward`` the descent step on x̂0
    (default 1); ``iterations`` its steps m (default 5); ``recur`` the repeats (default 2).
    """

    forward: float = 2.0
    backward: float = 1.0
    iterations: int = 5
    recur: int = 2

    name: ClassVar[str] = "ugd"
    rule: ClassVar[str] = "ugd"
    description: ClassVar[str] = "forward + backward guidance, recurrence (Bansal et al. 2023)"

    def __post_init__(self):
        _check_fields(self, ("forward", "backward"), ("iterations", "recur"))

    @property
    def repeats(self) -> int:
        return self.recur

    def terms(self) -> Terms:
        return Terms(
            rho=self.forward, mu=self.backward, gamma=0.0, iterations=self.iterations, samples=1
        )


@dataclass(frozen=True)
class TFG(UnifiedGuidance):
    """TFG's unified step (Ye et al. 2024): ρ through x̂0(x_t), μ on x̂0, γ the smoothing.

    Fields: ``rho`` (default 2), ``mu`` (default 1), ``gamma`` (default 0.1); ``iterations``
    N_iter (default 2); ``recur`` N_recur (default 2); ``samples`` m (default 4);
    ``rho_schedule`` and ``mu_schedule`` (default "increase", TFG's recommended);
    ``estimate`` the ρ-term's estimate steps (1: one step; n > 1: SAG's n-step estimate);
    ``seed`` of the Monte-Carlo noise.
    """

    rho: float = 2.0
    mu: float = 1.0
    gamma: float = 0.1
    iterations: int = 2
    recur: int = 2
    samples: int = 4
    rho_schedule: str = "increase"
    mu_schedule: str = "increase"
    estimate: int = 1
    seed: int = 0

    name: ClassVar[str] = "tfg"
    rule: ClassVar[str] = "tfg"
    description: ClassVar[str] = "unified ρ, μ, γ step (Ye et al. 2024)"

    def __post_init__(self):
        _check_fields(
            self,
            ("rho", "mu", "gamma"),
            ("iterations", "recur", "samples", "estimate"),
            ("rho_schedule", "mu_schedule"),
        )

    @property
    def repeats(self) -> int:
        return self.recur

    def terms(self) -> Terms:
        return Terms(
            self.rho,
            self.mu,
            self.gamma,
            self.iterations,
            self.samples,
            self.rho_schedule,
            self.mu_schedule,
            self.estimate,
            self.seed,
        )


for _method in (LGD(), MPGD(), UGD(), TFG()):
    GUIDANCE.register(_method.name, _method)
del _method
