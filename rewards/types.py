"""The shape of a reward function (DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

Message = Mapping[str, Any]


class RewardResult(NamedTuple):
    """A scalar (or one scalar per assistant turn) plus metrics that are logged, not optimised."""

    reward: float | list[float]
    metrics: dict[str, float]


class RewardFn(Protocol):
    """``reward_fn(messages, ground_truth, **kwargs) -> RewardResult``."""

    def __call__(
        self, messages: Sequence[Message], ground_truth: Mapping[str, Any], **kwargs: Any
    ) -> RewardResult: ...


def scalar(reward: float | list[float]) -> float:
    """A per-turn reward list summed to the trajectory's scalar return."""
    return float(sum(reward)) if isinstance(reward, list) else float(reward)
