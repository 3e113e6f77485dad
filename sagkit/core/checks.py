"""Argument checks at the public boundary, one function per kind of input.

Every public function of sagkit checks its arguments here before it computes anything, so
that a bad input gives a ``ValueError`` (a bad value) or a ``TypeError`` (a bad kind) that
names the argument and the accepted values, instead of silently wrong output or a traceback
from inside torch or diffusers. Each kind of check lives once:

    check_model(model)                       .schedule and .eps (the model protocol)
    check_tensor(x, "x")                     a finite float32/float64 tensor with a batch B ≥ 1
    check_matches(x, reference, "x")         x in the reference tensor's dtype and device
    check_cond(cond, "cond", batch=B)        a finite floating tensor, batch size 1 or B
    check_time(t, "t")                       times in (0, 1] (or [0, 1])
    check_grid(ts)                           a strictly decreasing grid of times
    check_count(n, "n")                      an integer ≥ 1 (or ≥ low)
    check_scale(w, "scale")                  a finite number ≥ 0
    check_finite(value, "weights")           no NaN or inf
    check_name(name, "spacing", choices)     one of the accepted names
    check_inputs(model, x, cond=cond)        the model, x and cond of a sampler or engine
    check_gradients(grads, names, method=m)  the gradients an engine returns are finite
    check_folder(path, "out_dir")            a folder that can be written to (created)

A check of a tensor's values (finite, in range) reads the tensor on the host: on a GPU that is a
host–device synchronisation. Inside :func:`deferred_checks` such a check records its verdict on
the device instead (:func:`require`), and the block ends with one synchronisation that raises
the first failure: the guided sampler's loop runs that way, with no synchronisation per step,
each step's checks :func:`labelled` with the step and its time.

float16 and bfloat16 are refused: the gradient engines lose all accuracy in half precision
(relative errors of 10³ and more were measured), so sagkit works in float32 and float64.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "check_model",
    "check_tensor",
    "check_matches",
    "check_cond",
    "check_time",
    "check_grid",
    "check_count",
    "check_scale",
    "check_finite",
    "check_name",
    "check_inputs",
    "check_gradients",
    "check_folder",
    "PROGRESS_STEPS",
    "show_progress",
    "require",
    "deferred_checks",
    "labelled",
]

PROGRESS_STEPS = 1000
"""From this many steps on, the samplers show a progress bar unless told otherwise."""

SUPPORTED_DTYPES = (torch.float32, torch.float64)
"""The dtypes sagkit computes in; half precision is refused with a message."""


_PENDING: ContextVar[list | None] = ContextVar("sagkit_pending_checks", default=None)
_LABEL: ContextVar[str | None] = ContextVar("sagkit_check_label", default=None)


def require(ok: torch.Tensor, message: Callable[[], str]) -> None:
    """Raise ``ValueError(message())`` unless the boolean 0-dim tensor ``ok`` is true.

    Inside :func:`deferred_checks` the verdict is only recorded (no host–device sync) and the
    error, if any, is raised when the block ends; ``message`` is then called after the fact,
    so it must not depend on values that change in between.
    """
    label = _LABEL.get()
    if label is not None:
        message = functools.partial(_labelled_message, label, message)
    pending = _PENDING.get()
    if pending is not None:
        pending.append((ok.detach().reshape(()), message))
    elif not bool(ok):
        raise ValueError(message())


def _labelled_message(label: str, message: Callable[[], str]) -> str:
    return f"{label}: {message()}"


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Prefix the message of every :func:`require` made inside the block with ``label`` (where
    in a run the check was made, e.g. "step 12 of 50 (t = 0.76)"); the innermost label wins."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """Defer the value checks of :func:`require` to the end of the block: one sync in all.

    The first failed check (in order) raises its ``ValueError`` when the block exits normally.
    Nested blocks join the outer one.
    """
    if _PENDING.get() is not None:  # already deferring: the outer block checks
        yield
        return
    pending: list = []
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)
    if pending:
        verdicts = torch.stack([ok.to("cpu", non_blocking=False) for ok, _ in pending])
        failed = (~verdicts).nonzero()
        if failed.numel():
            raise ValueError(pending[int(failed[0])][1]())


def check_model(model, name: str = "model") -> None:
    """Raise ``TypeError`` unless ``model`` follows the protocol: ``.schedule`` and ``.eps``."""
    missing = [a for a in ("schedule", "eps") if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"{name} must be a model of the protocol (with .schedule, a VPSchedule or FlowSchedule, and "
            f".eps(x, t, cond)); {type(model).__name__} has no {', '.join('.' + m for m in missing)}"
        )


def _dtype_check(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating tensor (float32 or float64), got {x.dtype}"
            + (" (for class labels use model.cond_for(labels))" if name.startswith("cond") else "")
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} is {x.dtype}; sagkit supports float32 and float64 only (half precision "
            "makes the gradients and the SDE sampler wrong): convert with .float()"
        )


def check_finite(value, name: str) -> None:
    """Raise ``ValueError`` if ``value`` (a number or a tensor) holds NaN or inf."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.numel():
            finite = torch.isfinite(value.detach())
            require(
                finite.all(),
                lambda: (
                    f"{name} contains NaN or inf ({int((~finite).sum())} of {value.numel()} entries)"
                ),
            )
    elif isinstance(value, numbers.Real) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def check_tensor(x, name: str = "x") -> torch.Tensor:
    """A finite float32/float64 tensor of shape (B, ...) with B ≥ 1; returns it unchanged."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    _dtype_check(x, name)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape (B, ...) with a batch size B >= 1, got {tuple(x.shape)}"
        )
    check_finite(x, name)
    return x


def check_matches(x: torch.Tensor, reference: torch.Tensor, name: str = "x") -> None:
    """Raise ``TypeError``/``ValueError`` unless ``x`` has ``reference``'s dtype and device."""
    if x.dtype != reference.dtype:
        raise TypeError(
            f"{name} is {x.dtype} but the model is {reference.dtype}: convert one of them "
            f"(e.g. {name}.to(model.dtype))"
        )
    if x.device != reference.device:
        raise ValueError(
            f"{name} is on {x.device} but the model is on {reference.device}: move one of them"
        )


def check_cond(cond, name: str = "cond", *, batch: int | None = None) -> torch.Tensor:
    """A finite floating tensor; with ``batch``, of shape (1, ...) or (batch, ...)."""
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cond).__name__}")
    _dtype_check(cond, name)
    if cond.ndim < 1:
        raise ValueError(f"{name} must have at least one axis, got a 0-dim tensor")
    if batch is not None and cond.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must have batch size 1 or {batch} (x's), got shape {tuple(cond.shape)}"
        )
    check_finite(cond, name)
    return cond


def check_time(t, name: str = "t", *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless every entry of ``t`` lies in (0, 1] (or [0, 1])."""
    if isinstance(t, float | int) and not isinstance(t, bool):  # the common case, no tensor
        if (0 <= t if allow_zero else 0 < t) and t <= 1:
            return
    try:
        tt = torch.as_tensor(t, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a time or times in [0, 1], got {t!r}") from None
    low_ok = (tt >= 0) if allow_zero else (tt > 0)
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    # NaN fails both comparisons
    require((low_ok & (tt <= 1)).all(), lambda: f"{name} must lie in {interval}, got {tt.tolist()}")


def check_grid(ts) -> torch.Tensor:
    """Validate a time grid: 1-D, at least 2 entries, strictly decreasing, in [0, 1], starting in (0, 1].

    Returns the grid as a float64 CPU tensor.
    """
    try:
        ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"ts must be a 1-D sequence of times, got {ts!r}") from None
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"ts must be a 1-D grid of at least 2 times, got shape {tuple(ts.shape)}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"ts must be strictly decreasing, got {ts.tolist()}")
    check_time(ts[0], "ts[0]")
    check_time(ts[-1], "ts[-1]", allow_zero=True)
    return ts


def check_count(value, name: str = "n", *, low: int = 1) -> int:
    """An integer ≥ ``low`` (a bool is not a count); returns it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_scale(value, name: str = "scale") -> float:
    """A finite real number ≥ 0; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_name(value, name: str, choices: Iterable[str]) -> str:
    """One of ``choices``; returns it."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_inputs(model, x, *, cond=None, x_name: str = "x") -> None:
    """The arguments every sampler and gradient engine takes: a model of the protocol, a state
    ``x`` (:func:`check_tensor`) and an optional ``cond`` (:func:`check_cond`; its shape is
    the model's to check)."""
    check_model(model)
    check_tensor(x, x_name)
    if cond is not None:
        check_cond(cond, "cond")


def show_progress(progress, steps: int) -> bool:
    """``progress`` as given, or, when it is ``None``, whether ``steps`` ≥ :data:`PROGRESS_STEPS`."""
    return steps >= PROGRESS_STEPS if progress is None else bool(progress)


def check_gradients(grads, names, *, method: str) -> None:
    """Raise ``ValueError`` naming the input whose gradient from engine ``method`` holds NaN or
    inf. ``grads`` is in the order of ``names`` ("params": a tuple over the parameters)."""
    for w, g in zip(names, grads, strict=True):
        for i, part in enumerate(g if isinstance(g, (tuple, list)) else [g]):
            if isinstance(part, torch.Tensor):
                which = f"parameter {i}" if w == "params" else w
                require(
                    torch.isfinite(part).all(),
                    lambda which=which: (
                        f"method {method!r} returned a non-finite gradient with respect to {which} "
                        "although the loss was finite: the backward pass overflowed (a step too "
                        "large for the dtype, or a model that is not differentiable there); try "
                        "float64, more steps or another method"
                    ),
                )


def check_folder(path, name: str) -> Path:
    """``path`` as a folder to write files to, created (with its parents) if missing; refuses a
    value that is not a path, an empty path, an existing file, and a folder that cannot be
    created or written to, naming ``name``."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name} must be a folder path (a str or path), got {path!r}")
    if not os.fspath(path).strip():  # Path("") is the current folder: never meant
        raise ValueError(f"{name} must name a folder, got an empty path {os.fspath(path)!r}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name}: {str(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"{name}: cannot create the folder {str(folder)!r} ({reason})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: the folder {str(folder)!r} is not writable")
    return folder
