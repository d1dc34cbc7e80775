"""The bookkeeping of one batch's decode loop in the transformers sampler.

Cache row ``r`` holds request ``rows[r]``; rows are dropped from the cache as they finish
(compaction), so the mapping changes while each request's tokens, logprobs and finish reason
accumulate in request order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mtrl_local.rollout.kv import SlotCache
from mtrl_local.rollout.sampler import GenerationRequest, GenerationResult, SampleFinish


@dataclass
class DecodeRows:
    """The state of one batch's decode loop: cache row ``r`` holds request ``rows[r]``."""

    cache: SlotCache
    contexts: list[list[int]]
    budgets: list[int]
    rows: list[int]
    gens: list[torch.Generator]
    slot: int
    requests: Sequence[GenerationRequest] = ()
    live: list[int] = field(default_factory=list)
    sampled: list[list[int]] = field(default_factory=list)
    raw_lp: list[list[float]] = field(default_factory=list)
    picked_lp: list[list[float]] = field(default_factory=list)
    finish: list[SampleFinish] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.contexts)
        self.sampled = [[] for _ in range(n)]
        self.raw_lp = [[] for _ in range(n)]
        self.picked_lp = [[] for _ in range(n)]
        self.finish = ["length"] * n

    def record(
        self, tokens: list[int], raw: list[float], picked: list[float], eos: int, pad: int
    ) -> tuple[torch.Tensor, list[int]]:
        """Append each live row's sampled token; the next ids to feed and the rows that go on."""
        next_ids = torch.full((self.cache.batch,), pad, dtype=torch.long)
        still: list[int] = []
        for r, tok, lp_raw, lp_picked in zip(self.live, tokens, raw, picked, strict=True):
            i = self.rows[r]
            self.sampled[i].append(tok)
            self.raw_lp[i].append(lp_raw)
            self.picked_lp[i].append(lp_picked)
            if tok == eos:
                self.finish[i] = "stop"
            elif len(self.sampled[i]) < self.budgets[i]:
                still.append(r)
                next_ids[r] = tok
        return next_ids, still

    def results(self) -> list[GenerationResult]:
        return [
            GenerationResult(self.sampled[i], self.raw_lp[i], self.finish[i], self.picked_lp[i])
            for i in range(len(self.contexts))
        ]
