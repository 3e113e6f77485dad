"""Memory an engine keeps outside autograd, reported to whoever observes it.

Saved-tensor hooks see what autograd keeps for backward, but neither what an engine keeps
outside any graph (the symplectic adjoint's and AdjointDEIS's stored states) nor what
``torch.utils.checkpoint`` recomputes in backward (it installs saved-tensor hooks of its own).
Engines report those through :func:`hold` and :func:`checkpoint_contexts`; an observer (the
profiler of :mod:`sagkit.lab.profiling`) subscribes with :func:`observe`. Without an observer
both are free.

An observer has two methods: ``hold(tensor)`` (count the tensor until it is freed) and
``recompute_context()`` (a context manager active while a checkpointed step is recomputed).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["observe", "observers", "hold", "checkpoint_contexts"]

_observers: list = []


@contextlib.contextmanager
def observe(observer):
    """Report held tensors and checkpoint recomputation to ``observer`` inside the block."""
    _observers.append(observer)
    try:
        yield observer
    finally:
        _observers.remove(observer)


def observers() -> tuple:
    """The observers subscribed now, innermost last."""
    return tuple(_observers)


def hold(tensor: torch.Tensor) -> torch.Tensor:
    """Report a tensor that an engine keeps outside autograd's saved tensors; return it."""
    for observer in _observers:
        observer.hold(tensor)
    return tensor


def checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint``: lets the innermost observer see the
    recomputation."""
    recompute = _observers[-1].recompute_context() if _observers else contextlib.nullcontext()
    return contextlib.nullcontext(), recompute
