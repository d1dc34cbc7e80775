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
one process.

With ``fsdp = true`` the trained model is sharded instead of replicated (PyTorch FSDP2,
``fully_shard``: each decoder layer one unit, embeddings/norm/head the root unit): every process
holds 1/N of the parameters, gradients and optimizer state, and a forward all-gathers one layer
at a time. Sampling needs whole weights at every step of a generation that differs between
processes (which collective-per-layer forwards cannot serve), so each process keeps a plain
inference copy for its sampler and evaluation, refreshed from the gathered weights after every
optimizer step: the training state (weights, gradients, two Adam moments: 4× the weights in
fp32) is what no longer has to fit one device, the inference copy still does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from mtrl_local.model_io import resolve_device

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
    """CUDA device ``LOCAL_RANK`` under several processes, else ``auto`` (CUDA or the CPU)."""
    if info.active and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return resolve_device("auto")


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


# -- FSDP ------------------------------------------------------------------------------------------
def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place over the process group (FSDP2): one unit per decoder layer and
    the root. Gradients are *summed* over processes, as the data-parallel path sums them: the
    loss is already normalised by the global token count (:mod:`mtrl_local.train.update`)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    units = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    for unit in [*units, model]:
        fsdp_unit = cast(FSDPModule, unit)
        fsdp_unit.set_gradient_divide_factor(1.0)
        # A plain SUM (gloo has no pre-multiplied sum; with the factor 1 nothing is scaled).
        fsdp_unit.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, on every process (a collective when ``model`` is sharded:
    every process must call it)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return cast(dict[str, torch.Tensor], state)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state to checkpoint: its own ``state_dict`` or, for a sharded model, the
    whole state keyed by parameter name on process 0 (a collective: every process calls it)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_state` (every process passes the whole saved state)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)


__all__ = [
    "DistInfo",
    "barrier",
    "broadcast",
    "device_for",
    "full_state_dict",
    "gather",
    "is_sharded",
    "load_optimizer_state",
    "optimizer_state",
    "requested_world",
    "setup",
    "shard",
    "shard_model",
]
