"""The default training reward: per-field accuracy plus a small format term (docs/design.md,
"Rewards and the strict scorer").

``reward = field_acc + format_coef · (emitted − 1)``: a parseable answer adds nothing, no parseable
answer costs ``format_coef``. Correctness dominates; the format term only separates "answered
wrongly" from "did not answer". It parses exactly as strictly as the strict scorer, so it can never
pay for an answer the evaluation would not read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtrl_local.env.actions import parse_answer
from mtrl_local.scoring import Message, RewardResult, field_matches, scalar


def dense_reward(
    messages: Sequence[Message],
    ground_truth: Mapping[str, Any],
    format_coef: float = 0.1,
    **_: Any,
) -> RewardResult:
    """Per-field accuracy in [0, 1] plus ``format_coef·(emitted − 1)``; range [−format_coef, 1].

    Metrics: ``completion`` (1 if a parseable answer was emitted), ``field_acc``, ``strict``.
    """
    answer = parse_answer(messages)
    emitted = answer is not None
    matches = field_matches(answer, ground_truth)
    field_acc = sum(matches.values()) / len(matches) if matches else float(emitted)
    reward = field_acc + format_coef * (float(emitted) - 1.0)
    metrics = {
        "completion": float(emitted),
        "field_acc": field_acc,
        "strict": float(emitted and all(matches.values())),
    }
    return RewardResult(reward, metrics)


def dense_strict_reward(
    messages: Sequence[Message],
    ground_truth: Mapping[str, Any],
    strict_weight: float = 0.5,
    format_coef: float = 0.1,
    **_: Any,
) -> RewardResult:
    """``(1 − strict_weight)·field_acc + strict_weight·strict + format_coef·(emitted − 1)``.

    Why: per-field accuracy alone rewards each field's most likely value on its own, and a policy
    can raise every field's accuracy while its answers drift to a combination no case has (on
    aircraft_inspection: "pass, pass, consistent" with ``aircraft_ready: false``, against SOP
    step 6; docs/results.md has the run). Half the reward on the whole answer being right keeps
    the shaping and pays for coherent answers. Same range as
    :func:`dense_reward`; an all-right answer scores 1.
    """
    if not 0.0 <= strict_weight <= 1.0:
        raise ValueError("strict_weight must be in [0, 1]")
    result = dense_reward(messages, ground_truth, format_coef=format_coef)
    metrics = dict(result.metrics)
    penalty = scalar(result.reward) - metrics["field_acc"]  # the format term
    reward = (1 - strict_weight) * metrics["field_acc"] + strict_weight * metrics["strict"]
    return RewardResult(reward + penalty, metrics)


def strict_reward(
    messages: Sequence[Message],
    ground_truth: Mapping[str, Any],
    format_coef: float = 0.1,
    **_: Any,
) -> RewardResult:
    """The strict score itself (1 for an all-right answer, else 0) plus the format term:
    :func:`dense_strict_reward` with ``strict_weight = 1``. No credit for a field guessed right
    on its own, so no pull towards each field's majority value or towards answering before the
    tools are read; the signal is sparse (a group whose samples all fail teaches nothing).
    """
    return dense_strict_reward(messages, ground_truth, strict_weight=1.0, format_coef=format_coef)


def per_turn_rewards(
    messages: Sequence[Message], final_reward: float, tool_error_penalty: float = 0.0
) -> list[float]:
    """Spread a trajectory's reward over its assistant turns.

    The final reward goes to the last assistant turn; each tool result that is an error costs the
    turn that made the call ``tool_error_penalty``. One entry per assistant turn (for
    ``group_based_per_turn`` advantages, docs/design.md, "Advantages").
    """
    rewards: list[float] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant":
            rewards.append(0.0)
        elif role == "tool" and rewards and str(message.get("content", "")).startswith("error: "):
            rewards[-1] -= tool_error_penalty
    if rewards:
        rewards[-1] += final_reward
    return rewards


def dense_reward_per_turn(
    messages: Sequence[Message],
    ground_truth: Mapping[str, Any],
    format_coef: float = 0.1,
    tool_error_penalty: float = 0.02,
    **_: Any,
) -> RewardResult:
    """:func:`dense_reward` as a per-turn list, with a small cost per failed tool call."""
    result = dense_reward(messages, ground_truth, format_coef=format_coef)
    assert isinstance(result.reward, float)
    turns = per_turn_rewards(messages, result.reward, tool_error_penalty)
    return RewardResult(turns or [result.reward], result.metrics)
