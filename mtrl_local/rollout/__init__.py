"""Token-in/token-out multi-turn rollouts: the engine, the sampler seam and its samplers.

* :mod:`~mtrl_local.rollout.sampler`: the seam (``Sampler``, requests, results, params).
* :mod:`~mtrl_local.rollout.engine`: ``RolloutEngine`` — every active episode's turn in one batch.
* :mod:`~mtrl_local.rollout.transformers_sampler`: our batched sampler with KV reuse across turns.
* :mod:`~mtrl_local.rollout.scripted`: replays token sequences (tests, trainer tests).
"""

from mtrl_local.rollout.engine import RolloutEngine, RolloutStats, episode_key
from mtrl_local.rollout.sampler import (
    GenerationRequest,
    GenerationResult,
    Sampler,
    SamplingParams,
)
from mtrl_local.rollout.scripted import ScriptedSampler
from mtrl_local.rollout.transformers_sampler import TransformersSampler

__all__ = [
    "GenerationRequest",
    "GenerationResult",
    "RolloutEngine",
    "RolloutStats",
    "Sampler",
    "SamplingParams",
    "ScriptedSampler",
    "TransformersSampler",
    "episode_key",
]
