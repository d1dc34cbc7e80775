"""Several processes on one machine (``accelerate launch``): who is who, and what they share.

The trainer runs data-parallel: every process holds the whole model, samples the episodes of its
share of each step's training cases, and takes part in the one optimizer step, whose gradients
are summed across processes (:mod:`mtrl_local.train.update`). Process 0 is the only one that
writes: the run store, MLflow, checkpoints, evaluations, the exported model. The others send it
their trajectories each step.

Sampling does not depend on which process runs an episode: environments are seeded per step and
every episode's sampler noise comes from its own seed (``row_seed``), so N processes produce the
episodes one process would (up to float rounding of batched forward passes), and the update
equals the single-process one on the same batch (a test checks it with two CPU processes).

``accelerate launch`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; :func:`setup` starts
``torch.distributed`` through Accelerate (gloo on CPU, NCCL on CUDA) when they ask for more than
one process. FSDP is not done: the models this trainer runs fit one device (see README).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world`` (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes (the store, MLflow, checkpoints, reports)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def requested_world() -> int:
    """Processes asked for by the launcher (``WORLD_SIZE``; 1 without one)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def setup(cpu: bool) -> DistInfo:
    """Start ``torch.distributed`` when launched with several processes; this process's place."""
    if requested_world() <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=cpu)  # reads the launcher's env, picks gloo (CPU) or NCCL (CUDA)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def device_for(info: DistInfo) -> torch.device:
    """CUDA device ``LOCAL_RANK`` under several processes, ``cuda``/``cpu`` otherwise."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if info.active:
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cuda")


def broadcast(info: DistInfo, value: T) -> T:
    """Process 0's ``value`` on every process."""
    if not info.active:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(info: DistInfo, value: T) -> list[T]:
    """Every process's ``value``, in rank order, on every process."""
    if not info.active:
        return [value]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, value)
    return out


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def shard(info: DistInfo, items: list[T]) -> list[T]:
    """This process's share of ``items`` (every ``world``-th, from ``rank``)."""
    return items[info.rank :: info.world] if info.active else items


__all__ = [
    "DistInfo",
    "barrier",
    "broadcast",
    "device_for",
    "gather",
    "requested_world",
    "setup",
    "shard",
]
