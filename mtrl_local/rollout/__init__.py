"""Token-in/token-out multi-turn rollouts: the engine, the backend seam and its backends.

* :mod:`~mtrl_local.rollout.backend`: the seam (``GenerationBackend``, requests, results, params).
* :mod:`~mtrl_local.rollout.engine`: ``RolloutEngine`` — every active episode's turn in one batch.
* :mod:`~mtrl_local.rollout.transformers_backend`: our batched sampler with KV reuse across turns.
* :mod:`~mtrl_local.rollout.scripted`: replays token sequences (tests, trainer tests).
"""

from mtrl_local.rollout.backend import (
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from mtrl_local.rollout.engine import RolloutEngine, RolloutStats, episode_key, summarize
from mtrl_local.rollout.scripted import ScriptedBackend
from mtrl_local.rollout.transformers_backend import TransformersBackend

__all__ = [
    "GenerationBackend",
    "GenerationRequest",
    "GenerationResult",
    "RolloutEngine",
    "RolloutStats",
    "SamplingParams",
    "ScriptedBackend",
    "TransformersBackend",
    "episode_key",
    "summarize",
]
