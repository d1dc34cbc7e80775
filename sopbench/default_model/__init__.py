"""The embedded default model: built locally from the suite's demonstrations, shipped, cached.

An application of the library beside the suite it learns from. ``default_model_path()`` is
registered as the toolkit's ``default`` model (entry point group ``mtrl_local.models``), so
``--model default`` works everywhere; ``python -m sopbench.default_model`` (``make base-model``)
rebuilds it from scratch.
"""

from sopbench.default_model.build import build_default_model
from sopbench.default_model.cache import SHIPPED_DIR, cache_root, default_model_path, shipped_build
from sopbench.default_model.spec import RECIPE_VERSION, DefaultModelSpec, make_model
from sopbench.default_model.tokenizer import train_tokenizer

__all__ = [
    "RECIPE_VERSION",
    "SHIPPED_DIR",
    "DefaultModelSpec",
    "build_default_model",
    "cache_root",
    "default_model_path",
    "make_model",
    "shipped_build",
    "train_tokenizer",
]
