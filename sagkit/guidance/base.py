"""Base samplers of guided sampling: the update x_t → x_s that guidance corrects.

A base sampler walks a fixed list of times ``times`` = (t_0 = start, …, t_K = the output's
time), evaluating the model at t_0 … t_{K−1}:

    eps = base.eps(model, x_t, k, cond)           ε(x_t, t_k), (B, ...): the step's network call
    x_s = base.update(x_t, k, eps, generator=g)    the step t_k → t_{k+1} with that ε

Splitting the network call from the update lets the guided sampler reuse ε (the first step of
the n-step estimate, docs/maths.md §8.8) and change it (backward guidance, §8.9) before the
update. Two kinds (:func:`make_base`):

- :class:`DDIMBase`, sagkit's own: DDIM (η = 0) on ``steps`` steps uniform in t from 1 to 0,
  the update being one explicit Euler step of :func:`sagkit.solve` in (y, ρ).
- :class:`SchedulerBase`: any diffusers scheduler, driven through its own ``set_timesteps`` and
  ``step`` (stochastic ones with the generator), so a guided run with ``guidance="none"``
  is diffusers' own denoising loop. The timestep τ (0 … N − 1) is sagkit's time
  t = (τ + 1)/N (docs/maths.md §1.3).

Time travel repeats a step: :meth:`save` before it and :meth:`load` before each repeat put
the sampler back as it was, so that a multistep scheduler's history holds the model output of
the step actually taken, once (docs/maths.md §8.7).
"""

from __future__ import annotations

import copy
import importlib
import inspect

import torch

from ..core.frames import rho_of_t, tweedie_x0
from ..core.schedules import time_grid
from ..core.solvers import SOLVERS, ProbabilityFlow, rk_step

__all__ = ["DDIMBase", "SchedulerBase", "make_base", "first_stage_eps", "check_same_schedule"]


def first_stage_eps(model, x_t: torch.Tensor, t: float, cond=None) -> torch.Tensor:
    """ε(x_t, t) evaluated exactly as the first stage of a solve from t (:func:`sagkit.solve`):
    at α_t (x_t/α_t), which equals x_t up to rounding. Every base sampler takes its ε this way,
    so the base step's ε is the n-step estimate's first network call, bit for bit, and the two
    can share it (docs/maths.md §8.8)."""
    f = ProbabilityFlow(model, cond)
    return f(f.to_y(x_t, t), rho_of_t(model.schedule, t), t)


class DDIMBase:
    """sagkit's DDIM (η = 0): ``steps`` steps uniform in t from 1 to 0.

    x_s = α_s x̂0 + σ_s ε with x̂0 = (x_t − σ_t ε)/α_t, computed as the Euler step
    y_s = y_t + (ρ_s − ρ_t) ε in y = x/α, ρ = σ/α (docs/maths.md §2.2).
    """

    def __init__(self, schedule, steps: int):
        self.schedule = schedule
        self.times = [float(t) for t in time_grid(schedule, 1.0, 0.0, steps)]

    def start(self, x_T: torch.Tensor) -> torch.Tensor:
        """The state at t_0 = 1 for the initial noise x_T: x_T itself."""
        return x_T

    def eps(self, model, x_t: torch.Tensor, k: int, cond=None) -> torch.Tensor:
        """ε(x_t, t_k) (:func:`first_stage_eps`)."""
        return first_stage_eps(model, x_t, self.times[k], cond)

    def update(self, x_t: torch.Tensor, k: int, eps: torch.Tensor, *, generator=None):
        """x_{t_{k+1}} from x_{t_k} and its ε (deterministic: ``generator`` is unused)."""
        t, s = self.times[k], self.times[k + 1]
        f = ProbabilityFlow(_Constant(eps, self.schedule))
        rho = rho_of_t(self.schedule, t)
        y = rk_step(f, f.to_y(x_t, t), rho, rho_of_t(self.schedule, s) - rho, SOLVERS["ddim"], t)
        return f.to_x(y, s)

    def save(self):
        return None

    def load(self, state) -> None:
        """Nothing to restore: the update is a function of its inputs."""


class _Constant:
    """A model whose ε is a given tensor: the slope of an update whose ε is already known."""

    def __init__(self, eps: torch.Tensor, schedule):
        self.value, self.schedule = eps, schedule

    def eps(self, x, t, cond=None):
        return self.value


class SchedulerBase:
    """A diffusers scheduler as the base sampler, through its ``set_timesteps`` and ``step``.

    Args:
        scheduler: a diffusers scheduler of the model's training schedule (the same
            ``alphas_cumprod``, checked by :func:`check_same_schedule`; its prediction type may
            differ). It is copied: the caller's scheduler is left as it was.
        model: the model (its ``schedule.num_train_timesteps`` N maps τ to t = (τ + 1)/N).
        steps: passed to ``set_timesteps``.
        device: where the scheduler's timesteps live.

    The network's ε is converted to the scheduler's ``prediction_type`` (ε itself, x̂0, or
    v = α ε − σ x̂0) before ``step``. Schedulers that work on x/α ("sigma" schedulers such as
    ``EulerDiscreteScheduler``: ``scale_model_input`` divides by sqrt(σ² + 1)) are converted
    to and from sagkit's variance-preserving x at every step with that factor, so guidance and
    time travel see the same x as with any other sampler. Schedulers that evaluate the network
    several times per timestep (Heun, KDPM2: repeated timesteps) are refused.
    """

    def __init__(self, scheduler, model, steps: int, *, device=None):
        if not (hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step")):
            raise TypeError(
                f"sampler must be 'ddim' or a diffusers scheduler, got {type(scheduler).__name__}"
            )
        n_train = model.schedule.num_train_timesteps
        if n_train is None:
            raise ValueError(
                "a diffusers scheduler as sampler needs a model with a discrete schedule "
                "(VPSchedule.from_diffusers)"
            )
        check_same_schedule(scheduler, model)
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        if len(timesteps) != steps or len(set(timesteps.tolist())) != steps:
            raise ValueError(
                f"sampler {type(scheduler).__name__} takes {len(timesteps)} network calls for "
                f"{steps} steps (a repeated timestep): only schedulers with one call per step "
                "can be guided"
            )
        self.schedule = model.schedule
        self.timesteps = timesteps
        final = getattr(self.scheduler, "final_alpha_cumprod", None)
        # The output's time: α = 1 (t = 0), except DDIM-type schedulers that stop at ᾱ[0].
        t_end = 0.0 if final is None or float(final) >= 1 else 1.0 / n_train
        self.times = [(float(tau) + 1) / n_train for tau in timesteps.tolist()] + [t_end]
        accepted = inspect.signature(self.scheduler.step).parameters
        self._takes_generator = "generator" in accepted

    def _scale(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """a_k of x = a_k · z between sagkit's x and the scheduler's sample z before step k:
        the factor of the scheduler's own ``scale_model_input`` (1 for variance-preserving
        schedulers, 1/sqrt(σ_k² + 1) = α for sigma schedulers), a 0-dim tensor (no sync)."""
        one = torch.ones((), dtype=like.dtype, device=like.device)
        if k == len(self.timesteps):  # the output: σ = 0
            return one
        return self.scheduler.scale_model_input(one, self.timesteps[k])

    def start(self, x_T: torch.Tensor) -> torch.Tensor:
        """The state at t_0 for the initial noise x_T, as diffusers' pipelines start: the
        scheduler's sample x_T · ``init_noise_sigma``, in sagkit's x (times a_0). x_T itself
        for variance-preserving schedulers; sigma schedulers with "linspace" or "trailing"
        spacing start at σ_0 x_T where sqrt(σ_0² + 1) x_T would be exact (a relative
        1/(2σ_0²), diffusers' choice)."""
        return x_T * self.scheduler.init_noise_sigma * self._scale(0, x_T)

    def eps(self, model, x_t: torch.Tensor, k: int, cond=None) -> torch.Tensor:
        """ε(x_t, t_k), the network at the scheduler's timestep τ_k (:func:`first_stage_eps`)."""
        return first_stage_eps(model, x_t, self.times[k], cond)

    def update(self, x_t: torch.Tensor, k: int, eps: torch.Tensor, *, generator=None):
        """The scheduler's ``step`` from τ_k with that ε; x at t_{k+1}."""
        output = self._prediction(x_t, k, eps)
        extra = {"generator": generator} if self._takes_generator else {}
        z = x_t / self._scale(k, x_t)
        z_s = self.scheduler.step(output, self.timesteps[k], z, **extra).prev_sample
        return z_s * self._scale(k + 1, x_t)  # after the step: the next step's factor

    def _prediction(self, x_t, k, eps):
        kind = self.scheduler.config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            return eps
        t = self.times[k]
        x0 = tweedie_x0(self.schedule, x_t, t, eps)
        if kind == "sample":
            return x0
        if kind == "v_prediction":  # v = α ε − σ x0
            return self.schedule.alpha(t) * eps - self.schedule.sigma(t) * x0
        raise ValueError(f"the scheduler's prediction_type {kind!r} is not supported")

    def save(self) -> dict:
        """The scheduler's mutable state (step index, multistep history)."""
        return _copied(vars(self.scheduler))

    def load(self, state: dict) -> None:
        """Put the scheduler back to a :meth:`save`d state (the state can be loaded again)."""
        vars(self.scheduler).clear()
        vars(self.scheduler).update(_copied(state))


def check_same_schedule(scheduler, model) -> None:
    """Refuse a scheduler whose training schedule is not the model's, describing both.

    The scheduler's N = ``num_train_timesteps`` must be the model's, and its ``alphas_cumprod``
    ᾱ_n must equal the model's α² at t_n = (n + 1)/N within γ_N of float32 (N·2⁻²⁴): diffusers
    computes ᾱ as a float32 product of N factors, so two schedulers of one schedule agree to
    that, while another beta schedule or N differs by far more (10⁻² relative and up). The
    prediction type need not match: the base step converts ε to the scheduler's.

    (docs/maths.md §1.3)
    """
    n_model = model.schedule.num_train_timesteps
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is None:
        raise TypeError(
            f"sampler {type(scheduler).__name__} has no alphas_cumprod: pass a diffusers "
            "scheduler of the model's training schedule"
        )
    acp = torch.as_tensor(acp, dtype=torch.float64).cpu()
    mine = _describe_schedule(getattr(model, "scheduler", None))
    theirs = _describe_schedule(scheduler)
    if acp.numel() != n_model:
        raise ValueError(
            f"sampler {type(scheduler).__name__} was made for another training schedule than "
            f"the model: num_train_timesteps {acp.numel()} against the model's {n_model} "
            f"(sampler {theirs}; model {mine}); build it with "
            "from_config(model.scheduler.config)"
        )
    t = (torch.arange(n_model, dtype=torch.float64) + 1) / n_model
    own = model.schedule.alpha(t) ** 2
    worst = float(((acp - own).abs() / own).max())
    bound = n_model * 2.0**-24
    if not worst <= bound:
        raise ValueError(
            f"sampler {type(scheduler).__name__} was made for another training schedule than "
            f"the model: its alphas_cumprod differ from the model's by up to {worst:.2g} "
            f"relative (more than {bound:.1g}) (sampler {theirs}; model {mine}); build it with "
            "from_config(model.scheduler.config)"
        )


def _describe_schedule(scheduler) -> str:
    config = getattr(scheduler, "config", None)
    if config is None:
        return "no diffusers config"
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
    return ", ".join(f"{k}={config.get(k)!r}" for k in keys if k in config)


def _copied(state: dict) -> dict:
    """A copy of a scheduler's attributes in which the lists (its history) are new lists: a
    ``step`` shifts them in place and replaces, never modifies, the tensors they hold."""
    return {k: list(v) if isinstance(v, list) else v for k, v in state.items()}


def make_base(sampler, model, steps: int, *, device=None):
    """The base sampler for ``sampler``: "ddim" (sagkit's), a diffusers scheduler, or a
    diffusers scheduler class name, built from the model's scheduler config (``model.scheduler``,
    as :mod:`sagkit.guidance.presets` builds its samplers)."""
    if isinstance(sampler, str) and sampler == "ddim":
        return DDIMBase(model.schedule, steps)
    if isinstance(sampler, str):
        config = getattr(getattr(model, "scheduler", None), "config", None)
        if config is None:
            raise ValueError(
                f"sampler {sampler!r} is built from the model's diffusers scheduler config: the "
                "model needs a .scheduler (e.g. sk.load_pretrained('digits')); or pass a scheduler"
            )
        sampler = getattr(importlib.import_module("diffusers"), sampler).from_config(config)
    return SchedulerBase(sampler, model, steps, device=device)
