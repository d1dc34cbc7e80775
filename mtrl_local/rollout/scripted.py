"""A sampler that replays given token sequences: for tests of the engine, the trainer and rewards.

Each episode (by key, see :func:`~mtrl_local.rollout.engine.episode_key`) gets its turns from a
script: a mapping ``key -> [turn ids, …]`` or a callable ``(key, turn_index, context_ids) -> ids``.
A scripted turn is returned as the sampler would: cut at the token budget (finish ``length``), or
ending in eos (``stop``); a turn that is shorter than the budget and lacks eos is reported as
``length`` too (it stands for "no end-of-turn within budget").

It also proves token-in/token-out: every request's context must start with the previous context
of the same episode followed by exactly the ids returned for it, or :meth:`generate` raises.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mtrl_local.rollout.sampler import GenerationRequest, GenerationResult, SamplingParams

Script = Mapping[str, Sequence[Sequence[int]]] | Callable[[str, int, list[int]], Sequence[int]]


class ScriptedSampler:
    """:class:`~mtrl_local.rollout.sampler.Sampler` replaying ``script``."""

    def __init__(
        self,
        script: Script,
        eos_token_id: int,
        *,
        logprob: float = -1.0,
        max_context_len: int | None = None,
        policy_version: int = 0,
        fail_on_call: int | None = None,
    ) -> None:
        self.script = script
        self.eos_token_id = eos_token_id
        self.logprob = logprob
        self.max_context_len = max_context_len
        self.policy_version = policy_version
        #: Raise ``RuntimeError`` on this (0-based) ``generate`` call: tests of teardown.
        self.fail_on_call = fail_on_call
        #: Keys of every ``generate`` call, in order (tests count batching from it).
        self.calls: list[list[str]] = []
        #: Every context seen per key, and what was returned for it.
        self.contexts: dict[str, list[list[int]]] = defaultdict(list)
        self.returned: dict[str, list[list[int]]] = defaultdict(list)
        self.released: list[str] = []
        #: Index into ``returned[key]`` where the key's current episode began: a released key
        #: that comes back (the same case in a later step) starts a new episode at turn 0.
        self._episode_start: dict[str, int] = defaultdict(int)

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> list[GenerationResult]:
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            self.calls.append([r.key for r in requests])
            raise RuntimeError("scripted generation failure")
        self.calls.append([r.key for r in requests])
        out = []
        for r in requests:
            context = list(r.context_ids)
            turn = len(self.returned[r.key]) - self._episode_start[r.key]
            if turn > 0:
                self._check_prefix(r.key, context)
            ids = list(self._turn(r.key, turn, context))
            budget = min(params.max_tokens, r.max_tokens or params.max_tokens)
            if len(ids) > budget:
                ids = ids[:budget]
            stop = bool(ids) and ids[-1] == self.eos_token_id
            if not ids:
                raise ValueError(f"script gave an empty turn for {r.key} turn {turn}")
            self.contexts[r.key].append(context)
            self.returned[r.key].append(ids)
            out.append(
                GenerationResult(ids, [self.logprob] * len(ids), "stop" if stop else "length", [])
            )
        return out

    def release(self, key: str) -> None:
        self.released.append(key)
        self._episode_start[key] = len(self.returned[key])

    def load_state_dict(self, state: Mapping[str, Any], version: int) -> None:
        self.policy_version = version

    def _turn(self, key: str, turn: int, context: list[int]) -> Sequence[int]:
        if callable(self.script):
            return self.script(key, turn, context)
        turns = self.script[key]
        if turn >= len(turns):
            raise ValueError(f"script of {key} has {len(turns)} turns, turn {turn} was asked")
        return turns[turn]

    def _check_prefix(self, key: str, context: list[int]) -> None:
        expected = self.contexts[key][-1] + self.returned[key][-1]
        if context[: len(expected)] != expected:
            raise ValueError(f"episode {key}: context does not extend the last context + ids")


__all__ = ["Script", "ScriptedSampler"]
