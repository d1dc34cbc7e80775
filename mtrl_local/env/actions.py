"""The agent's action format: tool calls and the final answer, as text.

The model writes ``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` blocks and ends the
task with ``<final_response>{…}</final_response>``. This module is the one home of those tags:
the chat template, the episode driver, the scorers and the rollout server take them from here.

Parsers never raise and take time linear in the text, whatever the model wrote: a malformed tool
call becomes a :class:`ParsedCall` with ``error`` set (the episode turns it into an error string
for the agent), and an unreadable final answer is ``None``. JSON is read strictly
(:func:`load_json`): no NaN or Infinity, no integer over :data:`MAX_INT_DIGITS` digits, no float
beyond the double range, no nesting deeper than :data:`MAX_JSON_DEPTH`, no lone surrogate, so
whatever a parser returns can be compared, serialised and stored downstream.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FINAL_OPEN = "<final_response>"
FINAL_CLOSE = "</final_response>"
#: Every tag the agent writes (single added tokens in our tokenizer).
TAGS = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, FINAL_OPEN, FINAL_CLOSE)

#: Longest integer (in digits) a parser accepts: Python's default limit for int-from-string, fixed
#: here so that parsing does not depend on ``sys.set_int_max_str_digits``.
MAX_INT_DIGITS = 4300
#: Deepest JSON nesting a parser accepts (the outer object is level 1); far beyond any real
#: action, and far below the recursion limit of the code that handles the parsed value.
MAX_JSON_DEPTH = 100


def _block_re(open_tag: str, close_tag: str) -> re.Pattern[str]:
    """A block from ``open_tag`` to the first ``close_tag`` after it (its text is group 1), or,
    when none follows, from ``open_tag`` to the end of the text (group 1 is ``None``).

    The second branch is what makes a scan linear: a search that only matched closed blocks
    would, after failing at an unclosed tag, try again at every later one and read the rest of the
    text each time (quadratic in a tag repeated until the token budget ran out). Here the first
    unclosed tag consumes the rest, so each character is read a bounded number of times.
    """
    return re.compile(f"{re.escape(open_tag)}(?:(.*?){re.escape(close_tag)}|.*)", re.S)


#: ``<tool_call>…</tool_call>`` blocks, or an unclosed tail (group 1 ``None``): :func:`_block_re`.
TOOL_CALL_RE = _block_re(TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
#: ``<final_response>…</final_response>`` blocks, or an unclosed tail (group 1 ``None``).
FINAL_RE = _block_re(FINAL_OPEN, FINAL_CLOSE)


@dataclass(frozen=True)
class ParsedCall:
    """One ``<tool_call>`` block. ``error`` is set when the block is not a usable call."""

    name: str | None
    arguments: Any
    error: str | None = None
    raw: str = ""


def parse_tool_calls(text: str) -> list[ParsedCall]:
    """Every ``<tool_call>`` block in ``text``, in order; malformed ones carry ``error``."""
    return parse_tool_call_blocks(text, lambda body: [_parse_call(body)])


def parse_tool_call_blocks(
    text: str, read_block: Callable[[str], list[ParsedCall]]
) -> list[ParsedCall]:
    """The calls ``read_block`` finds in each ``<tool_call>`` block's stripped body, in order; an
    unclosed block ends the scan with an ``unterminated`` call."""
    calls: list[ParsedCall] = []
    end = 0
    for m in TOOL_CALL_RE.finditer(text):
        if m.group(1) is None:
            # An opened block that never closes: usually the turn hit its token budget.
            calls.append(ParsedCall(None, None, "unterminated tool_call block", text[end:]))
            break
        end = m.end()
        calls.extend(read_block(m.group(1).strip()))
    return calls


def _parse_call(raw: str) -> ParsedCall:
    try:
        obj = load_json(raw)
    except UnreadableJSON as exc:
        return ParsedCall(None, None, f"tool call {exc}", raw)
    return call_from_json(obj, raw)


def call_from_json(
    value: Any, raw: str, argument_keys: Sequence[str] = ("arguments",)
) -> ParsedCall:
    """A call from a decoded JSON value: an object with a ``name``, its arguments under the first
    of ``argument_keys`` present (``{}`` when none is)."""
    if not isinstance(value, dict):
        return ParsedCall(None, None, "tool call must be a JSON object", raw)
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return ParsedCall(None, None, "tool call has no 'name'", raw)
    arguments: Any = next((value[k] for k in argument_keys if k in value), {})
    if isinstance(arguments, str):
        # Some models emit arguments as a JSON-encoded string (OpenAI wire format); one that does
        # not decode stays a string, which the tool refuses as "not a JSON object".
        with contextlib.suppress(UnreadableJSON):
            arguments = load_json(arguments)
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
    blocks = [m.group(1) for m in FINAL_RE.finditer(text) if m.group(1) is not None]
    if not blocks:
        return None
    try:
        obj = load_json(blocks[-1])
    except UnreadableJSON:
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


# -- strict JSON ----------------------------------------------------------------------------------
class UnreadableJSON(ValueError):
    """Text that :func:`load_json` refuses; the message completes "tool call …"."""


#: The characters that open or close a JSON string or container, and the string escape.
_JSON_STRUCTURE = re.compile(r'[\[\]{}"\\]')


def load_json(text: str) -> Any:
    """``text`` as JSON, or :class:`UnreadableJSON` saying why not (never another exception).

    Stricter than :func:`json.loads` where a value would break the code handling it: NaN and
    Infinity (not JSON) and floats that overflow to infinity, integers over
    :data:`MAX_INT_DIGITS` digits (``int()`` refuses them and is quadratic in the digits), nesting
    deeper than :data:`MAX_JSON_DEPTH` (the decoder and every later serialisation recurse) and
    lone surrogates (no UTF-8 encoding: the value could not be sent or stored).
    """
    if _nested_deeper_than(text, MAX_JSON_DEPTH):
        raise UnreadableJSON(f"is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant
        )
    except UnreadableJSON:
        raise
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise UnreadableJSON("is not valid JSON") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UnreadableJSON("has a lone surrogate (not valid Unicode)") from None
    return value


def _parse_int(digits: str) -> int:
    if len(digits) - digits.startswith("-") > MAX_INT_DIGITS:
        raise UnreadableJSON(f"has an integer longer than {MAX_INT_DIGITS} digits")
    return int(digits)


def _parse_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise UnreadableJSON("has a number out of floating-point range")
    return value


def _refuse_constant(name: str) -> float:
    raise UnreadableJSON("has NaN or Infinity (not JSON)")


def _nested_deeper_than(text: str, limit: int) -> bool:
    """Whether ``text`` opens more than ``limit`` arrays/objects inside one another (brackets in
    strings do not count); one left-to-right pass over the structural characters."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, in_string, escaped_at = 0, False, -1
    for m in _JSON_STRUCTURE.finditer(text):
        at, char = m.start(), m.group()
        if at == escaped_at:
            continue
        if in_string:
            if char == "\\":
                escaped_at = at + 1
            in_string = char != '"'
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False
