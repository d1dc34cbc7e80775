"""Warm-starting a model from demonstrations: TRL's ``SFTTrainer`` on the rollout's own ids.

RL amplifies what a model already does; a model whose strict TSR is 0 gives it nothing to
amplify. :func:`run_sft` first teaches it the task's procedure and its chat format from
demonstrations (:mod:`mtrl_local.demonstrations`), then saves a plain model directory that
``mtrl eval`` and ``mtrl train`` load.

Departures from a stock ``SFTTrainer`` run, on purpose:

* **Pre-tokenized data.** Each demonstration is encoded with
  :func:`~mtrl_local.demonstrations.encode_demonstration` (the rollout engine's construction,
  through the same :class:`~mtrl_local.chat_codec.ChatCodec`), and TRL gets ``input_ids`` and
  ``assistant_masks`` columns: with ``input_ids`` present TRL skips its own chat templating and
  sets ``labels`` to -100 wherever the mask is 0. So the loss covers exactly the tokens RL will
  sample (each reply and its eos), whatever the template, including ones without
  ``{% generation %}`` markers; ``assistant_only_loss`` stays off because the mask column
  already does that job.
* **Too long is dropped, not cut.** A demonstration past ``max_length`` tokens is left out
  (counted, with a warning): a truncated one would teach the model to stop mid-procedure.
* **LoRA is merged.** With ``lora_rank > 0`` the adapter is merged into the weights before
  saving, so the output is an ordinary model directory (no adapter files).
* **fp32.** No bf16 autocast: the rollout engine samples in fp32, so training matches it.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    set_seed,
)
from trl import SFTConfig, SFTTrainer

from mtrl_local.chat_codec import ChatCodec, record_chat_format
from mtrl_local.chat_formats import CHAT_FORMAT_NAMES
from mtrl_local.demonstrations import Demonstration, encode_demonstration
from mtrl_local.errors import UserError
from mtrl_local.model_io import load_model, resolve_device

logger = logging.getLogger(__name__)

REPORT_FILE = "sft_report.json"


@dataclass(frozen=True)
class SftConfig:
    """One ``mtrl sft`` run (names as TRL's ``SFTConfig`` has them where it has one)."""

    chat_format: str = "auto"
    """How the model writes tool calls (:mod:`mtrl_local.chat_formats`); ``auto`` reads it from
    the chat template. Train and evaluate with the same one."""
    lora_rank: int = 0
    """LoRA rank; 0 = full fine-tuning. The adapter is merged into the saved weights."""
    lora_alpha: int = 32
    """LoRA alpha (scaling = alpha / rank)."""
    lora_target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: every linear layer but the output head by default (a new
    format is learned in the MLPs as much as in attention)."""
    num_train_epochs: float = 1.0
    """Passes over the demonstrations."""
    learning_rate: float = 1e-4
    """AdamW learning rate (linear decay to 0)."""
    max_length: int = 4096
    """Longest demonstration in tokens; longer ones are dropped (counted), never truncated."""
    per_device_train_batch_size: int = 1
    """Demonstrations per optimizer step (padded to the longest)."""
    seed: int = 0
    """Seeds the data order and the adapter's initialisation."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        for name, ok, rule in (
            ("chat_format", self.chat_format in CHAT_FORMAT_NAMES, f"one of {CHAT_FORMAT_NAMES}"),
            ("lora_rank", self.lora_rank >= 0, ">= 0"),
            ("lora_alpha", self.lora_alpha >= 1, ">= 1"),
            ("num_train_epochs", self.num_train_epochs > 0, "> 0"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("max_length", self.max_length >= 2, ">= 2"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, ">= 1"),
        ):
            if not ok:
                raise UserError(f"sft: {name} must be {rule}, got {getattr(self, name)}")


@dataclass
class SftReport:
    """What :func:`run_sft` did (``sft_report.json`` in the output directory)."""

    model_dir: str
    chat_format: str
    examples: int
    dropped_too_long: int
    tokens: int
    assistant_tokens: int
    epochs: float
    steps: int
    final_loss: float | None
    train_loss: float | None
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedData:
    """The demonstrations as TRL's pre-tokenized columns, and what was left out."""

    dataset: Dataset
    dropped_too_long: int
    tokens: int
    assistant_tokens: int


def encode_demonstrations(
    codec: ChatCodec, demos: Sequence[Demonstration], max_length: int
) -> EncodedData:
    """``input_ids`` / ``assistant_masks`` of every demonstration no longer than ``max_length``."""
    ids, masks, longest, dropped = [], [], 0, 0
    for demo in demos:
        row, mask = encode_demonstration(codec, demo)
        longest = max(longest, len(row))
        if len(row) > max_length:
            dropped += 1
            continue
        ids.append(row)
        masks.append(mask)
    if dropped:
        logger.warning(
            "dropped %d of %d demonstrations longer than max_length=%d tokens (truncating one "
            "would teach cut-off turns)",
            dropped,
            len(demos),
            max_length,
        )
    if not ids:
        raise UserError(
            f"sft: every demonstration is longer than max_length={max_length} tokens "
            f"(longest: {longest}); raise --max-length"
        )
    return EncodedData(
        Dataset.from_dict({"input_ids": ids, "assistant_masks": masks}),
        dropped,
        sum(len(r) for r in ids),
        sum(sum(m) for m in masks),
    )


class _LogLoss(TrainerCallback):
    """The loss through ``logging`` (the library does not print)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            logger.info(
                "sft step %d/%d loss %.4f", state.global_step, state.max_steps, logs["loss"]
            )


def sft_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    config: SftConfig,
    work_dir: Path,
    progress: bool = True,
) -> SFTTrainer:
    """TRL's ``SFTTrainer`` on the pre-tokenized ``dataset`` (LoRA-wrapped when asked).

    ``work_dir`` is TRL's ``output_dir``; nothing is saved there (no checkpoints).
    """
    batch = config.per_device_train_batch_size
    on_cpu = resolve_device(config.device).type == "cpu"
    steps = math.ceil(len(dataset) / batch) * config.num_train_epochs
    args = SFTConfig(
        output_dir=str(work_dir),
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=batch,
        learning_rate=config.learning_rate,
        max_length=config.max_length,
        # The mask column sets the labels; this option is for conversational datasets only.
        assistant_only_loss=False,
        bf16=False,
        use_cpu=on_cpu,
        # Recomputing activations saves GPU memory; on the CPU it only costs a third more time.
        gradient_checkpointing=not on_cpu,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        save_strategy="no",
        push_to_hub=False,
        logging_steps=max(1, int(steps) // 20),
        logging_first_step=True,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    lora = None
    if config.lora_rank > 0:
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules=config.lora_target_modules,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[_LogLoss()],
    )


def save_model(model: Any, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """A plain model directory: the adapter (if any) merged into the weights, in place (the
    model is not trained further, and a merged copy would double the memory), plus the
    tokenizer with its chat template."""
    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def run_sft(
    model_path: str | Path,
    demos: Sequence[Demonstration],
    out_dir: str | Path,
    config: SftConfig | None = None,
    progress: bool = True,
) -> SftReport:
    """Fine-tune the model at ``model_path`` on ``demos`` and save it to ``out_dir``.

    The output directory holds the model (LoRA merged), its tokenizer and ``sft_report.json``.
    """
    config = config or SftConfig()
    if not demos:
        raise UserError("sft: no demonstrations")
    out = Path(out_dir)
    logger.info("sft config: %s", json.dumps(asdict(config)))
    model, tokenizer = load_model(model_path)
    codec = ChatCodec(tokenizer, config.chat_format)
    data = encode_demonstrations(codec, demos, config.max_length)
    logger.info(
        "sft: %d demonstrations, %d tokens (%d trained), chat format %s",
        len(data.dataset),
        data.tokens,
        data.assistant_tokens,
        codec.format.name,
    )
    set_seed(config.seed)  # the adapter is initialised before the Trainer seeds anything
    with tempfile.TemporaryDirectory(prefix="mtrl-sft-") as work:
        trainer = sft_trainer(model, tokenizer, data.dataset, config, Path(work), progress)
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    record_chat_format(tokenizer, codec.format.name)  # `auto` then finds it in the output
    save_model(trainer.model, tokenizer, out)
    report = SftReport(
        model_dir=str(out),
        chat_format=codec.format.name,
        examples=len(data.dataset),
        dropped_too_long=data.dropped_too_long,
        tokens=data.tokens,
        assistant_tokens=data.assistant_tokens,
        epochs=config.num_train_epochs,
        steps=trainer.state.global_step,
        final_loss=losses[-1] if losses else None,
        train_loss=float(result.training_loss),
        seconds=round(seconds, 2),
        config=asdict(config),
    )
    (out / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    logger.info("sft: saved %s (%d steps, final loss %s)", out, report.steps, report.final_loss)
    return report


__all__ = [
    "REPORT_FILE",
    "EncodedData",
    "SftConfig",
    "SftReport",
    "encode_demonstrations",
    "run_sft",
    "save_model",
    "sft_trainer",
]
