"""Data-parallel sweeps under ``torchrun``: one process per rank, results gathered.

    ctx = init_distributed(device="cpu")       # torchrun's env vars, else one process
    mine = shard(list(range(64)))               # this rank's share: items[rank::world]
    everything = gather({i: f(i) for i in mine})   # every rank gets every rank's object
    close()

``init_distributed`` reads the variables ``torchrun`` (``python -m torch.distributed.run``)
sets — ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` — and joins
the default process group: NCCL when the device is CUDA (rank r on GPU ``LOCAL_RANK`` of its
machine), gloo on CPU. Without them, or with ``WORLD_SIZE=1``, it starts no process group and
everything here acts as a single process (rank 0 of 1), so the same script runs both ways.

``gather`` is ``torch.distributed.all_gather_object``: any picklable object, tensors included
(move them to the CPU first; they are pickled exactly, bit for bit). It is a collective: every
rank must call it, the same number of times, and each waits for the slowest (``timeout``).

No home-made process pool: the processes are torchrun's; this module only names their
ranks, splits work among them and gathers what they return.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["RankContext", "close", "gather", "init_distributed", "rank_and_world", "shard"]


@dataclass(frozen=True)
class RankContext:
    """This process's place in the run: ``rank`` of ``world_size``, and the device it uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes the final results."""
        return self.rank == 0


def init_distributed(
    *, device=None, backend: str | None = None, timeout: float = 4 * 3600.0
) -> RankContext:
    """Join torchrun's process group if this process is one of its ranks, else run alone.

    Args:
        device: "cpu", "cuda" or None (CUDA when available). With CUDA each rank takes GPU
            ``LOCAL_RANK`` (modulo the GPUs of its machine) and sets it as the current device.
        backend: default "nccl" for CUDA, "gloo" for the CPU.
        timeout: seconds a collective (``gather``) waits for the slowest rank before failing;
            sweeps whose ranks finish far apart need it long.
    Returns:
        The :class:`RankContext`. Calling it again returns the group already joined.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return RankContext(
            dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend()
        )
    if world == 1:
        return RankContext(0, 1, 0, device, None)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
        **({"device_id": device} if backend == "nccl" else {}),
    )
    return RankContext(rank, world, local_rank, device, backend)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence, *, rank: int | None = None, world: int | None = None) -> list:
    """This rank's share of ``items``: ``items[rank::world]`` (round robin, so the shares
    differ in length by at most one and neighbours, often alike in cost, are spread out).

    ``rank`` and ``world`` default to the current process group's (:func:`rank_and_world`).
    The shares of ranks 0 … world − 1 partition ``items``.
    """
    current = rank_and_world()
    rank = current[0] if rank is None else rank
    world = current[1] if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return list(items)[rank::world]


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def close() -> None:
    """Leave the process group (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
