"""How an episode is scored: the reward-function seam and the strict scorer.

A **reward function** is ``reward_fn(messages, ground_truth, **kwargs) -> RewardResult``: a
scalar or one scalar per assistant turn, plus metrics that are logged, never optimised. The
toolkit ships some in the ``rewards`` package; any function of this shape works.

The **strict scorer** is the evaluation, independent of any training reward (docs/design.md,
"Rewards and the strict scorer"): the JSON object in the last ``<final_response>`` block of the
last assistant turn; every ground-truth field must be present and equal, values compared as
strings after stripping surrounding whitespace (booleans as ``true``/``false``). A missing
block, bad JSON or any wrong field scores 0, otherwise 1. No substring matching, no other tags,
no harvesting of tool results. The rollout engine and the evaluation are *handed* a scorer
(:data:`Scorer`); this one is what the CLI, the trainer's pipelines and the audits hand them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from mtrl_local.env.actions import parse_answer

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


#: ``scorer(messages, ground_truth) -> float`` in [0, 1]; :func:`strict_score` is the toolkit's.
Scorer = Callable[[Sequence[Message], Mapping[str, Any]], float]


def scalar(reward: float | list[float]) -> float:
    """The trajectory's return: a per-turn reward list summed, a scalar as it is."""
    return float(sum(reward)) if isinstance(reward, list) else float(reward)


def normalize(value: Any) -> str:
    """The string a field value is compared as.

    >>> normalize(True), normalize(" pass "), normalize(3), normalize(None)
    ('true', 'pass', '3', 'null')
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def field_matches(
    answer: Mapping[str, Any] | None, ground_truth: Mapping[str, Any]
) -> dict[str, bool]:
    """Per ground-truth field: is it present in ``answer`` with an equal value?"""
    if answer is None:
        return {key: False for key in ground_truth}
    return {
        key: key in answer and normalize(answer[key]) == normalize(expected)
        for key, expected in ground_truth.items()
    }


def strict_score(messages: Sequence[Message], ground_truth: Mapping[str, Any]) -> float:
    """1.0 if the episode's final answer gets every field exactly right, else 0.0."""
    answer = parse_answer(messages)
    if answer is None:
        return 0.0
    return float(all(field_matches(answer, ground_truth).values()))
