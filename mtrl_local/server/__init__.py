"""Bring your own agent: an OpenAI-compatible rollout server and the trainer's source over it.

* :mod:`~mtrl_local.server.app`: ``RolloutServer`` — FastAPI + uvicorn on 127.0.0.1.
* :mod:`~mtrl_local.server.auth`: the server token opens episodes; each episode has its own key.
* :mod:`~mtrl_local.server.limits`: body size, strict JSON (finite numbers), conversation size.
* :mod:`~mtrl_local.server.episodes`: per-episode token histories, built only by appending ids.
* :mod:`~mtrl_local.server.batcher`: concurrent requests gathered into one ``generate`` call.
* :mod:`~mtrl_local.server.source`: ``AgentBatchSource`` — launches agents, yields StepBatches.
"""

from mtrl_local.server.app import EPISODE_HEADER, RolloutServer
from mtrl_local.server.batcher import GenerationBatcher
from mtrl_local.server.episodes import EpisodeError, EpisodeRecord, EpisodeRegistry

__all__ = [
    "EPISODE_HEADER",
    "EpisodeError",
    "EpisodeRecord",
    "EpisodeRegistry",
    "GenerationBatcher",
    "RolloutServer",
]
