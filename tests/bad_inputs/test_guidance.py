"""Hostile inputs to guided sampling's new surfaces (schedulers, presets, the configuration, the
engines, values going non-finite along a run), one row each, in tests/test_bad_inputs.py's
format: ``(id, before, call, exception, message)``. ``before`` is the outcome on the code this
issue was filed against (commit c92e52f): W silently wrong, B an obscure error, G a clear one.
"""

from __future__ import annotations

import functools
import math

import torch

import sagkit as sk
from sagkit.sd.tiny import tiny_pipeline


@functools.cache
def digits():
    return sk.digits.load_pretrained("digits", device="cpu")


@functools.cache
def loss():
    return sk.losses.target_class(sk.digits.load_classifier("digits", device="cpu"), 3)


def xd(batch=2):
    return torch.randn((batch, 1, 16, 16), generator=torch.Generator().manual_seed(0))


def scheduler(name="DDIMScheduler", **overrides):
    import diffusers

    return getattr(diffusers, name).from_config(digits().scheduler.config, **overrides)


class NaNAfter:
    """The digits model, whose ε turns NaN after ``calls`` network calls (a model that diverges
    mid-run, as a half-precision overflow does)."""

    def __init__(self, calls: int):
        self.model, self.schedule, self.calls, self.after = digits(), digits().schedule, 0, calls

    def eps(self, x, t, cond=None):
        self.calls += 1
        e = self.model.eps(x, t, cond)
        return e * math.nan if self.calls > self.after else e

    def __getattr__(self, name):
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


def sample(model=None, loss_fn="class", **options):
    options = {"steps": 6, "progress": False, **options}
    loss_fn = loss() if loss_fn == "class" else loss_fn
    return sk.guided_sample(model or digits(), loss_fn, xd(), **options)


def inf_beyond(y):
    """A loss that is finite on most images and inf where one pixel exceeds -2 (every image)."""
    return loss()(y) + torch.where(y.amax((1, 2, 3)) > -2, math.inf, 0.0)


@functools.cache
def sd():
    from sagkit.sd.pipeline import GuidedStableDiffusion

    return GuidedStableDiffusion.from_pipe(tiny_pipeline(latent_size=8))


def sd_call(**options):
    return sd()("a fox", steps=3, output_type="latent", progress=False, **options)


def sd_scheduler(**overrides):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(sd().pipe.scheduler.config, **overrides)


OTHER_SCHEDULE = "made for another training schedule than the model"
STEP = r"step \d+ of \d+ \(t = "

ROWS = [
    # W: a scheduler of another training schedule ran, 29–35 % off: refused, describing both.
    (
        "sampler-other-num-train-timesteps",
        "W",
        lambda: sample(guidance="none", sampler=scheduler(num_train_timesteps=500)),
        ValueError,
        OTHER_SCHEDULE + ": num_train_timesteps 500 against the model's 1000",
    ),
    (
        "sampler-scaled-linear-on-linear-model",
        "W",
        lambda: sample(guidance="none", sampler=scheduler(beta_schedule="scaled_linear")),
        ValueError,
        OTHER_SCHEDULE + r".*beta_schedule='scaled_linear'.*beta_schedule='linear'",
    ),
    (
        "sampler-other-beta-end",
        "W",
        lambda: sample(
            guidance="sag", n=2, sampler=scheduler("DPMSolverMultistepScheduler", beta_end=0.03)
        ),
        ValueError,
        OTHER_SCHEDULE,
    ),
    (
        "sd-sampler-other-num-train-timesteps",
        "W",
        lambda: sd_call(sampler=sd_scheduler(num_train_timesteps=500)),
        ValueError,
        OTHER_SCHEDULE,
    ),
    (
        "sd-sampler-linear-on-scaled-linear-pipeline",
        "W",
        lambda: sd_call(sampler=sd_scheduler(beta_schedule="linear")),
        ValueError,
        OTHER_SCHEDULE,
    ),
    # W/B: values going non-finite along a run: named by step, time and quantity.
    (
        "eps-nan-unguided",
        "W",  # returned all-NaN samples
        lambda: sample(NaNAfter(3), None, guidance="none"),
        ValueError,
        STEP + r"0\.5\): the network's ε\(x_t\) holds NaN or inf",
    ),
    (
        "eps-nan-freedom",
        "B",  # "loss_fn returned a non-finite value": blamed the loss, named no step
        lambda: sample(NaNAfter(3), guidance="freedom", window=(0.0, 1.0)),
        ValueError,
        STEP + r".*the network's ε\(x_t\) holds NaN or inf",
    ),
    (
        "eps-nan-sag-repeat",
        "B",  # "the backward pass overflowed": blamed the engine
        lambda: sample(NaNAfter(9), guidance="sag", window=(0.0, 1.0)),
        ValueError,
        r"step 1 of 6 \(t = 0\.8333, repeat 1\): the network's ε\(x_t\) holds NaN or inf",
    ),
    (
        "eps-nan-backward",
        "W",
        lambda: sample(NaNAfter(2), guidance="backward", window=(0.0, 1.0)),
        ValueError,
        STEP + r".*the network's ε\(x_t\) holds NaN or inf",
    ),
    (
        "eps-nan-inside-the-estimate",
        "B",
        lambda: sample(NaNAfter(8), guidance="sag", n=3, window=(0.0, 1.0), repeats=1),
        ValueError,
        STEP + r".*the solve's output holds NaN or inf",
    ),
    (
        "loss-inf-on-finite-input",
        "B",  # "loss_fn returned a non-finite value", no step
        lambda: sample(loss_fn=inf_beyond, guidance="freedom", window=(0.0, 1.0)),
        ValueError,
        STEP + r".*loss_fn returned a non-finite value \(inf\) on a finite input",
    ),
    (
        "sd-loss-nan-along-the-run",
        "B",  # "loss_fn returned a non-finite value (nan)", no step
        lambda: sd_call(
            loss_fn=lambda x: x.flatten(1).mean(1) * math.nan, guidance="freedom", window=(0.0, 1.0)
        ),
        ValueError,
        r"step 0 of 3 \(t = .*\): loss_fn returned a non-finite value \(nan\) on a finite input",
    ),
    (
        "dps-negative-loss",
        "G",
        lambda: sample(loss_fn=lambda y: -loss()(y), guidance="dps", window=(0.0, 1.0)),
        ValueError,
        STEP + r".*non-negative loss",
    ),
    # B → clear: the configuration's inputs.
    (
        "sampler-class-not-instance",
        "B",  # set_timesteps() missing 1 required positional argument
        lambda: sample(sampler=scheduler().__class__),
        TypeError,
        r"sampler must be a scheduler instance, got the class DDIMScheduler.*from_config",
    ),
    (
        "sampler-unknown-name",
        "G",
        lambda: sample(sampler="Euler"),
        ValueError,
        "sampler must be 'ddim', a diffusers scheduler or a diffusers scheduler class name",
    ),
    (
        "sampler-name-on-a-model-without-scheduler",
        "G",  # was a TypeError naming the model's schedule; the name did not exist
        lambda: sk.guided_sample(
            sk.digits.digits_mixture(n_components=8, size=16),
            None,
            xd().double(),
            guidance="none",
            steps=4,
            sampler="DDIMScheduler",
            progress=False,
        ),  # fmt: skip
        ValueError,
        r"sampler 'DDIMScheduler' is built from the model's diffusers scheduler config",
    ),
    (
        "budget-bytes-a-string",
        "B",  # '>=' not supported between instances of 'str' and 'int'
        lambda: sk.make_budgeted(budget_bytes="1e6"),
        TypeError,
        "budget_bytes must be a number of bytes >= 0",
    ),
    (
        "budget-bytes-nan",
        "G",
        lambda: sk.make_budgeted(budget_bytes=math.nan),
        ValueError,
        "budget_bytes must be >= 0",
    ),
    (
        "keep-steps-a-float",
        "G",
        lambda: sk.make_budgeted(keep_steps=1.5),
        ValueError,
        "keep_steps must be an integer >= 0",
    ),
    (
        "gradient-approximate-engine",
        "G",  # the option did not exist (an unexpected keyword)
        lambda: sample(gradient="adjoint"),
        ValueError,
        "gradient must be an exact engine for the DDIM estimate",
    ),
    (
        "gradient-not-an-engine",
        "G",
        lambda: sample(gradient=3),
        TypeError,
        "method must be a name in sagkit.METHODS or a GradientMethod",
    ),
    (
        "loss-grad-method-an-object",
        "G",  # was the registry's "unknown method <object ...>"
        lambda: sk.loss_grad(digits(), loss(), xd(), [0.5, 0.0], method=object()),
        TypeError,
        "method must be a name in sagkit.METHODS or a GradientMethod",
    ),
    (
        "option-misspelt",
        "G",  # Python's "unexpected keyword argument 'stpes'"
        lambda: sample(stpes=3),
        TypeError,
        "unknown guidance option stpes",
    ),
    (
        "config-and-preset",
        "G",
        lambda: sample(config=sk.GuidanceConfig(), preset="sag-paper"),
        ValueError,
        "give config or preset, not both",
    ),
    (
        "config-not-a-config",
        "G",
        lambda: sample(config={"n": 3}),
        TypeError,
        "config must be a GuidanceConfig",
    ),
    (
        "reuse-eps-not-a-bool",
        "G",
        lambda: sample(reuse_eps="yes"),
        TypeError,
        "reuse_eps must be True or False",
    ),
    (
        "repeats-list-too-short",
        "G",
        lambda: sample(repeats=[2, 2]),
        ValueError,
        r"repeats must have one entry per step \(6\), got 2",
    ),
    (
        "window-beyond-one",
        "G",
        lambda: sample(window=(0.2, 1.5)),
        ValueError,
        "window must satisfy 0 <= lo < hi <= 1",
    ),
    (
        "preset-unknown",
        "G",
        lambda: sample(preset="sag"),
        ValueError,
        "unknown preset 'sag'",
    ),
    (
        "sampler-repeated-timesteps",
        "G",
        lambda: sample(sampler=scheduler("HeunDiscreteScheduler")),
        ValueError,
        "a repeated timestep",
    ),
]
