"""Sequential Monte Carlo with twisted targets: any guidance method made asymptotically exact.

The twisted diffusion sampler (Wu et al. 2023, "Practical and Asymptotically Exact Conditional
Sampling in Diffusion Models") runs N particles per sample through the base sampler's times
t_0 > … > t_K = 0 (docs/maths.md §14.8). At a step t → s each particle moves by a *proposal*
q(x_s | x_t), the guided step of a method (:mod:`sagkit.guidance.methods`, or the
:class:`~sagkit.guidance.oracle.Oracle`), and is reweighted by

    w = p(x_s | x_t) φ_s(x_s) / (q(x_s | x_t) φ_t(x_t)),

with p the model's own (unguided) ancestral kernel and φ_t a *twisting function* approximating
E[e^{−L(x_0)} | x_t]; φ_0 = e^{−L}, and the first weight is φ_{t_0}(x_{t_0}) (the particles
start from the model's N(0, I)). The weights telescope: whatever q and φ, the final weighted
particles target the model's discrete path measure tilted by e^{−L(x_0)}, exactly as N → ∞
(the DDPM discretisation of the model remains, and vanishes with the steps). A good φ and q
only lower the variance: with the exact φ (:class:`ExactTwist`) and the Oracle's proposal the
weights are constant up to the discretisation.

Both kernels are the ancestral (DDPM) step of a clean-image estimate x̂0 (:func:`ancestral_kernel`):

    N(x_s; α_s x̂0 + r σ_s²/σ_t² (x_t − α_t x̂0), c² I),   r = α_t/α_s,   c² = σ_s² (1 − r² σ_s²/σ_t²),

p with the network's x̂0, q with the method's shifted prediction's x̂0 and then its correction
(FreeDoM's −ρ g) applied to the mean; they share c², so log p/q is a difference of quadratic
forms (:func:`log_kernel_ratio`). At s = 0 (c = 0) both are point masses: the last step is the
unguided one, x_0 = the mean of p, with log p/q = 0.

Resampling is systematic (:func:`systematic_resample`), for each sample whose effective
sample size (:func:`effective_sample_size`) falls below ``ess_threshold`` · N.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core.checks import check_count, check_inputs, check_scale
from ..core.estimates import estimate_x0
from ..core.models import null_cond_of
from ..core.tilted import ExactGuidance
from .config import GuidanceConfig
from .methods import Unguided, per_sample_loss

__all__ = [
    "ExactTwist",
    "EstimateTwist",
    "SMCResult",
    "ancestral_kernel",
    "kernel_log_prob",
    "log_kernel_ratio",
    "effective_sample_size",
    "systematic_resample",
    "sample_smc",
]


@dataclass(frozen=True)
class ExactTwist:
    """The exact twisting function of a mixture: log φ_t(x) = log E[e^{−L(x_0)} | x_t = x]
    (:meth:`~sagkit.core.tilted.ExactGuidance.log_expected`); no network call.

    (docs/maths.md §14.8)
    """

    exact: ExactGuidance

    def __post_init__(self):
        if not isinstance(self.exact, ExactGuidance):
            raise TypeError(f"exact must be an ExactGuidance, got {type(self.exact).__name__}")

    def __call__(self, model, x: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        """log φ_t(x), (B,)."""
        return self.exact.log_expected(x, t).to(x)

    def __repr__(self) -> str:
        return f"ExactTwist({type(self.exact.loss).__name__})"


@dataclass(frozen=True)
class EstimateTwist:
    """A heuristic's twisting function: log φ_t(x) = −L(x̂0(x_t)) with the n-step estimate
    (:func:`~sagkit.core.estimates.estimate_x0`; n = 1 the one-step Tweedie estimate, TDS's
    choice); n network calls.

    (docs/maths.md §14.8)
    """

    loss_fn: Callable
    n: int = 1

    def __post_init__(self):
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")
        check_count(self.n, "n")

    def __call__(self, model, x: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        """log φ_t(x), (B,)."""
        with torch.no_grad():
            return -per_sample_loss(self.loss_fn, estimate_x0(model, x, t, n=self.n, cond=cond))

    def __repr__(self) -> str:
        return f"EstimateTwist(n={self.n})"


@dataclass(frozen=True)
class SMCResult:
    """The weighted particles of :func:`sample_smc`.

    Attributes:
        particles: (R, N, ...) the final particles x_0 of R independent runs.
        log_weights: (R, N) their normalised log weights (logsumexp over N is 0).
        log_normaliser: (R,) log Ẑ, the estimate of log E[e^{−L(x_0)}] under the model's
            discrete path measure (its exponential is unbiased).
        ess: (K + 1, R) the effective sample size before each step's resampling, and at the end.
        resampled: (K, R) whether each run resampled before each step.
    """

    particles: torch.Tensor
    log_weights: torch.Tensor
    log_normaliser: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor

    def draw(self, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One particle per run drawn from its final weights, (R, ...)."""
        weights = self.log_weights.exp().to("cpu", torch.float64)
        index = torch.multinomial(weights, 1, generator=generator)[:, 0].to(self.particles.device)
        return self.particles[torch.arange(len(index), device=index.device), index]


def ancestral_kernel(
    schedule, x_t: torch.Tensor, t: float, s: float, x0: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The ancestral (DDPM) step t → s from the estimate x0: (mean (B, ...), c), the kernel
    being N(mean, c² I) with r = α_t/α_s and

        mean = α_s x0 + r σ_s²/σ_t² (x_t − α_t x0),      c² = σ_s² (1 − r² σ_s²/σ_t²),

    the posterior p(x_s | x_t, x_0 = x0) of the forward process; for a VP schedule DDPM's
    posterior mean and its "fixed_small" variance (1 − ᾱ_s)/(1 − ᾱ_t) (1 − ᾱ_t/ᾱ_s).

    (docs/maths.md §14.8)
    """
    a_t, a_s = float(schedule.alpha(t)), float(schedule.alpha(s))
    s_t, s_s = float(schedule.sigma(t)), float(schedule.sigma(s))
    gain = (a_t / a_s) * s_s**2 / s_t**2  # r σ_s²/σ_t²
    mean = a_s * x0 + gain * (x_t - a_t * x0)
    variance = s_s**2 * (1 - (a_t / a_s) * gain)
    return mean, math.sqrt(max(variance, 0.0))


def _squared_norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).pow(2).sum(1)


def kernel_log_prob(x_s: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x_s; mean, c² I) = −‖x_s − mean‖²/(2c²) − (D/2) log(2π c²), (B,) for (B, ...)
    inputs of D = prod(...) entries; c = ``std`` > 0.

    (docs/maths.md §14.8)
    """
    dim = x_s[0].numel()
    return -_squared_norm(x_s - mean) / (2 * std**2) - 0.5 * dim * math.log(2 * math.pi * std**2)


def log_kernel_ratio(
    x_s: torch.Tensor, mean_p: torch.Tensor, mean_q: torch.Tensor, std: float
) -> torch.Tensor:
    """log p(x_s | x_t) − log q(x_s | x_t) for two kernels of one variance c² (``std`` c > 0):

        (‖x_s − μ_q‖² − ‖x_s − μ_p‖²)/(2c²),   (B,),

    the normalising constants cancelling exactly. (docs/maths.md §14.8)
    """
    return (_squared_norm(x_s - mean_q) - _squared_norm(x_s - mean_p)) / (2 * std**2)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = 1/Σ_i W_i² of the normalised weights W = softmax(log w) along the last axis:
    (R,) for (R, N); between 1 and N. (docs/maths.md §14.8)"""
    return 1.0 / torch.softmax(log_weights, -1).pow(2).sum(-1)


def systematic_resample(
    log_weights: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Systematic resampling of each row of (R, N) log weights: indices (R, N), row r taking
    particle i at the positions (u_r + j)/N, j = 0 … N − 1, that fall in
    [C_{i−1}, C_i), C the cumulative normalised weights and u_r ~ U[0, 1). Particle i is
    taken ⌊N W_i⌋ or ⌈N W_i⌉ times, N W_i in expectation.

    (docs/maths.md §14.8)
    """
    rows, n = log_weights.shape
    weights = torch.softmax(log_weights.to(torch.float64), -1)
    cumulative = weights.cumsum(-1)
    cumulative[:, -1] = 1.0  # no position beyond the last particle by rounding
    u = torch.rand(rows, 1, generator=generator, dtype=torch.float64)
    positions = (u + torch.arange(n, dtype=torch.float64)) / n
    index = torch.searchsorted(cumulative.cpu(), positions, right=True)
    return index.clamp(max=n - 1).to(log_weights.device)


def sample_smc(
    model,
    loss_fn: Callable,
    x_T: torch.Tensor,
    *,
    twist: Callable,
    guidance="freedom",
    steps: int = 100,
    sampler="ddim",
    ess_threshold: float = 0.5,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **options,
) -> SMCResult:
    """Twisted sequential Monte Carlo (TDS, Wu et al. 2023) with a guided DDPM proposal.

    Args:
        model: a model of the protocol (unconditional, or run on its ``null_cond``).
        loss_fn: images (B, ...) → (B,) values L; the final weight holds φ_0 = e^{−L}.
        x_T: (R, N, ...) initial noise N(0, I): R independent runs of N particles each.
        twist: log φ_t: ``twist(model, x, t, cond)`` → (B,), e.g. :class:`ExactTwist` or
            :class:`EstimateTwist`.
        guidance: the proposal's method (a name in :data:`sagkit.GUIDANCE` or a
            :class:`~sagkit.guidance.methods.GuidanceMethod`, e.g. the Oracle); "none" proposes
            from the model itself.
        steps: base sampler steps (their times are the sampler's).
        sampler: "ddim" (times uniform in t) or a diffusers scheduler, whose times the
            ancestral kernel visits (a ``DDPMScheduler`` gives DDPM's own steps).
        ess_threshold: resample a run when its ESS < ``ess_threshold`` · N (0 never, 1 always
            unless its weights are equal).
        generator: for the kernels' noise and the resampling.
        progress: show a progress bar.
        **options: the proposal's other fields of
            :class:`~sagkit.guidance.config.GuidanceConfig` (``scale``, ``n``, ``window``:
            default (0, 1), every step guided; ``estimate_grid``, ``step_size``,
            ``backward_steps``, ``gradient``); no time travel (``repeats``) or CFG.
    Returns:
        An :class:`SMCResult`; ``result.draw()`` gives one sample per run.

    (docs/maths.md §14.8)
    """
    x_T = torch.as_tensor(x_T)
    ess_threshold = _check_smc_inputs(model, loss_fn, x_T, twist, ess_threshold)
    config = _smc_config(guidance, steps, sampler, options)
    with torch.no_grad():
        per_sample_loss(loss_fn, x_T[0, :1])  # fail early on a wrong shape or reference
    run = config.bind(model, loss_fn, cond=_particle_cond(model, x_T), device=x_T.device)
    return _run_smc(
        run, x_T, twist, ess_threshold=ess_threshold, generator=generator, progress=progress
    )


def _check_smc_inputs(model, loss_fn, x_T, twist, ess_threshold) -> float:
    """Check :func:`sample_smc`'s x_T (R, N, ...), ``loss_fn``, ``twist`` and
    ``ess_threshold`` (in [0, 1]); returns ``ess_threshold`` as a float."""
    if x_T.ndim < 3:
        raise ValueError(
            f"x_T must have shape (R, N, ...) (runs, particles, ...), got {tuple(x_T.shape)}"
        )
    check_inputs(model, x_T.flatten(0, 1), x_name="x_T")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not callable(twist):
        raise TypeError(f"twist must be callable (log φ_t), got {type(twist).__name__}")
    ess_threshold = check_scale(ess_threshold, "ess_threshold")
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    return ess_threshold


def _smc_config(guidance, steps, sampler, options: dict) -> GuidanceConfig:
    """The proposal's :class:`~sagkit.guidance.config.GuidanceConfig`, its window (0, 1) by
    default (every step guided); no time travel (``repeats``) or CFG."""
    for name in ("repeats", "cfg_scale", "reuse_eps"):
        if name in options:
            raise ValueError(f"{name} is not an option of sample_smc (no time travel, no CFG)")
    return GuidanceConfig.resolve(
        defaults={"window": (0.0, 1.0)},
        guidance=guidance,
        steps=steps,
        sampler=sampler,
        **options,
    )


def _particle_cond(model, x_T):
    """The model's ``null_cond`` expanded to the R · N particles of x_T, or None."""
    null = null_cond_of(model)
    return (
        None if null is None else null.to(x_T).expand(x_T.shape[0] * x_T.shape[1], *null.shape[1:])
    )


def _run_smc(run, x_T, twist, *, ess_threshold, generator, progress) -> SMCResult:
    """:func:`sample_smc`'s loop on checked inputs: the weights start at φ_{t_0}; each step
    resamples the runs whose ESS fell below ``ess_threshold`` · N (:func:`_resample_runs`),
    moves the particles by the proposal (:func:`_propose`) and reweights them by
    p/q · φ_s/φ_t (:func:`_log_twist` for φ_s). (docs/maths.md §14.8)"""
    model, loss_fn, cond, base = run.model, run.loss_fn, run.cond, run.base  # the proposal's
    rows, n, shape = x_T.shape[0], x_T.shape[1], x_T.shape[2:]
    times, schedule, unguided = base.times, model.schedule, Unguided()
    x = base.start(x_T.reshape(rows * n, *shape))
    log_phi = twist(model, x, times[0], cond).reshape(rows, n)  # the first weight: φ_{t_0}
    log_w = log_phi.clone()
    log_z = torch.zeros(rows, dtype=torch.float64, device=x.device)
    ess_history, resampled_history = [], []
    steps = len(run.counts)
    bar = tqdm(range(steps), desc=f"smc {run.method.name}", disable=not progress, leave=False)
    for k in bar:
        t, s = times[k], times[k + 1]
        ess = effective_sample_size(log_w)
        resample = ess < ess_threshold * n
        ess_history.append(ess)
        resampled_history.append(resample)
        if bool(resample.any()):
            x, log_phi, log_w, log_z = _resample_runs(x, log_phi, log_w, log_z, resample, generator)
        step_method = run.method if run.guided[k] else unguided
        x_s, log_ratio = _propose(run, step_method, k, x, t, s, schedule, generator)
        final = k == steps - 1
        log_phi_s = _log_twist(model, loss_fn, twist, x_s, s, cond, final=final).reshape(rows, n)
        log_w = log_w + log_ratio.reshape(rows, n) + log_phi_s - log_phi
        x, log_phi = x_s, log_phi_s
        if progress:
            bar.set_postfix(ess=f"{float(ess.mean()):.3g}")
    ess_history.append(effective_sample_size(log_w))
    log_z = log_z + (torch.logsumexp(log_w, 1) - math.log(n)).double()
    return SMCResult(
        particles=x.reshape(rows, n, *shape),
        log_weights=torch.log_softmax(log_w, 1),
        log_normaliser=log_z,
        ess=torch.stack(ess_history),
        resampled=torch.stack(resampled_history),
    )


def _resample_runs(x, log_phi, log_w, log_z, resample, generator):
    """Systematic resampling of the runs flagged by ``resample`` (R,): their particles x
    (R · N, ...) and log φ (R, N) re-indexed, their log weights reset to 0 and their mean
    weight log(Σ_i w_i / N) added to log Ẑ (R,); the other runs keep theirs.
    Returns (x, log_phi, log_w, log_z). (docs/maths.md §14.8)"""
    rows, n = log_w.shape
    index = systematic_resample(log_w, generator=generator)
    keep = torch.arange(n, device=x.device).expand(rows, n)
    index = torch.where(resample[:, None], index, keep)  # (R, N)
    flat = (index + n * torch.arange(rows, device=x.device)[:, None]).flatten()
    x, log_phi = x[flat], log_phi.flatten()[flat].reshape(rows, n)
    log_z = log_z + torch.where(resample, (torch.logsumexp(log_w, 1) - math.log(n)).double(), 0.0)
    log_w = torch.where(resample[:, None], torch.zeros_like(log_w), log_w)
    return x, log_phi, log_w, log_z


def _propose(run, method, k, x, t, s, schedule, generator):
    """The move t → s of step k: (x_s (B, ...), log p(x_s | x_t) − log q(x_s | x_t) (B,)),
    x_s drawn from the proposal q, the ancestral kernel of ``method``'s shifted prediction's
    x̂0 with its correction applied to the mean, p the kernel of the network's x̂0 (the same
    c²). At s = 0 (c = 0) both are point masses: x_s is the unguided step, log p/q = 0.

    (docs/maths.md §14.8)
    """
    step = method.evaluate(run, k, x)
    with torch.no_grad():
        mean_p, std = ancestral_kernel(schedule, x, t, s, step.x0)
        if std > 0:
            pred_q = method.shift_pred(run, step)
            x0_q = step.x0 if pred_q is step.pred else run.x0(x, t, pred_q)
            mean_q, _ = ancestral_kernel(schedule, x, t, s, x0_q)
            mean_q = method.correct(run, step, mean_q)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x_s = mean_q + std * noise
            log_ratio = log_kernel_ratio(x_s, mean_p, mean_q, std)
        else:  # both kernels are point masses at s = 0: the unguided step
            x_s, log_ratio = mean_p, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return x_s, log_ratio


def _log_twist(model, loss_fn, twist, x_s, s, cond, *, final: bool) -> torch.Tensor:
    """log φ_s(x_s), (B,): ``twist`` at s, or at the last step log φ_0 = −L(x_0)."""
    with torch.no_grad():
        if final:
            return -per_sample_loss(loss_fn, x_s)  # φ_0 = e^{−L}
        return twist(model, x_s, s, cond)
