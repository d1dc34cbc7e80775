"""What an assistant turn asks for: tool calls and the final answer, as text.

The model writes ``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` blocks and ends
the task with ``<final_response>{…}</final_response>``. Parsing here never raises: a malformed
block becomes a :class:`ParsedCall` with ``error`` set, which the episode turns into an error
string for the agent.
Scoring the final answer is not done here (see ``rewards.parsing``).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FINAL_OPEN = "<final_response>"
FINAL_CLOSE = "</final_response>"

_BLOCK_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.S)


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
    for m in _BLOCK_RE.finditer(text):
        end = m.end()
        raw = m.group(1).strip()
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            calls.append(ParsedCall(None, None, "tool call is not valid JSON", raw))
            continue
        if not isinstance(obj, dict):
            calls.append(ParsedCall(None, None, "tool call must be a JSON object", raw))
            continue
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            calls.append(ParsedCall(None, None, "tool call has no 'name'", raw))
            continue
        arguments = obj.get("arguments", {})
        if isinstance(arguments, str):
            # Some models emit arguments as a JSON-encoded string (OpenAI wire format).
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments)
        calls.append(ParsedCall(name, arguments, None, raw))
    if TOOL_CALL_OPEN in text[end:]:
        # An opened block that never closes: usually the turn hit its token budget.
        calls.append(ParsedCall(None, None, "unterminated tool_call block", text[end:]))
    return calls


def has_final_response(text: str) -> bool:
    """Whether the turn contains a final-answer block (well-formed or not)."""
    return FINAL_OPEN in text


def render_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """Canonical text of one tool call, as the reference policies write it."""
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{TOOL_CALL_CLOSE}"


def render_final_response(answer: dict[str, Any]) -> str:
    """Canonical text of a final answer."""
    return f"{FINAL_OPEN}{json.dumps(answer)}{FINAL_CLOSE}"
