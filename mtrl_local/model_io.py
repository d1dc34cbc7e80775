"""Models on disk and the device they run on.

Any local Hugging Face causal-LM directory is a model (:func:`mtrl_local.plugins.check_model_dir`
checks one cheaply): :func:`load_model` loads it with its tokenizer (keeping the tokenizer's own
chat template, or giving it ours when it has none).
:func:`resolve_device` is the one place a device spec (``auto``, ``cpu``, ``cuda``, ``cuda:1``)
becomes a :class:`torch.device`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mtrl_local.chat import prepare_tokenizer_for_trl
from mtrl_local.errors import UserError, first_line
from mtrl_local.model_files import check_model_files


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else the CPU; anything else as given (checked)."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"device '{spec}': not a device (expected auto, cpu, cuda…)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{spec}': CUDA is not available on this machine")
    return device


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local Hugging Face causal-LM directory as ``(model, tokenizer)``, model in eval mode.

    A tokenizer that carries its own chat template keeps it (its turns would be misread by ours);
    one without a template gets ours, which needs its ``<|im_start|>``/``<|im_end|>`` tokens.
    """
    check_model_files(Path(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"model '{path}': its tokenizer cannot be loaded ({first_line(exc)})"
        ) from None
    if not tokenizer.chat_template:
        prepare_tokenizer_for_trl(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        why = first_line(exc)
        raise UserError(
            f"model '{path}': config.json or weights cannot be loaded ({why})"
        ) from None
    model.eval()
    return model, tokenizer
