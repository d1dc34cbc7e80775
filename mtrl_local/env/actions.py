"""The agent's action format: tool calls and the final answer, as text.

The model writes ``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` blocks and ends the
task with ``<final_response>{…}</final_response>``. This module is the one home of those tags:
the chat template, the episode driver, the scorers and the rollout server take them from here.

Parsers never raise: a malformed tool call becomes a :class:`ParsedCall` with ``error`` set (the
episode turns it into an error string for the agent), and an unreadable final answer is ``None``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FINAL_OPEN = "<final_response>"
FINAL_CLOSE = "</final_response>"
#: Every tag the agent writes (single added tokens in our tokenizer).
TAGS = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, FINAL_OPEN, FINAL_CLOSE)

TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.S)
FINAL_RE = re.compile(re.escape(FINAL_OPEN) + r"(.*?)" + re.escape(FINAL_CLOSE), re.S)


@dataclass(frozen=True)
class ParsedCall:
    """One ``<tool_call>`` block. ``error`` is set when the block is not a usable call."""

    name: str | None
    arguments: Any
    error: str | None = None
    raw: str = ""


def parse_tool_calls(text: str) -> list[ParsedCall]:
    """Every ``<tool_call>`` block in ``text``, in order; malformed ones carry ``error``."""
    calls: list[ParsedCall] = []
    end = 0
    for m in TOOL_CALL_RE.finditer(text):
        end = m.end()
        calls.append(_parse_call(m.group(1).strip()))
    if TOOL_CALL_OPEN in text[end:]:
        # An opened block that never closes: usually the turn hit its token budget.
        calls.append(ParsedCall(None, None, "unterminated tool_call block", text[end:]))
    return calls


def _parse_call(raw: str) -> ParsedCall:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return ParsedCall(None, None, "tool call is not valid JSON", raw)
    if not isinstance(obj, dict):
        return ParsedCall(None, None, "tool call must be a JSON object", raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ParsedCall(None, None, "tool call has no 'name'", raw)
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        # Some models emit arguments as a JSON-encoded string (OpenAI wire format).
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments)
    return ParsedCall(name, arguments, None, raw)


def has_final_response(text: str) -> bool:
    """Whether the turn contains a final-answer block (well-formed or not)."""
    return FINAL_OPEN in text


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
    """The final answer of an episode: last assistant turn, last block, a JSON object."""
    return extract_final_response(final_assistant_text(messages))


def render_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """Canonical text of one tool call, as the expert programs write it."""
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{TOOL_CALL_CLOSE}"


def render_final_response(answer: dict[str, Any]) -> str:
    """Canonical text of a final answer."""
    return f"{FINAL_OPEN}{json.dumps(answer)}{FINAL_CLOSE}"
