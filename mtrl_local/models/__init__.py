"""Models and tokenizers built locally (nothing is downloaded from a model hub)."""

from mtrl_local.models.tokenizer import train_tokenizer

__all__ = ["train_tokenizer"]
