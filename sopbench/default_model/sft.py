"""The SFT phase of the default model: TRL's ``SFTTrainer(assistant_only_loss=True)``.

The demonstrations are a conversational dataset, so the loss mask comes from the chat template's
``{% generation %}`` markers exactly as it will during RL: the model is trained on its own
replies and their ``<|im_end|>``, never on the SOP, the tool schemas or the tool results.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTConfig, SFTTrainer

from sopbench.default_model.phase import PhaseResult

logger = logging.getLogger(__name__)


class _LogLoss(TrainerCallback):
    """Log the loss through ``logging`` (the library does not print)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            logger.info(
                "%s step %d/%d loss %.4f",
                self.name,
                state.global_step,
                state.max_steps,
                logs["loss"],
            )


def train_phase(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    work_dir: Path,
    per_device: int = 1,
    warmup_steps: int = 10,
    progress: bool = True,
) -> PhaseResult:
    """Train ``model`` in place for ``steps`` optimizer steps of ``SFTTrainer`` on ``rows``.

    Budgets are in steps, not minutes, so a build is reproducible on any machine; the default
    spec's step counts were sized to fit the 15-minute budget on 2 CPU cores. The schedule is
    warmup then cosine decay to 0 within the phase: the next phase starts its own warmup.
    ``per_device`` sequences go through each forward pass (``batch_size`` must be a multiple):
    1 for long trajectories, more for the short curriculum items.
    """
    if batch_size % per_device:
        raise ValueError("batch_size must be a multiple of per_device")
    args = _sft_config(
        work_dir / name,
        steps=steps,
        per_device=per_device,
        accumulation=batch_size // per_device,
        learning_rate=learning_rate,
        warmup_steps=min(warmup_steps, max(steps // 10, 1)),
        max_length=max_length,
        seed=seed,
        progress=progress,
    )
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        args=args,
        callbacks=[_LogLoss(name)],
    )
    if trainer.chat_template is not None:
        raise RuntimeError("TRL replaced the chat template: the tokenizer is not ours")
    prepared = trainer.train_dataset
    assert isinstance(prepared, Dataset)  # a map-style dataset was passed in
    n_tok = sum(len(ids) for ids in prepared["input_ids"])
    epochs = steps * batch_size / max(len(rows), 1)
    logger.info(
        "%s: %d rows, %d tokens, %d steps x batch %d (%.1f epochs)",
        name,
        len(rows),
        n_tok,
        steps,
        batch_size,
        epochs,
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    model.eval()
    return PhaseResult(
        name=name,
        steps=steps,
        rows=len(rows),
        seconds=seconds,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        losses=losses,
        train_tokens=math.ceil(n_tok * epochs),
    )


def _sft_config(
    output_dir: Path,
    *,
    steps: int,
    per_device: int,
    accumulation: int,
    learning_rate: float,
    warmup_steps: int,
    max_length: int,
    seed: int,
    progress: bool,
) -> SFTConfig:
    """The phase's ``SFTConfig``: warmup then cosine to 0, fp32 on the CPU, no checkpoints."""
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        # One sequence per forward pass: no padding, so SDPA keeps its fast maskless kernel
        # (a padded batch of mixed-length trajectories was ~5x slower per token on CPU).
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        # Activations of a 0.55M model over 4k tokens are small; recomputing them is not.
        activation_checkpointing=False,
        # TRL defaults to bf16 autocast, on CPU too: no faster at this size, and the rollout
        # engine samples in fp32, so train in fp32 (no train/inference precision mismatch).
        bf16=False,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        assistant_only_loss=True,
        max_length=max_length,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=max(1, min(25, steps // 20)),
        logging_first_step=True,
        disable_tqdm=not progress,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
    )
