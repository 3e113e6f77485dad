"""What a gradient computation costs: bytes saved for backward, peak memory, time, network calls.

    report = sk.lab.profile_gradient(model, loss_fn, x, ts, method="symplectic", solver="ddim")
    report.saved_bytes, report.cuda_peak_bytes, report.vmhwm_bytes, report.wall_time_s, report.model_calls

**Saved bytes** (deterministic, device independent) is the peak, over the whole computation, of
the bytes alive at once in

1. tensors that autograd saves for backward, seen through
   ``torch.autograd.graph.saved_tensors_hooks``: a storage counts once however many tensors
   (views, repeated saves of a weight) refer to it, from when it is first packed until the
   last graph node holding it is freed;
2. tensors a gradient engine keeps outside autograd: the states y_0..y_n of the symplectic
   adjoint (stored under ``no_grad``, so no hook sees them) are reported by the engine, each
   counted until the engine drops it;
3. the activations ``torch.utils.checkpoint`` recomputes in backward (it installs its own
   saved-tensor hooks, which hide them from ours): counted while the recomputed step's graph
   is being rebuilt, through the checkpoint's ``context_fn``. This relies on torch's private
   ``_top_saved_tensors_default_hooks``; where that is missing, ``complete`` is False.

Storages of the model's parameters and buffers are *not* counted: they exist whatever the
method. Backprop therefore shows n steps of activations (linear in n); the symplectic adjoint
shows n + 1 states plus one step's activations (flat in n but for the states).

**CUDA peak** is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, only when
the computation runs on CUDA (None otherwise: on a CPU build the call returns 0). **VmHWM** is
the process's resident-memory high-water mark from ``/proc/self/status``, reset first by
writing "5" to ``/proc/self/clear_refs`` (Linux; None where either is unavailable). It includes
everything the process touches, so it is noisy for small models. **Wall time** includes the
hooks' overhead when ``track_saved`` is on; time with ``track_saved=False`` for clean timings.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.frames import velocity_of
from ..gradients import memory
from ..gradients.api import loss_grad

__all__ = ["ProfileReport", "profile", "profile_gradient", "CountingModel"]


@dataclass
class ProfileReport:
    """The costs of one run (see the module docstring for exactly what is counted).

    Attributes:
        saved_bytes: peak bytes alive at once: saved for backward + held by the engine
            (+ recomputed by checkpoint); None when ``track_saved`` was off.
        graph_peak_bytes: peak of the autograd-saved part alone (recomputation included).
        held_peak_bytes: peak of the engine-held part alone (e.g. symplectic states).
        cuda_peak_bytes: CUDA peak allocation, None off CUDA.
        vmhwm_bytes: process resident high-water mark, None where unavailable.
        wall_time_s: seconds, CUDA synchronised.
        model_calls: calls of ``model.eps`` (network evaluations), None when not counted.
        complete: False when some saved bytes could not be seen (see module docstring).
        result: what the profiled function returned.
    """

    saved_bytes: int | None
    graph_peak_bytes: int | None
    held_peak_bytes: int | None
    cuda_peak_bytes: int | None
    vmhwm_bytes: int | None
    wall_time_s: float
    model_calls: int | None = None
    complete: bool = True
    result: Any = field(default=None, repr=False)


def _storage_key(tensor: torch.Tensor):
    """(identity, nbytes) of the storage behind ``tensor``; None for storage-less tensors."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    nbytes = storage.nbytes()
    if nbytes == 0:
        return None
    return (tensor.device.type, tensor.device.index, storage.data_ptr()), nbytes


class _Packed:
    """What the pack hook hands autograd: the payload, releasing its bytes when freed."""

    __slots__ = ("payload", "ledger", "key", "__weakref__")

    def __init__(self, payload, ledger, key):
        self.payload, self.ledger, self.key = payload, ledger, key

    def __del__(self):
        self.ledger.release(self.key)


class _Ledger:
    """Live bytes per storage with reference counts; peaks of the total and of each kind."""

    def __init__(self, exclude=()):
        self.exclude = set(exclude)
        self.live: dict = {}  # key -> [references, nbytes, kind]
        self.current = {"graph": 0, "held": 0}
        self.peak = {"graph": 0, "held": 0, "total": 0}
        self.complete = True

    def acquire(self, tensor: torch.Tensor, kind: str):
        found = _storage_key(tensor)
        if found is None or found[0] in self.exclude:
            return None
        key, nbytes = found
        entry = self.live.get(key)
        if entry is not None:
            entry[0] += 1
            return key
        self.live[key] = [1, nbytes, kind]
        self.current[kind] += nbytes
        self.peak[kind] = max(self.peak[kind], self.current[kind])
        self.peak["total"] = max(self.peak["total"], sum(self.current.values()))
        return key

    def release(self, key) -> None:
        entry = self.live.get(key) if key is not None else None
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.live[key]
            self.current[entry[2]] -= entry[1]

    # autograd's saved tensors
    def pack(self, tensor):
        # a detached payload: holding the tensor itself would make a reference cycle
        return _Packed(tensor.detach(), self, self.acquire(tensor, "graph"))

    @staticmethod
    def unpack(packed):
        return packed.payload

    # tensors an engine keeps itself (sagkit.gradients.memory.hold)
    def hold(self, tensor) -> None:
        key = self.acquire(tensor, "held")
        if key is not None:
            weakref.finalize(tensor, self.release, key)

    # what torch.utils.checkpoint recomputes (sagkit.gradients.memory.checkpoint_contexts)
    @contextlib.contextmanager
    def recompute_context(self):
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        hooks = top(False) if top is not None else None
        if hooks is None:  # cannot see the checkpoint's own hooks: recomputation uncounted
            self.complete = False
            yield
            return
        inner_pack, inner_unpack = hooks

        def pack(tensor):
            key = self.acquire(tensor, "graph")
            try:
                payload = inner_pack(tensor)
            except BaseException:  # the checkpoint's early stop raises here
                self.release(key)
                raise
            return _Packed(payload, self, key)

        def unpack(packed):
            return inner_unpack(packed.payload)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield


def _vmhwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _vmhwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _on_cuda(device, args, kwargs) -> bool:
    if device is not None:
        return torch.device(device).type == "cuda"
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return any(t.is_cuda for t in tensors)


def profile(
    fn: Callable,
    *args,
    device=None,
    exclude=(),
    track_saved: bool = True,
    **kwargs,
) -> ProfileReport:
    """Run ``fn(*args, **kwargs)`` once and measure it.

    Args:
        fn: any callable (typically one that computes a gradient).
        device: where it runs, for the CUDA peak; by default CUDA when a tensor argument is.
        exclude: tensors whose storages are not counted in the saved bytes (parameters).
        track_saved: install the saved-tensor hooks (turn off for clean timings).
    Returns:
        a :class:`ProfileReport` (``model_calls`` None: see :func:`profile_gradient`).

    (docs/maths.md §9.2)
    """
    cuda = _on_cuda(device, args, kwargs)
    ledger = None
    if track_saved:
        ledger = _Ledger(k[0] for k in map(_storage_key, exclude) if k is not None)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    vm_ok = _vmhwm_reset()
    with contextlib.ExitStack() as stack:
        if ledger is not None:
            stack.enter_context(memory.observe(ledger))
            stack.enter_context(
                torch.autograd.graph.saved_tensors_hooks(ledger.pack, ledger.unpack)
            )
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    return ProfileReport(
        saved_bytes=None if ledger is None else ledger.peak["total"],
        graph_peak_bytes=None if ledger is None else ledger.peak["graph"],
        held_peak_bytes=None if ledger is None else ledger.peak["held"],
        cuda_peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        vmhwm_bytes=_vmhwm_bytes() if vm_ok else None,
        wall_time_s=wall,
        complete=True if ledger is None else ledger.complete,
        result=result,
    )


class CountingModel:
    """A model of the protocol that counts its network calls (``eps``, and ``velocity`` under a
    flow schedule: :func:`~sagkit.core.frames.velocity_of`) and delegates everything else."""

    def __init__(self, model):
        self.model = model
        self.schedule = model.schedule
        self.calls = 0

    def eps(self, x, t, cond=None):
        self.calls += 1
        return self.model.eps(x, t, cond)

    def velocity(self, x, t, cond=None):
        self.calls += 1
        return velocity_of(self.model, x, t, cond)

    def __getattr__(self, name):  # parameters(), buffers(), ... of the wrapped model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


def profile_gradient(
    model,
    loss_fn: Callable,
    x: torch.Tensor,
    ts,
    *,
    track_saved: bool = True,
    **options,
) -> ProfileReport:
    """Profile ``sk.loss_grad(model, loss_fn, x, ts, **options)`` (``method``, ``solver``,
    ``cond``, ``wrt``: as :func:`sagkit.loss_grad` takes them).

    The model's parameters and buffers are excluded from the saved bytes, and its ``eps`` calls
    are counted (``model_calls``). ``result`` holds ``(loss, grad)``.
    """
    counting = CountingModel(model)
    exclude = []
    if hasattr(model, "parameters"):
        exclude = [*model.parameters(), *model.buffers()]
    report = profile(
        loss_grad,
        counting,
        loss_fn,
        x,
        ts,
        device=x.device,
        exclude=exclude,
        track_saved=track_saved,
        **options,
    )
    report.model_calls = counting.calls
    return report
