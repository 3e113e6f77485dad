"""Where tensors go (CUDA when it is available, else the CPU, unless the caller says), and how
many CPU threads torch uses."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

__all__ = ["resolve_device", "cpu_threads", "apply_cpu_threads", "THREADS_VARIABLE"]

THREADS_VARIABLE = "SAGKIT_THREADS"


def resolve_device(device=None) -> torch.device:
    """``None`` or "auto" → CUDA when available, else CPU; a name or ``torch.device`` as given.

    Raises ``ValueError`` for a name torch does not know and for CUDA on a machine without it.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available here")
    return dev


def cpu_threads(environ: Mapping[str, str], cores: int) -> int | None:
    """The intra-op thread count sagkit gives torch on the CPU, or ``None`` to leave torch's own.

    - ``SAGKIT_THREADS=k`` in ``environ``: k (a positive integer);
    - else ``OMP_NUM_THREADS`` set: ``None`` (torch has already read it);
    - else half the ``cores`` this process may run on, at least 1.

    Why half: torch's OpenMP threads spin while they wait for each other, so when another
    CPU-bound process takes a core they spin against it. On 2 cores, beside one busy process, a
    symplectic gradient on the digits UNet took 6.1× its quiet time with torch on both cores and
    1.0× with one thread; quiet, one thread was 1.4× slower than two
    (``benchmarks/shared_machine.py``, which also times every notebook and the report, quiet
    against loaded; libgomp's passive waiting, the other remedy, was 2.3× slower quiet). On a
    many-core machine that runs one large model alone, set
    ``SAGKIT_THREADS`` (or ``OMP_NUM_THREADS``) to the core count to get the full peak back.
    """
    given = environ.get(THREADS_VARIABLE)
    if given is not None:
        if not given.strip().isdigit() or int(given) < 1:
            raise ValueError(f"{THREADS_VARIABLE} must be a positive integer, got {given!r}")
        return int(given)
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, cores // 2)


def apply_cpu_threads() -> int:
    """Set torch's intra-op threads by :func:`cpu_threads` from this process's environment and
    the cores it may run on (its CPU affinity); returns the count torch uses now. ``import
    sagkit`` calls it once; ``torch.set_num_threads`` afterwards still overrides it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = cpu_threads(os.environ, cores or 1)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
