"""Opening a run: the processes, the seeds, the run directory (its lock, the checkpoint to resume
from), the optimizer, the run store and MLflow.

Each is one function the trainer calls while it is built (:class:`~mtrl_local.train.trainer.
Trainer`); none of them knows about the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.errors import UserError
from mtrl_local.run_dir import RunDir
from mtrl_local.store import RunStore
from mtrl_local.tracking import MlflowTracker
from mtrl_local.train import distributed as dd
from mtrl_local.train.checkpoint import Checkpoint, newest_complete_checkpoint
from mtrl_local.train.run_lock import RunLock

logger = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_processes(cfg: MultiTurnRLConfig, *, agent: bool) -> dd.DistInfo:
    """This process's place under ``accelerate launch`` (one process otherwise), checked
    against what the config asks for."""
    if agent and cfg.dynamic_sampling:
        raise UserError(
            "config: dynamic_sampling samples more cases with the task's own environment; "
            "train --agent-cmd cannot (set dynamic_sampling=false)"
        )
    info = dd.setup(cpu=not torch.cuda.is_available())
    if not info.active:
        if cfg.fsdp:
            raise UserError(
                "config: fsdp shards the model over several processes; start with `accelerate "
                "launch --multi_gpu --num_processes N -m mtrl_local.cli train …` (N ≥ 2) or set "
                "fsdp=false"
            )
        return info
    if agent:
        raise UserError("train --agent-cmd runs in one process; start it without accelerate")
    if cfg.async_config.max_steps_off_policy > 0:
        raise UserError(
            "config: async_config.max_steps_off_policy > 0 needs one process (each process "
            "would drop stale batches on its own and the optimizer steps would fall out of "
            "step); set it to 0 under accelerate launch"
        )
    if cfg.dynamic_sampling:
        raise UserError(
            "config: dynamic_sampling needs one process (each process would refill its share "
            "on its own and their case orders would fall apart); set it to false under "
            "accelerate launch"
        )
    if cfg.prompts_per_step % info.world:
        raise UserError(
            f"config: {cfg.prompts_per_step} prompts per step "
            "(per_device_train_batch_size / num_generations) do not split evenly over "
            f"{info.world} processes"
        )
    return info


def lock_run_dir(dist: dd.DistInfo, run: RunDir) -> RunLock | None:
    """Process 0 takes the run directory's lock (the others never write); every process raises
    the same :class:`UserError` when another run holds it."""
    lock, refusal = None, None
    if dist.main:
        try:
            lock = RunLock.acquire(run.path)
        except UserError as exc:
            refusal = str(exc)
    refusal = dd.broadcast(dist, refusal)
    if refusal is not None:
        raise UserError(refusal)
    return lock


def claim_run_dir(dist: dd.DistInfo, run: RunDir, *, resume: bool) -> Checkpoint | None:
    """Refuse to start over an existing run; on resume, the newest complete checkpoint, read
    in full (before the model is loaded: a run that cannot resume says so at once)."""
    exists = run.has_run()
    dd.barrier(dist)  # all have looked before process 0 creates it
    if not resume and exists:
        raise UserError(f"{run.path}: a run exists there; use --resume to continue it")
    if not resume:
        return None
    checkpoint = newest_complete_checkpoint(run.checkpoints)
    if checkpoint is None:
        logger.info("%s: no checkpoint yet; the run starts again from step 0", run.path)
    return checkpoint


def build_optimizer(
    cfg: MultiTurnRLConfig, params: list[torch.nn.Parameter]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up over ``warmup_steps``, then a constant learning rate."""
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler


def machine_record() -> dict[str, Any]:
    """What a run's floating-point results depend on besides the seed: the CPU (kernels differ
    between instruction sets), the thread count (reduction order) and the library versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def open_records(
    cfg: MultiTurnRLConfig, run: RunDir, task_name: str, *, resume: bool, main: bool
) -> tuple[RunStore | None, MlflowTracker]:
    """The run store (process 0 only) and the MLflow tracker, with the config recorded."""
    config = cfg.to_dict()
    store = None
    if main:
        if resume:
            store = RunStore.open(run.path)
            store.record_config(config, "resume")
        else:
            run.path.mkdir(parents=True, exist_ok=True)
            store = RunStore.create(run.path, run.name, task_name, config)
        run.config.write_text(json.dumps(config, indent=2) + "\n")
        logger.info("resolved config: %s", json.dumps(config, sort_keys=True))
        logger.info("machine: %s", json.dumps(machine_record(), sort_keys=True))
    tracker = MlflowTracker(
        run.path,
        tracking_uri=cfg.tracking_uri,
        run_name=run.name,
        resume=resume,
        enabled=cfg.mlflow and main,
    )
    tracker.log_params(config)
    tracker.log_artifact(run.config)
    return store, tracker
