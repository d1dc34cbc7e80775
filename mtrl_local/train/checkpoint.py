"""Checkpoints that survive SIGKILL: written to a temporary directory, then renamed.

A checkpoint holds the weights (the LoRA adapter, or the full model), the optimizer, the
scheduler, every RNG state, the step, the policy version and the data position. A directory named
``step-NNNNNN`` is complete by construction: ``os.replace`` of the finished temporary directory is
atomic, so a kill at any moment leaves either the previous checkpoint or the new one, never half of
one. The newest complete checkpoint is found by listing, not through a pointer file that could
disagree with the directories.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from mtrl_local.errors import UserError
from mtrl_local.train.distributed import is_sharded, load_optimizer_state

logger = logging.getLogger(__name__)

PREFIX = "step-"


@dataclass
class TrainState:
    """Where the trainer is: restored exactly on resume."""

    step: int = 0
    policy_version: int = 0
    #: Position in the epoch's case order and which epoch (the order is reshuffled per epoch).
    data_position: int = 0
    epoch: int = 0
    dropped_stale: int = 0
    best_val: float | None = None


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer_state: dict[str, Any],
    scheduler: Any,
    keep: int = 2,
    *,
    sharded: bool = False,
) -> Path:
    """Write ``root/step-NNNNNN`` atomically; keep the newest ``keep`` of them.

    ``model`` holds the weights to save (whole, not sharded); ``optimizer_state`` is
    :func:`mtrl_local.train.distributed.optimizer_state` (``sharded``: keyed by parameter name,
    written by an FSDP run, which only an FSDP run can load)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step:06d}"
    tmp = root / f".tmp-{PREFIX}{state.step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # save_pretrained writes the adapter only for a peft model, the whole model otherwise.
    model.save_pretrained(tmp / "model", safe_serialization=True)  # type: ignore[operator]
    torch.save(
        {
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "layout": "fsdp" if sharded else "plain",
        },
        tmp / "optim.pt",
    )
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    if final.exists():  # a rerun of the same step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint saved: %s", final)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in ``root``, oldest first (leftovers of a killed save are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_train_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / "state.json").read_text()))


def restore_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the weights (adapter or whole model) of checkpoint ``path`` into an unsharded model."""
    model_dir = path / "model"
    weights = model_dir / "adapter_model.safetensors"
    if weights.exists():
        set_peft_model_state_dict(model, load_file(str(weights)))
        return
    state = load_file(str(model_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings are saved once; anything else missing is a real mismatch.
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: {real_missing[:3]}")


def restore_training(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainState:
    """Load optimizer, scheduler and RNG states from ``path`` (the weights are loaded first, by
    :func:`restore_weights`); returns the train state."""
    optim = torch.load(path / "optim.pt", weights_only=False)
    layout = optim.get("layout", "plain")
    wanted = "fsdp" if is_sharded(model) else "plain"
    if layout != wanted:
        raise UserError(
            f"{path}: written with fsdp={layout == 'fsdp'}; resume with the same fsdp setting"
        )
    load_optimizer_state(model, optimizer, optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return load_train_state(path)
