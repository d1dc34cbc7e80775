"""A byte-level BPE tokenizer trained locally, with the chat format attached.

Nothing can be downloaded here, so the tiny default models get a tokenizer trained on the task text
itself. Choices, and why:

* **Byte-level** BPE: any string encodes (no unknown token), so tool outputs never break a rollout.
* **One token per digit and per capital letter**: the pre-tokenizer isolates each of them before
  BPE, so ids such as ``AC-48213`` or ``N731QK`` are spelled one symbol per token. A tiny model can
  then learn to copy an id from a tool result into a call by copying tokens one by one; with merged
  chunks ("482", "QK") it would need to learn every chunk's spelling. Cost: a few more tokens.
* **Newlines are their own pre-token**, so the text after the assistant header (``…assistant\\n``)
  tokenises the same whether alone or inside the full conversation: the rollout engine can encode
  each piece separately and concatenate ids (see :mod:`mtrl_local.chat`).
* ``<|im_start|>``, ``<|im_end|>`` (= eos) and ``<|endoftext|>`` (= pad) are special tokens; the
  agent's tags ``<tool_call>``, ``</tool_call>``, ``<final_response>``, ``</final_response>`` are
  single added tokens that are *not* special (decoding with ``skip_special_tokens`` keeps them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mtrl_local.chat import (
    IM_END,
    PAD,
    SPECIAL_TOKENS,
    TAG_TOKENS,
    prepare_tokenizer_for_trl,
)

logger = logging.getLogger(__name__)

#: Isolated before byte-level BPE: every digit, every uppercase letter, every newline.
ISOLATE_PATTERN = r"\p{N}|\p{Lu}|\n"


def build_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Digits, capitals and newlines isolated; then GPT-2 style byte-level splitting."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(ISOLATE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    max_token_length: int | None = None,
    model_max_length: int = 8192,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``, ready for the chat format and TRL.

    ``vocab_size`` counts everything: the 256 byte symbols, the 7 added tokens and the merges
    (BPE stops early if the text runs out of pairs seen ``min_frequency`` times).
    ``max_token_length`` caps a merged token's length in characters (``None``: no cap).
    The result has the chat template, eos = ``<|im_end|>``, pad = ``<|endoftext|>`` and TRL's
    ``response_template`` set; it round-trips through ``save_pretrained`` / ``from_pretrained``.
    """
    added = [*SPECIAL_TOKENS, *TAG_TOKENS]
    if vocab_size < 256 + len(added):
        raise ValueError(f"vocab_size must be at least {256 + len(added)} (bytes + added tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = build_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        # Listed here so they get the first ids (0..6) and BPE never learns their pieces.
        special_tokens=added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side="right",
    )
    prepare_tokenizer_for_trl(fast)
    logger.info("trained byte-level BPE tokenizer: %d tokens", len(fast))
    return fast


__all__ = ["ISOLATE_PATTERN", "build_pre_tokenizer", "train_tokenizer"]
