"""Base samplers of guided sampling: the update x_t → x_s that guidance corrects.

A base sampler walks a fixed list of times ``times`` = (t_0 = start, …, t_K = the output's
time), evaluating the model at t_0 … t_{K−1}:

    pred = base.predict(model, x_t, k, cond)       F(x_t, t_k), (B, ...): the step's network call
    x_s = base.update(x_t, k, pred, generator=g)   the step t_k → t_{k+1} with that F

F is the network's prediction in the schedule's ODE frame (:func:`sagkit.core.frames.ode_frame`):
ε for VP schedules, the velocity v = ε − x̂0 for flow schedules. Splitting the network call
from the update lets the guided sampler reuse F (the first step of the n-step estimate,
docs/maths.md §8.8) and change it (backward guidance, §8.9) before the update. Two kinds
(:func:`make_base`):

- :class:`DDIMBase`, sagkit's own: DDIM (η = 0) on ``steps`` steps uniform in t from 1 to 0,
  the update being one explicit Euler step of :func:`sagkit.solve` in the ODE's frame.
- :class:`SchedulerBase`: any diffusers scheduler, driven through its own ``set_timesteps`` and
  ``step`` (stochastic ones with the generator), so a guided run with ``guidance="none"``
  is diffusers' own denoising loop. For a VP scheduler the timestep τ (0 … N − 1) is sagkit's
  time t = (τ + 1)/N (docs/maths.md §1.3); for a flow-matching scheduler its σ_k is σ_t, so
  t = t(σ_k) (§1.5). :class:`Timesteps` passes arguments to ``set_timesteps`` (FLUX's σ's
  and shift).

Time travel repeats a step: :meth:`save` before it and :meth:`load` before each repeat put
the sampler back as it was, so that a multistep scheduler's history holds the model output of
the step actually taken, once (docs/maths.md §8.7).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass, field

import torch

from ..core.checks import require
from ..core.frames import EpsFrame, Frame, VelocityFrame, ode_frame
from ..core.models import diffusers_prediction
from ..core.schedules import FlowSchedule, is_flow_scheduler, time_grid
from ..core.solvers import ProbabilityFlow

__all__ = [
    "DDIMBase",
    "SchedulerBase",
    "Timesteps",
    "make_base",
    "first_stage",
    "FirstCall",
    "check_same_schedule",
]


def first_stage(model, x_t: torch.Tensor, t: float, cond=None) -> torch.Tensor:
    """F(x_t, t) evaluated exactly as the first stage of a solve from t (:func:`sagkit.solve`):
    at κ_t (x_t/κ_t), which equals x_t up to rounding. Every base sampler takes its F this
    way, so the base step's F is the n-step estimate's first network call, bit for bit, and
    the two can share it (docs/maths.md §8.8)."""
    f = ProbabilityFlow(model, cond)
    return f(f.to_y(x_t, t), f.nu(t), t)


class DDIMBase:
    """sagkit's DDIM (η = 0): ``steps`` steps uniform in t from 1 to 0.

    x_s = α_s x̂0 + σ_s ε̂, computed as the Euler step y_s = y_t + (ν_s − ν_t) F in the
    ODE's frame (y = x/α, ν = ρ, F = ε for VP schedules; docs/maths.md §2.2, §2.5).
    """

    def __init__(self, schedule, steps: int):
        self.schedule = schedule
        self.times = [float(t) for t in time_grid(schedule, 1.0, 0.0, steps)]

    def start(self, x_T: torch.Tensor) -> torch.Tensor:
        """The state at t_0 = 1 for the initial noise x_T: x_T itself."""
        return x_T

    def predict(self, model, x_t: torch.Tensor, k: int, cond=None) -> torch.Tensor:
        """F(x_t, t_k) (:func:`first_stage`)."""
        return first_stage(model, x_t, self.times[k], cond)

    def update(self, x_t: torch.Tensor, k: int, pred: torch.Tensor, *, generator=None):
        """x_{t_{k+1}} from x_{t_k} and its F (deterministic: ``generator`` is unused)."""
        frame = ode_frame(self.schedule)
        return frame.euler(self.schedule, x_t, self.times[k], self.times[k + 1], pred)

    def save(self):
        return None

    def load(self, state) -> None:
        """Nothing to restore: the update is a function of its inputs."""


@dataclass(frozen=True)
class Timesteps:
    """A diffusers scheduler with the keyword arguments of its ``set_timesteps``, for a
    pipeline whose loop passes some (FLUX passes ``sigmas`` and the shift ``mu``):
    ``Timesteps(scheduler, {"sigmas": sigmas, "mu": mu})`` as the ``sampler``."""

    scheduler: object
    options: dict = field(default_factory=dict)


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

    def __init__(self, scheduler, model, steps: int, *, device=None, options=None):
        if not (hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step")):
            raise TypeError(
                f"sampler must be 'ddim' or a diffusers scheduler, got {type(scheduler).__name__}"
            )
        n_train = model.schedule.num_train_timesteps
        if n_train is None:
            raise ValueError(
                "a diffusers scheduler as sampler needs a model with a discrete schedule "
                "(VPSchedule.from_diffusers or FlowSchedule.from_diffusers)"
            )
        check_same_schedule(scheduler, model)
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(steps, device=device, **(options or {}))
        timesteps = self.scheduler.timesteps
        if len(timesteps) != steps or len(set(timesteps.tolist())) != steps:
            raise ValueError(
                f"sampler {type(scheduler).__name__} takes {len(timesteps)} network calls for "
                f"{steps} steps (a repeated timestep): only schedulers with one call per step "
                "can be guided"
            )
        self.schedule = model.schedule
        self.timesteps = timesteps
        self.flow = isinstance(model.schedule, FlowSchedule)
        if self.flow:  # σ_0 … σ_K (the last 0): t = t(σ) (docs/maths.md §1.5)
            sigmas = torch.as_tensor(self.scheduler.sigmas, dtype=torch.float64).cpu()
            self.times = [float(t) for t in model.schedule.t_of_sigma(sigmas)]
        else:
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
        if k == len(self.timesteps) or self.flow:  # the output (σ = 0), or a flow's x itself
            return one
        return self.scheduler.scale_model_input(one, self.timesteps[k])

    def start(self, x_T: torch.Tensor) -> torch.Tensor:
        """The state at t_0 for the initial noise x_T, as diffusers' pipelines start: the
        scheduler's sample x_T · ``init_noise_sigma``, in sagkit's x (times a_0). x_T itself
        for variance-preserving schedulers; sigma schedulers with "linspace" or "trailing"
        spacing start at σ_0 x_T where sqrt(σ_0² + 1) x_T would be exact (a relative
        1/(2σ_0²), diffusers' choice)."""
        return x_T * getattr(self.scheduler, "init_noise_sigma", 1.0) * self._scale(0, x_T)

    def predict(self, model, x_t: torch.Tensor, k: int, cond=None) -> torch.Tensor:
        """F(x_t, t_k), the network at the scheduler's timestep τ_k (:func:`first_stage`)."""
        return first_stage(model, x_t, self.times[k], cond)

    def update(self, x_t: torch.Tensor, k: int, pred: torch.Tensor, *, generator=None):
        """The scheduler's ``step`` from τ_k with that F; x at t_{k+1}."""
        output = self._prediction(x_t, k, pred)
        extra = {"generator": generator} if self._takes_generator else {}
        z = x_t / self._scale(k, x_t)
        z_s = self.scheduler.step(output, self.timesteps[k], z, **extra).prev_sample
        return z_s * self._scale(k + 1, x_t)  # after the step: the next step's factor

    def _prediction(self, x_t, k, pred):
        """The scheduler's model output from F: the velocity itself for a flow-matching
        scheduler (its step is x + (σ_{k+1} − σ_k) v); ε, x̂0 or v = α ε − σ x̂0 by the
        ``prediction_type`` of a VP scheduler (F = ε)."""
        if self.flow:
            return pred
        kind = diffusers_prediction(self.scheduler.config.get("prediction_type", "epsilon"))
        return kind.output(self.schedule, x_t, self.times[k], pred)

    def save(self) -> dict:
        """The scheduler's mutable state (step index, multistep history)."""
        return _copied(vars(self.scheduler))

    def load(self, state: dict) -> None:
        """Put the scheduler back to a :meth:`save`d state (the state can be loaded again)."""
        vars(self.scheduler).clear()
        vars(self.scheduler).update(_copied(state))


def check_same_schedule(scheduler, model) -> None:
    """Refuse a scheduler whose training schedule is not the model's, describing both.

    A flow-matching scheduler (:func:`~sagkit.core.schedules.is_flow_scheduler`) goes with a flow model
    (:class:`~sagkit.FlowSchedule`) of the same N, and a VP scheduler with a VP model: its σ's
    are the schedule's σ_t at the times it visits, whatever its shift, so the shift need not
    match.

    The scheduler's N = ``num_train_timesteps`` must be the model's, and its ``alphas_cumprod``
    ᾱ_n must equal the model's α² at t_n = (n + 1)/N within γ_N of float32 (N·2⁻²⁴): diffusers
    computes ᾱ as a float32 product of N factors, so two schedulers of one schedule agree to
    that, while another beta schedule or N differs by far more (10⁻² relative and up). The
    prediction type need not match: the base step converts ε to the scheduler's.

    (docs/maths.md §1.3)
    """
    n_model = model.schedule.num_train_timesteps
    flow_scheduler = is_flow_scheduler(scheduler)
    if flow_scheduler or isinstance(model.schedule, FlowSchedule):
        _check_same_flow(scheduler, model, flow_scheduler, n_model)
        return
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


def _check_same_flow(scheduler, model, flow_scheduler: bool, n_model: int) -> None:
    name = type(scheduler).__name__
    if not flow_scheduler:
        raise ValueError(
            f"sampler {name} is a diffusion scheduler but the model is a flow-matching model "
            f"({model.schedule!r}): pass a FlowMatchEulerDiscreteScheduler"
        )
    if not isinstance(model.schedule, FlowSchedule):
        raise ValueError(
            f"sampler {name} is a flow-matching scheduler but the model's schedule is "
            f"{model.schedule!r}: pass a scheduler of the model's training schedule"
        )
    n = int(scheduler.config["num_train_timesteps"])
    if n != n_model:
        raise ValueError(
            f"sampler {name} was made for another training schedule than the model: "
            f"num_train_timesteps {n} against the model's {n_model}"
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
    """The base sampler for ``sampler``: "ddim" (sagkit's), a diffusers scheduler (bare or in
    :class:`Timesteps`), or a diffusers scheduler class name, built from the model's scheduler
    config (``model.scheduler``, as :mod:`sagkit.guidance.presets` builds its samplers)."""
    if isinstance(sampler, str) and sampler == "ddim":
        return DDIMBase(model.schedule, steps)
    if isinstance(sampler, Timesteps):
        return SchedulerBase(
            sampler.scheduler, model, steps, device=device, options=sampler.options
        )
    if isinstance(sampler, str):
        config = getattr(getattr(model, "scheduler", None), "config", None)
        if config is None:
            raise ValueError(
                f"sampler {sampler!r} is built from the model's diffusers scheduler config: the "
                "model needs a .scheduler (e.g. sk.digits.load_pretrained('digits')); or pass a scheduler"
            )
        sampler = getattr(importlib.import_module("diffusers"), sampler).from_config(config)
    return SchedulerBase(sampler, model, steps, device=device)


class FirstCall:
    """A model that passes every call on to ``model`` and keeps the first call's output,
    detached, as ``first = (F, Δ)``: F the prediction the call was for (ε or the velocity),
    Δ = ε_c − ε_u of that call under classifier-free guidance (``cfg``; ``model`` is then a
    :class:`~sagkit.ClassifierFreeGuidance`) in ε units at the first call's time ``t``, else
    ``None``. It checks that F is finite (deferred, :func:`~sagkit.core.checks.require`)."""

    def __init__(self, model, cfg: bool, t: float):
        self.model, self.schedule, self.cfg, self.t, self.first = (
            model,
            model.schedule,
            cfg,
            t,
            None,
        )

    def eps(self, x, t, cond=None):
        return self._call(EpsFrame(), x, t, cond)

    def velocity(self, x, t, cond=None):
        return self._call(VelocityFrame(), x, t, cond)

    def _call(self, frame: Frame, x, t, cond):
        if self.first is not None:
            return frame.predict(self.model, x, t, cond)
        if self.cfg:
            pred, difference = self.model.predict_and_difference(x, t, cond, frame=frame)
            difference = frame.eps_difference(self.schedule, self.t, difference.detach())
            self.first = (pred.detach(), difference)
        else:
            pred = frame.predict(self.model, x, t, cond)
            self.first = (pred.detach(), None)
        shown = f"{frame.label}(x_t)"
        require(
            torch.isfinite(self.first[0]).all(), lambda: f"the network's {shown} holds NaN or inf"
        )
        return pred

    def __getattr__(self, name):  # parameters() and buffers(): the engines exclude them
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)
