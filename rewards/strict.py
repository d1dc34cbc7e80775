"""The strict scorer: the evaluation, independent of any training reward (DESIGN.md §4).

The final JSON object inside the last ``<final_response>`` block of the last assistant turn; every
ground-truth field must be present and equal, values compared as strings after stripping
surrounding whitespace (booleans as ``true``/``false``). Missing block, bad JSON or any wrong field
scores 0; otherwise 1. No substring matching, no other tags, no harvesting of tool results.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.parsing import parse_answer
from rewards.types import Message


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
    """1.0 if the trajectory's final answer gets every field exactly right, else 0.0."""
    answer = parse_answer(messages)
    if answer is None:
        return 0.0
    return float(all(field_matches(answer, ground_truth).values()))
