"""The bad inputs of issue 13, one row each: the clear error it now gets, or its correct result.

Each row of :data:`CASES` is ``(id, before, call, exception, message)``: ``before`` is the
outcome class measured before the checks (W silently wrong, H hang, B obscure traceback,
G already a clear error), ``call`` a thunk that makes the bad call, and the row passes when
it raises ``exception`` with a message matching ``message`` (which names the argument).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from bad_inputs import test_guidance as bad_guidance
from bad_inputs import test_sd as bad_sd
from bad_inputs import test_sweeps as bad_sweeps
from helpers import make_loss

import sagkit as sk
from sagkit.core.checks import PROGRESS_STEPS
from sagkit.core.device import resolve_device
from sagkit.digits.models import DATA_DIR
from sagkit.digits.train import train_classifier
from sagkit.lab.bench import run_benchmark
from sagkit.lab.cli import main as cli_main


# --- inputs, built once ---------------------------------------------------------------------
@functools.cache
def mixture():
    means = torch.tensor(
        [[[1.0, -0.5], [0.3, 0.8]], [[-1.0, 0.2], [0.5, -0.7]], [[0.0, 0.9], [-0.8, 0.1]]]
    )
    return sk.GaussianMixture(means[:, None].double(), 0.3, sk.VPSchedule.linear())


@functools.cache
def digits():
    return sk.digits.load_pretrained("digits", device="cpu")


@functools.cache
def digits64():
    return sk.digits.load_pretrained("digits", device="cpu", dtype=torch.float64)


@functools.cache
def classifier():
    return sk.digits.load_classifier("digits", device="cpu")


def x(batch=2, dtype=torch.float64, fill=None):
    out = torch.randn((batch, 1, 2, 2), generator=torch.Generator().manual_seed(0), dtype=dtype)
    if fill is not None and batch:
        out[0, 0, 0, 0] = fill
    return out


def xd(batch=2, dtype=torch.float32, fill=None):
    """A batch for the digits model, (B, 1, 16, 16)."""
    out = torch.randn((batch, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=dtype)
    if fill is not None and batch:
        out[0, 0, 0, 0] = fill
    return out


def ts(n=3):
    return sk.time_grid(mixture().schedule, 0.8, 1e-3, n)


LOSS = make_loss()
NAN = math.nan


def detached_loss(y):
    return (y.detach() ** 2).flatten(1).sum(1)


class NoSchedule:
    def eps(self, x, t, cond=None):
        return x


class NaNBackward:
    """The mixture, plus 0·sqrt(x − x): the same ε, but a NaN vector–Jacobian product."""

    def __init__(self):
        self.schedule = mixture().schedule

    def eps(self, x, t, cond=None):
        return mixture().eps(x, t, cond) + 0 * torch.sqrt(x - x)


def cli(argv):
    """``sagkit`` with ``argv``: its exit status (argparse's usage errors exit via SystemExit)."""
    try:
        return cli_main(argv)
    except SystemExit as exit_:
        return exit_.code


def train_cli(argv):
    """``sagkit train`` with ``argv``: its exit status."""
    return cli(["train", *argv])


NAN_X = "x contains NaN or inf"
EMPTY = r"batch size B >= 1"
HALF = r"float32 and float64 only"

# --- the table ------------------------------------------------------------------------------
CASES = [
    # W: float16 inputs gave gradients off by 10³ and NaN from the SDE sampler: refused.
    (
        "adjoint-float16",
        "W",
        lambda: sk.loss_grad(mixture(), LOSS, x(dtype=torch.float16), ts(), method="adjoint"),
        TypeError,
        HALF,
    ),
    (
        "adjointdeis-float16",
        "W",
        lambda: sk.adjointdeis_grad(mixture(), LOSS, x(dtype=torch.float16), ts()),
        TypeError,
        HALF,
    ),
    (
        "adjointdeis-2-float16",
        "W",
        lambda: sk.loss_grad(mixture(), LOSS, x(dtype=torch.float16), ts(), method="adjointdeis-2"),
        TypeError,
        HALF,
    ),
    (
        "sde_sample-float16",
        "W",
        lambda: sk.sde_sample(mixture(), x(dtype=torch.float16), ts()),
        TypeError,
        HALF,
    ),
    (
        "solve-bfloat16",
        "W",
        lambda: sk.solve(mixture(), x(dtype=torch.bfloat16), ts()),
        TypeError,
        HALF,
    ),
    # W: NaN in x passed through.
    ("solve-nan-x", "W", lambda: sk.solve(mixture(), x(fill=NAN), ts()), ValueError, NAN_X),
    (
        "estimate_x0-nan-x",
        "W",
        lambda: sk.estimate_x0(mixture(), x(fill=NAN), 0.5),
        ValueError,
        "x_t contains NaN",
    ),
    (
        "sde_sample-nan-x",
        "W",
        lambda: sk.sde_sample(mixture(), x(fill=NAN), ts()),
        ValueError,
        NAN_X,
    ),
    (
        "invert-nan-x",
        "W",
        lambda: sk.invert(mixture(), x(fill=NAN), ts()),
        ValueError,
        "x0 contains NaN",
    ),
    (
        "encode-nan-x",
        "W",
        lambda: sk.encode(mixture(), x(fill=math.inf), ts()),
        ValueError,
        "x0 contains NaN or inf",
    ),
    (
        "guided_sample-none-nan-x",
        "W",
        lambda: sk.guided_sample(
            mixture(), None, x(fill=NAN), steps=4, guidance="none", progress=False
        ),
        ValueError,
        "x_T contains NaN",
    ),
    (
        "loss_grad-nan-x",
        "W",
        lambda: sk.loss_grad(mixture(), LOSS, x(fill=NAN), ts()),
        ValueError,
        NAN_X,
    ),
    (
        "adjointdeis-nan-x",
        "W",
        lambda: sk.adjointdeis_grad(mixture(), LOSS, x(fill=NAN), ts()),
        ValueError,
        NAN_X,
    ),
    (
        "finite_difference-nan-x",
        "W",
        lambda: sk.finite_difference(mixture(), LOSS, x(fill=NAN), ts(), x()),
        ValueError,
        NAN_X,
    ),
    (
        "misalignment-nan-x",
        "W",
        lambda: sk.lab.misalignment(mixture(), x(fill=NAN), steps=10),
        ValueError,
        "x_T contains NaN",
    ),
    (
        "loss_grad-nan-cond",
        "W",
        lambda: sk.loss_grad(
            mixture(), LOSS, x(), ts(), cond=torch.tensor([0.0, NAN, 1.0], dtype=torch.float64)
        ),
        ValueError,
        "cond contains NaN",
    ),
    # W: times outside [0, 1].
    ("eps-t=5", "W", lambda: mixture().eps(x(), 5.0), ValueError, r"t must lie in \[0, 1\]"),
    ("eps-t=-3", "W", lambda: mixture().eps(x(), -3.0), ValueError, r"t must lie in \[0, 1\]"),
    ("eps-t=nan", "W", lambda: mixture().eps(x(), NAN), ValueError, r"t must lie in \[0, 1\]"),
    ("unet-eps-t=5", "W", lambda: digits().eps(xd(), 5.0), ValueError, r"t must lie in \[0, 1\]"),
    (
        "misalignment-times=1.5",
        "W",
        lambda: sk.lab.misalignment(mixture(), x(), times=(1.5,), steps=10),
        ValueError,
        r"times must lie in \(0, 1\]",
    ),
    (
        "misalignment-times=nan",
        "W",
        lambda: sk.lab.misalignment(mixture(), x(), times=(NAN,), steps=10),
        ValueError,
        r"times must lie in \(0, 1\]",
    ),
    (
        "misalignment-ns=0",
        "W",
        lambda: sk.lab.misalignment(mixture(), x(), ns=(0,), steps=10),
        ValueError,
        "ns entries must be an integer >= 1",
    ),
    # W: a guidance window that holds no step returned the unguided sample.
    (
        "guided_sample-steps=1",
        "W",
        lambda: sk.guided_sample(mixture(), LOSS, x(), steps=1, progress=False),
        ValueError,
        "window .* holds no step",
    ),
    (
        "guided_sample-empty-window",
        "W",
        lambda: sk.guided_sample(mixture(), LOSS, x(), steps=4, window=(0.1, 0.2), progress=False),
        ValueError,
        "window .* holds no step",
    ),
    (
        "guided_sample-scale=nan",
        "W",
        lambda: sk.guided_sample(mixture(), LOSS, x(), steps=4, scale=NAN, progress=False),
        ValueError,
        "scale must be a finite number >= 0",
    ),
    # W: evaluate_guidance.
    (
        "evaluate_guidance-ns=0",
        "W",
        lambda: sk.lab.evaluate_guidance(digits(), classifier(), ns=(0,)),
        ValueError,
        "ns entries must be an integer >= 1",
    ),
    (
        "evaluate_guidance-bogus-method",
        "B",
        lambda: sk.lab.evaluate_guidance(digits(), classifier(), methods=("bogus",)),
        ValueError,
        "methods entries must be one of 'none', 'freedom'",
    ),
    # W: finite_difference with integer x.
    (
        "finite_difference-int-x",
        "W",
        lambda: sk.finite_difference(
            mixture(), LOSS, torch.ones(2, 1, 2, 2, dtype=torch.long), ts(), x()
        ),
        TypeError,
        "x must be a floating tensor",
    ),
    # W: NaN weights and scales.
    (
        "mixture-nan-weights",
        "W",
        lambda: sk.GaussianMixture(
            mixture().means.data, 0.3, sk.VPSchedule.linear(), weights=[0.5, NAN, 0.2]
        ),
        ValueError,
        "weights contains NaN",
    ),
    (
        "mixture-nan-means",
        "W",
        lambda: sk.GaussianMixture(x(fill=NAN), 0.3, sk.VPSchedule.linear()),
        ValueError,
        "means contains NaN",
    ),
    (
        "sample_digits-scale=nan",
        "W",
        lambda: sk.digits.sample_digits(digits(), [3], scale=NAN, steps=2),
        ValueError,
        "scale must be a finite number >= 0",
    ),
    (
        "cfg-scale=nan",
        "W",
        lambda: sk.ClassifierFreeGuidance(digits(), digits().null_cond, NAN),
        ValueError,
        "scale must be a finite number >= 0",
    ),
    (
        "cfg-scale=inf",
        "W",
        lambda: sk.ClassifierFreeGuidance(digits(), digits().null_cond, math.inf),
        ValueError,
        "scale must be a finite number >= 0",
    ),
    # W: a user tableau silently replaced the built-in DDIM (refused since the registry).
    (
        "register_solver-duplicate",
        "W",
        lambda: sk.register_solver(sk.Tableau("ddim", a=((),), b=(1.0,), c=(0.0,), order=1)),
        ValueError,
        "already registered; pass replace=True",
    ),
    # W: training with non-positive steps, and into the shipped weights.
    (
        "train-cli-steps=-1",
        "W",
        lambda: _exits(train_cli(["digits-classifier", "--steps", "-1", "--out", "/tmp/x"]), 2),
        SystemExit,
        "exit 2",
    ),
    (
        "train_classifier-steps=-1",
        "W",
        lambda: train_classifier("/tmp/never", steps=-1),
        ValueError,
        "steps must be an integer >= 1",
    ),
    (
        "train-into-shipped",
        "W",
        lambda: train_classifier(DATA_DIR, steps=1),
        ValueError,
        "would overwrite the shipped weights",
    ),
    # W: bench --repeats 0 gave time inf.
    (
        "bench-cli-repeats=0",
        "W",
        lambda: _exits(cli(["bench", "--repeats", "0"]), 2),
        SystemExit,
        "exit 2",
    ),
    (
        "run_benchmark-repeats=0",
        "W",
        lambda: run_benchmark(model="mixture", repeats=0),
        ValueError,
        "repeats must be an integer >= 1",
    ),
    # H: evaluate_morphs with all labels equal looped forever.
    (
        "evaluate_morphs-one-label",
        "H",
        lambda: sk.evaluate_morphs(digits(), classifier(), xd(4), torch.full((4,), 3)),
        ValueError,
        "at least two different classes",
    ),
    # B: empty batch, everywhere.
    ("solve-B=0", "B", lambda: sk.solve(mixture(), x(0), ts()), ValueError, EMPTY),
    ("estimate_x0-B=0", "B", lambda: sk.estimate_x0(mixture(), x(0), 0.5), ValueError, EMPTY),
    ("loss_grad-B=0", "B", lambda: sk.loss_grad(mixture(), LOSS, x(0), ts()), ValueError, EMPTY),
    (
        "adjointdeis-B=0",
        "B",
        lambda: sk.adjointdeis_grad(mixture(), LOSS, x(0), ts()),
        ValueError,
        EMPTY,
    ),
    (
        "finite_difference-B=0",
        "B",
        lambda: sk.finite_difference(mixture(), LOSS, x(0), ts(), x(0)),
        ValueError,
        EMPTY,
    ),
    ("sde_sample-B=0", "B", lambda: sk.sde_sample(mixture(), x(0), ts()), ValueError, EMPTY),
    ("invert-B=0", "B", lambda: sk.invert(mixture(), x(0), ts()), ValueError, EMPTY),
    ("encode-B=0", "B", lambda: sk.encode(mixture(), x(0), ts()), ValueError, EMPTY),
    (
        "guided_sample-B=0",
        "B",
        lambda: sk.guided_sample(mixture(), LOSS, x(0), steps=4, progress=False),
        ValueError,
        EMPTY,
    ),
    (
        "misalignment-B=0",
        "B",
        lambda: sk.lab.misalignment(mixture(), x(0), steps=10),
        ValueError,
        EMPTY,
    ),
    (
        "sample_digits-B=0",
        "B",
        lambda: sk.digits.sample_digits(digits(), [], steps=2),
        ValueError,
        "at least one digit",
    ),
    # B: cond of the wrong shape, integer labels as cond.
    (
        "unet-cond-wrong-width",
        "B",
        lambda: sk.solve(digits(), xd(), ts(), cond=torch.zeros(2, 7)),
        ValueError,
        r"cond must have shape \(B, 128\)",
    ),
    (
        "unet-cond-wrong-batch",
        "B",
        lambda: sk.solve(digits(), xd(), ts(), cond=digits().cond_for([1, 2, 3])),
        ValueError,
        "cond must have batch size 1 or 2",
    ),
    (
        "unet-int-labels-as-cond",
        "B",
        lambda: sk.solve(digits(), xd(), ts(), cond=torch.tensor([3, 7])),
        TypeError,
        "cond must be a floating tensor .*cond_for",
    ),
    (
        "guided_sample-int-labels-as-cond",
        "B",
        lambda: sk.guided_sample(
            digits(),
            None,
            xd(),
            steps=2,
            guidance="none",
            cond=torch.tensor([3, 7]),
            progress=False,
        ),
        TypeError,
        "cond_for",
    ),
    (
        "mixture-cond-wrong-shape",
        "B",
        lambda: mixture().eps(x(), 0.5, torch.zeros(5, dtype=torch.float64)),
        ValueError,
        r"\(K,\)|\(3,\) or \(B, 3\) logits",
    ),
    (
        "cfg-int-null-cond",
        "B",
        lambda: sk.ClassifierFreeGuidance(digits(), torch.tensor([10]), 2.0),
        TypeError,
        "null_cond must be a floating tensor",
    ),
    # B: a model without .schedule.
    (
        "solve-no-schedule",
        "B",
        lambda: sk.solve(NoSchedule(), x(), ts()),
        TypeError,
        r"model must be a model of the protocol .*no \.schedule",
    ),
    (
        "loss_grad-no-schedule",
        "B",
        lambda: sk.loss_grad(NoSchedule(), LOSS, x(), ts()),
        TypeError,
        "no .schedule",
    ),
    (
        "guided_sample-no-schedule",
        "B",
        lambda: sk.guided_sample(NoSchedule(), LOSS, x(), progress=False),
        TypeError,
        "no .schedule",
    ),
    # B: x in another dtype than the model.
    (
        "unet-x-float64-model-float32",
        "B",
        lambda: sk.solve(digits(), xd(dtype=torch.float64), ts()),
        TypeError,
        "x is torch.float64 but the model is torch.float32",
    ),
    (
        "unet-x-float32-model-float64",
        "B",
        lambda: sk.loss_grad(digits64(), lambda y: y.sum(), xd(), ts()),
        TypeError,
        "x is torch.float32 but the model is torch.float64",
    ),
    # B: target_class with a label the classifier does not have.
    (
        "target_class-label=10",
        "B",
        lambda: sk.losses.target_class(classifier(), 10),
        ValueError,
        r"label must lie in 0\.\.9",
    ),
    (
        "target_class-label=-1",
        "B",
        lambda: sk.losses.target_class(classifier(), -1),
        ValueError,
        r"label must lie in 0\.\.9",
    ),
    (
        "target_class-labels-tensor",
        "B",
        lambda: sk.losses.target_class(classifier(), torch.tensor([1, 12])),
        ValueError,
        r"label must lie in 0\.\.9",
    ),
    # B: a loss with no gradient path.
    (
        "loss_grad-detached-loss",
        "B",
        lambda: sk.loss_grad(mixture(), detached_loss, x(), ts()),
        ValueError,
        "no gradient path",
    ),
    (
        "loss_grad-adjoint-detached-loss",
        "B",
        lambda: sk.loss_grad(mixture(), detached_loss, x(), ts(), method="adjoint"),
        ValueError,
        "no gradient path",
    ),
    (
        "guided_sample-detached-loss",
        "B",
        lambda: sk.guided_sample(
            mixture(), detached_loss, x(), steps=4, window=(0, 1), progress=False
        ),
        ValueError,
        "no gradient path",
    ),
    # NaN in an engine's gradient names the engine and the input, not loss_fn.
    (
        "engine-nan-gradient",
        "W",
        lambda: sk.loss_grad(NaNBackward(), LOSS, x(), ts()),
        ValueError,
        "method 'symplectic' returned a non-finite gradient with respect to x",
    ),
    (
        "backprop-nan-gradient",
        "W",
        lambda: sk.loss_grad(NaNBackward(), LOSS, x(), ts(), method="backprop"),
        ValueError,
        "method 'backprop' returned a non-finite gradient with respect to x",
    ),
    # the rest of the argument kinds: counts, grids, names, devices
    (
        "time_grid-n=0",
        "G",
        lambda: sk.time_grid(mixture().schedule, 1.0, 0.0, 0),
        ValueError,
        "n must be an integer >= 1",
    ),
    (
        "time_grid-spacing",
        "G",
        lambda: sk.time_grid(mixture().schedule, 1.0, 0.1, 4, spacing="log"),
        ValueError,
        "spacing must be one of 'time', 'lambda'",
    ),
    (
        "solve-increasing-grid",
        "G",
        lambda: sk.solve(mixture(), x(), [0.1, 0.5]),
        ValueError,
        "ts must be strictly decreasing",
    ),
    (
        "solve-grid-nan",
        "G",
        lambda: sk.solve(mixture(), x(), [NAN, 0.5]),
        ValueError,
        "ts must be strictly decreasing|ts\\[0\\] must lie",
    ),
    (
        "invert-iters=-1",
        "G",
        lambda: sk.invert(mixture(), x(), ts(), fixed_point_iters=-1),
        ValueError,
        "fixed_point_iters must be an integer >= 0",
    ),
    (
        "solve-unknown-solver",
        "G",
        lambda: sk.solve(mixture(), x(), ts(), solver="euler"),
        ValueError,
        "unknown solver 'euler'; known: ddim",
    ),
    (
        "solve-x-list",
        "B",
        lambda: sk.solve(mixture(), [[1.0]], ts()),
        TypeError,
        "x must be a torch.Tensor",
    ),
    (
        "resolve_device-bogus",
        "B",
        lambda: resolve_device("gpu0"),
        ValueError,
        "device must be 'auto', 'cpu', 'cuda'",
    ),
]


def _exits(code, expected):
    """Rows for command lines: raise SystemExit('exit N') so the table can match it."""
    raise SystemExit(f"exit {code}" if code == expected else f"unexpected exit {code}")


def test_the_table_covers_every_class():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert {c[1] for c in CASES} == {"W", "H", "B", "G"}


# --- the new surfaces: schedulers, presets, the configuration, values going non-finite, the
# CLIP losses, the Stable Diffusion pipeline, `sagkit sample`, evaluation sweeps (their rows
# live beside their fixtures in tests/bad_inputs/; "before" is the code the issue was filed
# against) -----------------------------------------------------------------------------------
NEW_SURFACES = [*bad_guidance.ROWS, *bad_sd.ROWS, *bad_sweeps.ROWS]
ROWS = [*CASES, *NEW_SURFACES]


@pytest.mark.parametrize(
    "call, exception, message", [c[2:] for c in ROWS], ids=[c[0] for c in ROWS]
)
def test_bad_input_gets_a_clear_error(call, exception, message):
    """Every row of both tables: the clear error it now gets."""
    with pytest.raises(exception, match=message):
        call()


def test_the_new_surfaces_table():
    """At least 50 cases, each once (in both tables); before: W silently wrong, B obscure, G
    clear; after: every row is a clear error (test_bad_input_gets_a_clear_error)."""
    assert len(NEW_SURFACES) >= 50
    assert len({c[0] for c in ROWS}) == len(ROWS)
    before = {cls: sum(c[1] == cls for c in NEW_SURFACES) for cls in "WBG"}
    assert sum(before.values()) == len(NEW_SURFACES) and before["W"] and before["B"]


# --- the cases whose answer is a correct result, not an error ------------------------------
def test_digits_model_without_cond_uses_its_null_cond():
    """Was B: diffusers' "class_labels should be provided"."""
    model = digits()
    noise = xd(2)
    grid = sk.time_grid(model.schedule, 1.0, model.schedule.t_min, 3)
    plain = sk.solve(model, noise, grid)
    null = sk.solve(model, noise, grid, cond=model.null_cond.expand(2, -1))
    assert plain.shape == noise.shape and torch.equal(plain, null)


@pytest.mark.parametrize("module, call", [("solvers", "solve"), ("sde", "sde_sample")])
def test_long_runs_show_progress(monkeypatch, module, call):
    """Was H (no sign of life at n = 10⁶): from PROGRESS_STEPS steps the bar is on by default.

    The bar's ``disable`` flag is read from a stand-in tqdm that stops the run at once."""
    import importlib

    mod = importlib.import_module(f"sagkit.core.{module}")
    seen = []

    class Stop(Exception):
        pass

    def fake_tqdm(iterable, *, disable=False, **kwargs):
        seen.append(not disable)
        raise Stop

    monkeypatch.setattr(mod, "tqdm", fake_tqdm)
    fn = getattr(sk, call)
    for n, shown in ((4, False), (PROGRESS_STEPS, True)):
        grid = torch.linspace(0.9, 0.0 if call == "solve" else 0.01, n + 1, dtype=torch.float64)
        with pytest.raises(Stop):
            fn(mixture(), x(), grid)
        assert seen[-1] is shown
    with pytest.raises(Stop):
        fn(mixture(), x(), torch.linspace(0.9, 0.01, 5, dtype=torch.float64), progress=True)
    assert seen[-1] is True


def test_evaluate_guidance_shows_progress(monkeypatch):
    from sagkit.lab import evaluation

    seen = []

    class Stop(Exception):
        pass

    def fake_tqdm(*args, disable=False, total=None, **kwargs):
        seen.append((not disable, total))
        raise Stop

    monkeypatch.setattr(evaluation, "tqdm", fake_tqdm)
    with pytest.raises(Stop):
        sk.lab.evaluate_guidance(
            digits(), classifier(), methods=("none", "sag"), ns=(1, 2), progress=True
        )
    assert seen == [(True, 4 * 3)]  # 4 tasks × (none, sag n=1, sag n=2) × 1 shard of 64
