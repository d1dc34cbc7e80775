"""Parsers: extract what a trajectory answered. They return ``None`` on failure, never raise."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

FINAL_RE = re.compile(r"<final_response>(.*?)</final_response>", re.S)


def final_assistant_text(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """Content of the last assistant message, or ``None`` if there is none."""
    for message in reversed(messages):
        if message.get("role") == "assistant":
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None


def extract_final_response(text: str | None) -> dict[str, Any] | None:
    """The JSON object in the **last** ``<final_response>…</final_response>`` block.

    Nothing else is accepted: no other tag, no bare JSON, no JSON that is not an object.

    >>> extract_final_response('x <final_response>{"a": 1}</final_response>')
    {'a': 1}
    >>> extract_final_response('{"a": 1}') is None
    True
    """
    if not text:
        return None
    blocks = FINAL_RE.findall(text)
    if not blocks:
        return None
    try:
        obj = json.loads(blocks[-1])
    except (json.JSONDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def parse_answer(messages: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The strict final answer of a trajectory: last assistant turn, last block, JSON object."""
    return extract_final_response(final_assistant_text(messages))
