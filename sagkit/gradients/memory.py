"""Memory an engine keeps outside autograd, reported to whoever observes it.

Saved-tensor hooks see what autograd keeps for backward, but neither what an engine keeps
outside any graph (the symplectic adjoint's and AdjointDEIS's stored states) nor what
``torch.utils.checkpoint`` recomputes in backward (it installs saved-tensor hooks of its own).
Engines report those through :func:`hold` and :func:`checkpoint_contexts`; an observer (the
profiler of :mod:`sagkit.lab.profiling`) subscribes with :func:`observe`. Without an observer
both are free.

An observer has two methods: ``hold(tensor)`` (count the tensor until it is freed) and
``recompute_context()`` (a context manager active while a checkpointed step is recomputed),
and may have the saved-tensor hooks ``pack(tensor)`` / ``unpack(packed)``: inside
:func:`measure_saved`, which installs saved-tensor hooks of its own (they hide any outer ones),
every saved tensor is passed on to the observers' ``pack``.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["observe", "observers", "hold", "checkpoint_contexts", "SavedBytes", "measure_saved"]

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


class SavedBytes:
    """The result of :func:`measure_saved`: ``nbytes``, the bytes of the distinct storages saved."""

    def __init__(self):
        self.nbytes = 0


def _storage(tensor: torch.Tensor):
    """(data pointer, nbytes) of the storage behind ``tensor``; None for storage-less tensors."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (tensor.device, storage.data_ptr()), storage.nbytes()


@contextlib.contextmanager
def measure_saved(exclude=()):
    """Count the bytes autograd saves for backward inside the block, each storage once.

    Storages of the tensors in ``exclude`` (the model's parameters) are not counted. Saved
    tensors are passed on to the observers that have saved-tensor hooks, so a profiler still
    sees them. Yields a :class:`SavedBytes`, complete when the block ends.

    (docs/maths.md §9.1)
    """
    excluded = {found[0] for found in map(_storage, exclude) if found is not None}
    seen, meter = set(), SavedBytes()
    chained = [o for o in _observers if hasattr(o, "pack") and hasattr(o, "unpack")]

    def pack(tensor):
        found = _storage(tensor)
        if found is not None and found[0] not in excluded and found[0] not in seen:
            seen.add(found[0])
            meter.nbytes += found[1]
        # detached: a saved output returned as itself would hold its own graph in a cycle
        return tuple(o.pack(tensor) for o in chained) if chained else tensor.detach()

    def unpack(packed):
        return chained[0].unpack(packed[0]) if chained else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield meter
