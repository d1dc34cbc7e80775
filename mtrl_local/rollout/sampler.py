"""The seam between the rollout engine and whatever samples tokens.

The engine speaks only token ids: it hands a sampler the full token history of every active episode
and gets back the ids, logprobs and finish reason of one sampled turn per episode. A sampler may
keep per-episode state between turns (a KV cache, a vLLM prefix-cache entry) under the request's
``key`` and must forget it on :meth:`Sampler.release`. Nothing else crosses the seam, so a
vLLM sampler (``generate`` = one ``LLM.generate`` call over ``TokensPrompt``s with ``logprobs=0``)
can be added later without touching the engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

SampleFinish = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How one turn is sampled (the same for every episode of a ``generate`` call)."""

    #: Softmax temperature; ``0`` is greedy (argmax of the raw logits).
    temperature: float = 1.0
    #: Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``.
    top_p: float = 1.0
    #: The per-turn token budget ``sampling_max_tokens`` (docs/design.md, "Trajectories"): a turn
    #: that reaches it without sampling eos ends with finish reason ``length``.
    max_tokens: int = 256
    #: Base seed; each row's noise is derived from (seed, request key, context length), so a row's
    #: sample does not depend on which other rows share its batch. ``None``: the engine's run seed.
    seed: int | None = None
    #: Test and benchmark knob: never sample eos (every turn runs to ``max_tokens``). Used to force
    #: realistic turn lengths on random models; never set it for real rollouts.
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")


@dataclass(frozen=True)
class GenerationRequest:
    """Sample the next turn of episode ``key`` whose token history is ``context_ids``."""

    #: Episode id: the handle of any state the sampler keeps between this episode's turns.
    key: str
    #: The whole token history of the episode (prompt, earlier turns, tool results, glue, header).
    context_ids: Sequence[int]
    #: A tighter per-request budget than ``SamplingParams.max_tokens`` (the engine uses it to stay
    #: inside the model's context window); ``None``: the params' budget.
    max_tokens: int | None = None


@dataclass
class GenerationResult:
    """One sampled turn. ``token_ids`` ends with eos iff ``finish_reason == "stop"``."""

    token_ids: list[int]
    #: log π(token) under the *unmodified* policy: log-softmax of the raw logits (temperature 1, no
    #: top-p), what importance ratios against the trainer's log π need.
    logprobs: list[float]
    finish_reason: SampleFinish
    #: log of the probability the token was actually drawn with (after temperature and top-p; 0.0
    #: for greedy). Equal to ``logprobs`` at temperature 1, top_p 1. Empty if the sampler lacks it.
    sampling_logprobs: list[float] = field(default_factory=list)


@runtime_checkable
class Sampler(Protocol):
    """What the rollout engine needs from a sampler."""

    #: Weights version the samples come from (recorded in every trajectory).
    policy_version: int
    #: The longest token sequence the model accepts (``None``: unbounded, e.g. a scripted sampler).
    max_context_len: int | None
    #: The id that ends a turn (``<|im_end|>``).
    eos_token_id: int

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> list[GenerationResult]:
        """One batched decode over all ``requests``; results in request order."""
        ...

    def release(self, key: str) -> None:
        """Forget any cached state of episode ``key`` (it finished). Unknown keys are ignored."""
        ...

    def load_state_dict(self, state: Mapping[str, Any], version: int) -> None:
        """Take new policy weights (after a trainer step) and drop caches computed with the old."""
        ...


def row_seed(seed: int, key: str, context_len: int) -> int:
    """The RNG seed of one row of one turn: stable across runs, machines and batch layouts."""
    digest = hashlib.blake2b(f"{seed}|{key}|{context_len}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


__all__ = [
    "GenerationRequest",
    "GenerationResult",
    "SampleFinish",
    "Sampler",
    "SamplingParams",
    "row_seed",
]
