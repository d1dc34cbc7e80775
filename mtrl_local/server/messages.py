"""OpenAI messages on the wire, and one sampled turn as both returned and recorded.

:func:`normalise` is what two turns of an episode are compared by (role, text, the calls an
assistant made — not call ids or whitespace); :func:`make_choice` turns a sampler result into the
OpenAI message the agent gets (``<tool_call>`` blocks parsed into ``tool_calls``, stop strings
applied) and the ids/logprobs the trainer gets (cut at the same token).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from mtrl_local.env.actions import TOOL_CALL_RE, parse_tool_calls
from mtrl_local.rollout.sampler import GenerationResult, SampleFinish

Message = dict[str, Any]
#: A message as compared between turns: role, text, and for assistants the calls it made.
WireMessage = tuple[Any, ...]


class EpisodeError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, ``code`` OpenAI's error code."""

    def __init__(self, status: int, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# -- message normalisation ------------------------------------------------------------------------
def message_text(content: Any) -> str:
    """OpenAI ``content`` (string, list of parts or null) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise EpisodeError(400, "only text content parts are supported")
        return "".join(parts)
    return json.dumps(content)


def _canonical_args(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return json.dumps(arguments, sort_keys=True)


def _calls_of(message: Message) -> tuple[tuple[str, str], ...]:
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or call
        out.append((str(fn.get("name")), _canonical_args(fn.get("arguments", {}))))
    return tuple(out)


def normalise(message: Message) -> WireMessage:
    """The parts of a message that must not change between turns (ids and whitespace may)."""
    role = {"developer": "system", "function": "tool"}.get(message["role"], message["role"])
    text = message_text(message.get("content"))
    if role == "assistant":
        return (role, text.strip(), _calls_of(message))
    return (role, text)


def encodable(messages: Iterable[Message]) -> list[Message]:
    """Messages in the form our chat template renders (roles mapped, content as text)."""
    out: list[Message] = []
    for m in messages:
        role = {"developer": "system", "function": "tool"}.get(m["role"], m["role"])
        item: Message = {"role": role, "content": message_text(m.get("content"))}
        if role == "assistant" and m.get("tool_calls"):
            item["tool_calls"] = [
                {"name": n, "arguments": json.loads(a) if a.startswith(("{", "[")) else a}
                for n, a in _calls_of(m)
            ]
        if m.get("name"):
            item["name"] = m["name"]
        out.append(item)
    return out


def tools_key(tools: Sequence[dict[str, Any]] | None) -> str:
    return json.dumps(list(tools or []), sort_keys=True)


# -- one sampled choice ----------------------------------------------------------------------------
@dataclass
class Choice:
    """One sampled completion, as recorded (ids, logprobs) and as returned (OpenAI message)."""

    ids: list[int]
    logprobs: list[float]
    #: The sampler's finish (``stop`` also when a stop string cut the turn).
    finish: SampleFinish
    #: Decoded text of ``ids`` (without the eos): what the trajectory shows.
    text: str
    #: The OpenAI message returned to the agent.
    message: Message
    #: ``stop``, ``length`` or ``tool_calls``: the OpenAI finish reason.
    finish_reason: str
    #: The turn does not end with a sampled eos (cut by the budget or a stop string): an eos that
    #: the model did not sample (mask 0) closes it before the next messages.
    needs_eos: bool
    tool_calls: int = 0
    malformed_calls: int = 0
    stop_cut: bool = False

    @property
    def wire(self) -> WireMessage:
        return normalise(self.message)

    def display(self) -> Message:
        """The assistant message of the trajectory: raw model text, calls as the env records."""
        out: Message = {"role": "assistant", "content": self.text}
        calls = [c for c in parse_tool_calls(self.text) if c.error is None]
        if calls:
            out["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in calls]
        return out


def make_choice(
    tokenizer: PreTrainedTokenizerBase,
    result: GenerationResult,
    *,
    eos_token_id: int,
    stop: Sequence[str] = (),
    parse_tools: bool = True,
    call_id_prefix: str = "call",
) -> Choice:
    """Turn a sampler result into what is returned and what is recorded.

    A stop string ends the turn at the token that completes it: the ids after it are dropped
    (never trained on), the returned text ends before it, as OpenAI's does.
    """
    ids, logprobs, finish = list(result.token_ids), list(result.logprobs), result.finish_reason
    stopped = finish == "stop" and bool(ids) and ids[-1] == eos_token_id
    body = ids[:-1] if stopped else ids
    text = str(tokenizer.decode(body, skip_special_tokens=False))
    returned = text
    stop_cut = False
    cut = _cut_at_stop(tokenizer, body, text, stop)
    if cut is not None:
        k, text, returned = cut
        ids, logprobs = body[:k], logprobs[:k]
        finish, stop_cut, stopped = "stop", True, False
    content, malformed = returned, 0
    calls: list[dict[str, Any]] = []
    if parse_tools:
        content, calls, malformed = _openai_tool_calls(returned, call_id_prefix)
    message: Message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = calls
    if finish == "length" and not stop_cut:
        reason = "length"
    elif calls:
        reason = "tool_calls"
    else:
        reason = "stop"
    return Choice(
        ids=ids,
        logprobs=logprobs,
        finish=finish,
        text=text,
        message=message,
        finish_reason=reason,
        needs_eos=not stopped,
        tool_calls=len(calls) + malformed,
        malformed_calls=malformed,
        stop_cut=stop_cut,
    )


__all__ = [
    "Choice",
    "EpisodeError",
    "Message",
    "WireMessage",
    "encodable",
    "make_choice",
    "message_text",
    "normalise",
    "tools_key",
]


def _cut_at_stop(
    tokenizer: PreTrainedTokenizerBase, body: list[int], text: str, stop: Sequence[str]
) -> tuple[int, str, str] | None:
    """Where the first stop string ends the turn: ``(ids kept, their text, the text returned)``
    (the shortest prefix of ids whose text contains it), or ``None``."""
    hits = [(text.find(s), s) for s in stop if s in text]
    if not hits:
        return None
    _, s = min(hits)
    for k in range(1, len(body) + 1):
        prefix = str(tokenizer.decode(body[:k], skip_special_tokens=False))
        if s in prefix:
            return k, prefix, prefix[: prefix.find(s)]
    return len(body), text, text[: text.find(s)]


def _openai_tool_calls(text: str, call_id_prefix: str) -> tuple[str, list[dict[str, Any]], int]:
    """``(content without the well-formed call blocks, OpenAI tool_calls, malformed count)``."""
    parsed = parse_tool_calls(text)
    malformed = sum(c.error is not None for c in parsed)

    def strip_valid(m: re.Match[str]) -> str:
        call = parse_tool_calls(m.group(0))
        return "" if call and call[0].error is None else m.group(0)

    content = TOOL_CALL_RE.sub(strip_valid, text).strip()
    calls = [
        {
            "id": f"{call_id_prefix}_{k}",
            "type": "function",
            "function": {
                "name": call.name,
                "arguments": json.dumps(call.arguments, ensure_ascii=False),
            },
        }
        for k, call in enumerate(c for c in parsed if c.error is None)
    ]
    return content, calls, malformed
