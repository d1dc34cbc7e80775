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
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from mtrl_local.env.actions import parse_answer
from mtrl_local.errors import UserError

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


class RewardError(UserError):
    """A reward function raised or returned something that is not a reward (one line, exit 2)."""


def reward_name(reward_fn: Callable[..., Any]) -> str:
    """``module:function``, the way a reward is named on the command line."""
    module = getattr(reward_fn, "__module__", None) or "?"
    name = getattr(reward_fn, "__qualname__", None) or type(reward_fn).__name__
    return f"{module}:{name}"


def apply_reward(
    reward_fn: RewardFn, messages: Sequence[Message], ground_truth: Mapping[str, Any]
) -> RewardResult:
    """``reward_fn``'s result, checked: a :class:`RewardResult` (or a ``(reward, metrics)``
    pair, or a bare number with no metrics) whose rewards are finite numbers.

    A reward function is user code; when it raises or returns something else the run cannot go
    on with a meaningful signal, so the :class:`RewardError` names the function and what it did
    instead of a traceback from deep inside the engine.
    """
    name = reward_name(reward_fn)
    try:
        result = reward_fn(messages, ground_truth)
    except Exception as exc:
        raise RewardError(f"reward '{name}' raised {type(exc).__name__}: {exc}") from None
    reward, metrics = _unpack(result, name)
    values = reward if isinstance(reward, list) else [reward]
    if not all(_is_number(v) for v in values):
        raise RewardError(f"reward '{name}' returned {reward!r}: expected a number or a list")
    if not all(math.isfinite(v) for v in values):
        raise RewardError(f"reward '{name}' returned {reward!r}: rewards must be finite")
    floats = [float(v) for v in values]
    return RewardResult(floats if isinstance(reward, list) else floats[0], metrics)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unpack(result: Any, name: str) -> tuple[Any, dict[str, float]]:
    if _is_number(result):
        return result, {}
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping):
        return result[0], dict(result[1])
    got = type(result).__name__
    raise RewardError(f"reward '{name}' returned a {got}: expected RewardResult(reward, metrics)")


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
