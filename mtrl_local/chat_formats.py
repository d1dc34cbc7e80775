"""Tool-call formats of the model families: how a model writes a call, and how it gets results.

A :class:`ChatFormat` is pure text: it parses the tool calls out of one assistant turn, writes
calls the way the family writes them (for demonstrations and for the instructions added to a
prompt whose template ignores ``tools``), and names the role its template gives tool results.
Binding a format to a tokenizer is :class:`mtrl_local.chat_codec.ChatCodec`'s job.

The formats (``chat_format`` in the config; ``auto`` picks one from the chat template):

``hermes``
    ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``, one block per call (ours; Hermes,
    Qwen 2.5/3, SmolLM3).
``tool_call_list``
    ``<tool_call>[{"name": …, "arguments": {…}}, …]</tool_call>``: one block holding a JSON list
    (a single object is read as a one-call list).
``llama3_json``
    Bare JSON objects ``{"name": …, "parameters": {…}}`` (Llama 3.1–3.3), optionally after
    ``<|python_tag|>``; results come back in the ``ipython`` role.
``mistral``
    ``[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`` (Mistral v3 tokenizers).

The task's final answer is the same in every format: a ``<final_response>`` block (the SOP says
so), and a turn that has one is never read for calls. Every parser is linear in the text and
never raises; a malformed call is a :class:`~mtrl_local.env.actions.ParsedCall` with ``error``
set, which the episode answers with an error result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mtrl_local.env.actions import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ParsedCall,
    UnreadableJSON,
    call_from_json,
    load_json,
    parse_tool_call_blocks,
    parse_tool_calls,
)

#: One call as a format writes it: the tool's name and its arguments.
Call = tuple[str, dict[str, Any]]

PYTHON_TAG = "<|python_tag|>"
MISTRAL_CALLS = "[TOOL_CALLS]"


@dataclass(frozen=True)
class ChatFormat:
    """How one model family writes tool calls and receives their results."""

    name: str
    #: Role of a tool-result message in this family's template.
    tool_role: str
    #: How to call a tool, said to the model when its template does not render ``tools``.
    instructions: str
    parse_calls: Callable[[str], list[ParsedCall]]
    render_calls: Callable[[Sequence[Call]], str]
    #: Substrings of a chat template that identify this family (for ``auto``).
    markers: tuple[str, ...] = ()

    def tools_section(self, schemas: Sequence[dict[str, Any]]) -> str:
        """The tools section for a system turn: how to call, then one schema per line."""
        lines = [json.dumps(_function_of(s), ensure_ascii=False) for s in schemas]
        return "# Tools\n" + self.instructions + "\n" + "".join(f"{line}\n" for line in lines)


def _function_of(schema: dict[str, Any]) -> Any:
    """An OpenAI-style schema's inner function object (fewer tokens), or the schema itself."""
    function = schema.get("function")
    return function if isinstance(function, dict) and function else schema


# -- reading calls --------------------------------------------------------------------------------
def _calls_from_json_text(raw: str, argument_keys: Sequence[str]) -> list[ParsedCall]:
    """The calls in one JSON text: an object is one call, a list holds several."""
    try:
        value = load_json(raw)
    except UnreadableJSON as exc:
        return [ParsedCall(None, None, f"tool call {exc}", raw)]
    if isinstance(value, list):
        if not value:
            return [ParsedCall(None, None, "tool call list is empty", raw)]
        return [call_from_json(item, raw, argument_keys) for item in value]
    return [call_from_json(value, raw, argument_keys)]


def parse_tool_call_list(text: str) -> list[ParsedCall]:
    """``<tool_call>`` blocks each holding a JSON list of calls (or one call object)."""
    return parse_tool_call_blocks(text, lambda body: _calls_from_json_text(body, ("arguments",)))


#: Characters that change the JSON scanner's state.
_STRUCTURE = re.compile(r'[\[\]{}"\\]')


def json_spans(text: str, opens: str = "{", start: int = 0) -> Iterator[tuple[int, int | None]]:
    """``(start, end)`` of each top-level JSON container in ``text`` that opens with one of
    ``opens``; ``end`` is ``None`` for one still open at the end of the text (then the scan
    stops). One left-to-right pass: brackets inside strings do not count, and a closing bracket
    with nothing open is ignored (prose between the objects)."""
    depth, in_string, escaped_at, begin = 0, False, -1, -1
    for m in _STRUCTURE.finditer(text, start):
        at, char = m.start(), m.group()
        if in_string:
            if at == escaped_at:
                continue
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif depth == 0:
            if char in opens:
                depth, begin = 1, at
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                yield begin, at + 1
    if depth > 0:
        yield begin, None


def parse_llama3_json(text: str) -> list[ParsedCall]:
    """Every top-level JSON object in the turn as a call (``parameters`` or ``arguments``)."""
    calls: list[ParsedCall] = []
    body = text.replace(PYTHON_TAG, "")
    for begin, end in json_spans(body):
        if end is None:
            calls.append(ParsedCall(None, None, "unterminated tool call (JSON not closed)", ""))
            break
        raw = body[begin:end]
        try:
            value = load_json(raw)
        except UnreadableJSON as exc:
            calls.append(ParsedCall(None, None, f"tool call {exc}", raw))
            continue
        calls.append(call_from_json(value, raw, ("parameters", "arguments")))
    return calls


def parse_mistral(text: str) -> list[ParsedCall]:
    """The JSON list after each ``[TOOL_CALLS]`` marker."""
    calls: list[ParsedCall] = []
    at = text.find(MISTRAL_CALLS)
    while at >= 0:
        start = at + len(MISTRAL_CALLS)
        nxt = text.find(MISTRAL_CALLS, start)
        segment = text[start : nxt if nxt >= 0 else len(text)]
        span = next(json_spans(segment, opens="[{"), None)
        if span is None:
            calls.append(ParsedCall(None, None, "[TOOL_CALLS] without a JSON list", segment))
        elif span[1] is None:
            calls.append(ParsedCall(None, None, "unterminated tool call (JSON not closed)", ""))
        else:
            calls.extend(_calls_from_json_text(segment[span[0] : span[1]], ("arguments",)))
        at = nxt
    return calls


# -- writing calls --------------------------------------------------------------------------------
def _call_object(call: Call, argument_key: str = "arguments") -> dict[str, Any]:
    name, arguments = call
    return {"name": name, argument_key: arguments}


def render_hermes(calls: Sequence[Call]) -> str:
    return "\n".join(
        f"{TOOL_CALL_OPEN}{json.dumps(_call_object(c))}{TOOL_CALL_CLOSE}" for c in calls
    )


def render_tool_call_list(calls: Sequence[Call]) -> str:
    return f"{TOOL_CALL_OPEN}{json.dumps([_call_object(c) for c in calls])}{TOOL_CALL_CLOSE}"


def render_llama3_json(calls: Sequence[Call]) -> str:
    return "\n".join(json.dumps(_call_object(c, "parameters")) for c in calls)


def render_mistral(calls: Sequence[Call]) -> str:
    return MISTRAL_CALLS + json.dumps([_call_object(c) for c in calls])


_SCHEMAS_FOLLOW = "The tools, one JSON schema per line:"

HERMES = ChatFormat(
    name="hermes",
    tool_role="tool",
    instructions=(
        'Call a tool by writing <tool_call>{"name": <tool name>, "arguments": <JSON object>}'
        f"</tool_call>. {_SCHEMAS_FOLLOW}"
    ),
    parse_calls=parse_tool_calls,
    render_calls=render_hermes,
    markers=(TOOL_CALL_OPEN,),
)
TOOL_CALL_LIST = ChatFormat(
    name="tool_call_list",
    tool_role="tool",
    instructions=(
        'Call tools by writing <tool_call>[{"name": <tool name>, "arguments": <JSON object>}, …]'
        f"</tool_call>, a JSON list of calls. {_SCHEMAS_FOLLOW}"
    ),
    parse_calls=parse_tool_call_list,
    render_calls=render_tool_call_list,
)
LLAMA3_JSON = ChatFormat(
    name="llama3_json",
    tool_role="ipython",
    instructions=(
        'Call a tool by answering with only a JSON object {"name": <tool name>, "parameters": '
        f"<JSON object>}}. {_SCHEMAS_FOLLOW}"
    ),
    parse_calls=parse_llama3_json,
    render_calls=render_llama3_json,
    markers=(PYTHON_TAG, "ipython"),
)
MISTRAL = ChatFormat(
    name="mistral",
    tool_role="tool",
    instructions=(
        'Call tools by writing [TOOL_CALLS][{"name": <tool name>, "arguments": <JSON object>}, …]'
        f". {_SCHEMAS_FOLLOW}"
    ),
    parse_calls=parse_mistral,
    render_calls=render_mistral,
    markers=(MISTRAL_CALLS,),
)

#: Every format by its ``chat_format`` name.
CHAT_FORMATS: dict[str, ChatFormat] = {
    f.name: f for f in (HERMES, TOOL_CALL_LIST, LLAMA3_JSON, MISTRAL)
}
#: The ``chat_format`` values: ``auto`` or a format's name.
CHAT_FORMAT_NAMES = ("auto", *CHAT_FORMATS)


def detect_format(template: str | None) -> ChatFormat:
    """The format a chat template implies: Mistral's or Llama 3's markers, else ``hermes`` (ours;
    also what a template that knows no tools gets, with its instructions in the prompt)."""
    text = template or ""
    for fmt in (MISTRAL, LLAMA3_JSON, HERMES):
        if any(marker in text for marker in fmt.markers):
            return fmt
    return HERMES


def resolve_format(name: str, template: str | None) -> ChatFormat:
    """The format named by a ``chat_format`` value (``auto``: :func:`detect_format`)."""
    if name == "auto":
        return detect_format(template)
    try:
        return CHAT_FORMATS[name]
    except KeyError:
        known = ", ".join(CHAT_FORMAT_NAMES)
        raise ValueError(f"chat_format '{name}': unknown (known: {known})") from None


__all__ = [
    "CHAT_FORMATS",
    "CHAT_FORMAT_NAMES",
    "HERMES",
    "LLAMA3_JSON",
    "MISTRAL",
    "TOOL_CALL_LIST",
    "ChatFormat",
    "detect_format",
    "json_spans",
    "parse_llama3_json",
    "parse_mistral",
    "parse_tool_call_list",
    "resolve_format",
]
