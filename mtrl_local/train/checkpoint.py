"""Checkpoints that survive SIGKILL, disk trouble and crafted files.

A checkpoint ``step-NNNNNN/`` holds the weights (the LoRA adapter, or the full model), the
optimizer, the scheduler, every RNG state, the step, the policy version and the data position::

    model/                      save_pretrained (safetensors weights, JSON config)
    trainer_state.safetensors   the optimizer's tensors and the torch RNG states
    trainer_state.json          the rest of the optimizer, scheduler and RNG states, the layout
    state.json                  the train state (step, policy version, data position, …)
    manifest.json               written last: every other file's size and sha256

Nothing is pickled (:mod:`mtrl_local.train.state_codec`), so reading a checkpoint cannot run
code. A checkpoint is written into a temporary directory that is renamed when complete, and the
manifest proves it complete on resume: a file missing, cut short or changed since it was written
makes the checkpoint incomplete, and the resume falls back to the newest complete one, saying
which it skipped and why (:func:`newest_complete_checkpoint`). Everything is read and checked
before anything is loaded into the model, so a bad checkpoint leaves nothing half-restored.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtrl_local.errors import UserError
from mtrl_local.train.checkpoint_manifest import MANIFEST, check_manifest, write_manifest
from mtrl_local.train.distributed import is_sharded, load_optimizer_state
from mtrl_local.train.state_codec import decode, encode

logger = logging.getLogger(__name__)

PREFIX = "step-"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TENSORS = "trainer_state.safetensors"
DOCUMENT = "trainer_state.json"
STATE = "state.json"
#: Directories a save or a removal works in, named so that no listing takes them for checkpoints.
_WORK_PREFIXES = (".tmp-", ".del-")


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


@dataclass
class Checkpoint:
    """One checkpoint read and checked in full, not yet loaded into anything."""

    path: Path
    state: TrainState
    #: The weights file's tensors; ``adapter``: a LoRA adapter's, else the whole model's.
    weights: dict[str, torch.Tensor]
    adapter: bool
    #: ``layout``, ``optimizer``, ``scheduler`` and ``rng``, as :func:`save_checkpoint` wrote them.
    training: dict[str, Any] = field(repr=False)


class IncompleteCheckpoint(Exception):
    """A checkpoint that cannot be resumed from; the message says why."""


# -- RNG states ------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    name, key, pos, has_gauss, gauss = legacy
    return {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing ---------------------------------------------------------------------------------------
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
    written by an FSDP run, which only an FSDP run can load). The run directory's lock
    (:mod:`mtrl_local.train.run_lock`) makes this process the only writer, so any temporary
    directory found here is the leftover of a killed save and is removed."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / f"{PREFIX}{state.step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    # save_pretrained writes the adapter only for a peft model, the whole model otherwise.
    model.save_pretrained(tmp / "model", safe_serialization=True)  # type: ignore[operator]
    training = {
        "layout": "fsdp" if sharded else "plain",
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
    }
    document, tensors = encode(training)
    save_file(tensors, str(tmp / TENSORS))
    (tmp / DOCUMENT).write_text(json.dumps(document))
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=2))
    write_manifest(tmp)
    if final.exists():  # a rerun of the same step after a resume
        _discard(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        _discard(old)
    logger.info("checkpoint saved: %s", final)
    return final


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: renamed first, so a kill mid-removal leaves no
    ``step-*`` directory with some of its files."""
    doomed = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(_WORK_PREFIXES):
            logger.info("removing the leftover of an interrupted save: %s", path)
            shutil.rmtree(path, ignore_errors=True)


# -- reading ---------------------------------------------------------------------------------------
def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories in ``root``, oldest first (complete or not: see
    :func:`read_checkpoint`); leftovers of a killed save or removal are not listed."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def read_checkpoint(path: Path) -> Checkpoint:
    """Check ``path`` against its manifest and read all of it into memory;
    :class:`IncompleteCheckpoint` says what is wrong with it."""
    problem = check_manifest(path)
    if problem is not None:
        raise IncompleteCheckpoint(problem)
    try:
        state = TrainState(**json.loads((path / STATE).read_text()))
        adapter = (path / "model" / ADAPTER_WEIGHTS).is_file()
        weights = _read_weights(path / "model", adapter)
        document = json.loads((path / DOCUMENT).read_text())
        training = _training_state(decode(document, load_file(str(path / TENSORS))))
    except (OSError, ValueError, TypeError, KeyError, SafetensorError) as exc:
        raise IncompleteCheckpoint(f"unreadable: {type(exc).__name__}: {exc}") from None
    return Checkpoint(path, state, weights, adapter, training)


def _read_weights(model_dir: Path, adapter: bool) -> dict[str, torch.Tensor]:
    """The adapter's tensors, or the whole model's (one file, or the shards save_pretrained
    splits a large model into)."""
    if adapter:
        return load_file(str(model_dir / ADAPTER_WEIGHTS))
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no weights in {model_dir.name}/")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def _training_state(value: Any) -> dict[str, Any]:
    """``value`` if it has everything :func:`restore_training` reads, else ``ValueError``."""
    wanted = {"layout", "optimizer", "scheduler", "rng"}
    if not isinstance(value, dict) or not wanted <= value.keys():
        raise ValueError(f"{DOCUMENT} does not hold all of {sorted(wanted)}")
    return value


def newest_complete_checkpoint(root: Path) -> Checkpoint | None:
    """The newest checkpoint in ``root`` that is complete, read into memory; each newer one that
    is not is skipped with a warning. ``None`` when ``root`` holds no checkpoint at all;
    :class:`UserError` when it holds some and none is complete."""
    skipped: list[str] = []
    for path in reversed(list_checkpoints(root)):
        try:
            return read_checkpoint(path)
        except IncompleteCheckpoint as exc:
            logger.warning("skipping checkpoint %s: %s", path, exc)
            skipped.append(f"{path.name}: {exc}")
    if not skipped:
        return None
    raise UserError(f"{root}: no complete checkpoint to resume from ({'; '.join(skipped)})")


# -- loading ---------------------------------------------------------------------------------------
def restore_weights(checkpoint: Checkpoint, model: torch.nn.Module) -> None:
    """Load the checkpoint's weights (adapter or whole model) into an unsharded model."""
    if checkpoint.adapter:
        set_peft_model_state_dict(model, checkpoint.weights)
        return
    missing, unexpected = model.load_state_dict(checkpoint.weights, strict=False)
    # Tied embeddings are saved once; anything else missing is a real mismatch.
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise UserError(
            f"{checkpoint.path}: does not match the model "
            f"(missing {real_missing[:3]}, unexpected {unexpected[:3]})"
        )


def restore_training(
    checkpoint: Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> TrainState:
    """Load the optimizer, scheduler and RNG states (the weights are loaded first, by
    :func:`restore_weights`); returns the train state."""
    training = checkpoint.training
    wanted = "fsdp" if is_sharded(model) else "plain"
    if training["layout"] != wanted:
        raise UserError(
            f"{checkpoint.path}: written with fsdp={training['layout'] == 'fsdp'}; resume with "
            "the same fsdp setting"
        )
    load_optimizer_state(model, optimizer, training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    _set_rng_state(training["rng"])
    return checkpoint.state


__all__ = [
    "MANIFEST",
    "Checkpoint",
    "IncompleteCheckpoint",
    "TrainState",
    "list_checkpoints",
    "newest_complete_checkpoint",
    "read_checkpoint",
    "restore_training",
    "restore_weights",
    "save_checkpoint",
]
