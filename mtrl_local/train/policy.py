"""The policy being trained: loading, LoRA or full fine-tuning, reference logprobs, export.

With LoRA the reference model of the KL term is the same network with the adapter disabled, so no
second copy of the weights is kept. With full fine-tuning and ``beta > 0`` a frozen copy is made.
4-bit base weights (bitsandbytes) need CUDA; asking for them on a CPU is a clear error, not a
silent fallback.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.errors import UserError
from mtrl_local.model_io import load_model
from mtrl_local.train.distributed import shard_model

logger = logging.getLogger(__name__)


def load_policy(
    cfg: MultiTurnRLConfig, path: Path, device: torch.device
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The trainable policy (peft-wrapped when ``lora_rank > 0``) and its tokenizer."""
    if cfg.load_in_4bit:
        if device.type != "cuda":
            raise UserError("config: load_in_4bit needs CUDA (bitsandbytes); none is available")
        if cfg.lora_rank == 0:
            raise UserError("config: load_in_4bit needs lora_rank > 0 (4-bit weights are frozen)")
    model, tokenizer = load_model(path)
    if cfg.load_in_4bit:  # pragma: no cover - CUDA only
        model = _reload_4bit(path)
    if cfg.lora_rank > 0:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in cfg.lora_target_modules if t in present]
        if not targets:
            raise UserError(
                f"config: lora_target_modules {cfg.lora_target_modules} match no module"
            )
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = cast(PreTrainedModel, get_peft_model(model, lora))
    model.to(device)  # type: ignore[arg-type]
    return model, tokenizer


def _reload_4bit(path: Path) -> PreTrainedModel:  # pragma: no cover - CUDA only
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="auto")


class Reference:
    """The reference policy of the KL term: the adapter disabled, or a frozen copy."""

    def __init__(self, model: torch.nn.Module, lora: bool) -> None:
        self.lora = lora
        self._frozen: torch.nn.Module | None = None
        if not lora:
            self._frozen = copy.deepcopy(model).eval()
            for p in self._frozen.parameters():
                p.requires_grad_(False)
        self._model = model

    def shard(self) -> None:
        """Shard the frozen copy like the policy (FSDP); the LoRA reference is the policy."""
        if self._frozen is not None:
            shard_model(self._frozen)

    @contextlib.contextmanager
    def module(self) -> Iterator[torch.nn.Module]:
        """The reference network: the adapter disabled, or the frozen copy."""
        if self.lora:
            with self._model.disable_adapter():  # type: ignore[operator]
                yield self._model
        else:
            assert self._frozen is not None
            yield self._frozen


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def export_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """A plain HF model directory (LoRA merged into the weights) that ``mtrl eval`` loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    to_save = model
    if hasattr(model, "merge_and_unload"):
        # Merge into a copy: the live policy keeps its adapter for further training.
        to_save = copy.deepcopy(model).merge_and_unload()  # type: ignore[operator]
    to_save.save_pretrained(out_dir, safe_serialization=True)  # type: ignore[operator]
    tokenizer.save_pretrained(out_dir)
    return out_dir
