"""Demonstrations for SFT: tool-using conversations, and their ids exactly as a rollout has them.

A :class:`Demonstration` is a list of chat messages (``system``, ``user``, ``assistant``,
``tool``) and the OpenAI-style schemas of the tools it may call. :func:`encode_demonstration`
turns one into ``(input_ids, assistant_mask)`` the way the rollout engine builds a trajectory
(:mod:`mtrl_local.rollout.episode`): the prompt once, then per assistant turn the ids a sampler
that stopped on eos returns (mask 1), then the template's glue and the messages up to the next
turn (mask 0). So SFT trains on the very ids RL will later sample and score, in the model's own
chat format; a test compares the two.

Demonstrations come from a JSONL file (:func:`read_demonstrations`), one conversation a line:
``{"messages": [...], "tools": [...]}``, which is also what ``mtrl export noisy`` writes (its
extra keys are ignored), or from a task's expert program (:func:`expert_demonstrations`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtrl_local.errors import UserError
from mtrl_local.jsonl import read_jsonl
from mtrl_local.rollout_files import ROLES
from mtrl_local.task import ExpertTask

if TYPE_CHECKING:  # the codec pulls in transformers; reading a file needs none of it
    from mtrl_local.chat_codec import ChatCodec

Message = dict[str, Any]
#: The tool schemas of a task, by its name (the CLI resolves names; the library never does).
ToolsFor = Callable[[str], list[dict[str, Any]]]


@dataclass(frozen=True)
class Demonstration:
    """One conversation to imitate, and the tools its prompt offers."""

    messages: list[Message]
    #: OpenAI-style function schemas (``{"type": "function", "function": {...}}``).
    tools: list[dict[str, Any]]
    #: Where it came from (``file:line``, or the task and case): every error about it names this.
    source: str = "demonstration"


def check_messages(messages: Any) -> str | None:
    """Why ``messages`` is not a demonstration's conversation (``"field 'x' …"``), or ``None``.

    Each message has a known role; content is a string (an assistant's may be null when it only
    calls tools); the conversation opens with something other than an assistant turn, has at
    least one, and never has two assistant turns in a row (each turn ends with eos and the next
    needs its header, which only messages between them bring).
    """
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list"
    previous = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"field 'messages[{i}]' must be an object"
        role = m.get("role")
        if role not in ROLES:
            return f"field 'messages[{i}].role' must be one of {', '.join(ROLES)}"
        content = m.get("content")
        if not isinstance(content, str) and not (role == "assistant" and content is None):
            return f"field 'messages[{i}].content' must be a string"
        calls = m.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)):
            return f"field 'messages[{i}].tool_calls' must be a list, on an assistant message"
        if role == "assistant" and i == 0:
            return "field 'messages[0]': a demonstration opens with system/user messages"
        if role == "assistant" and previous == "assistant":
            return f"field 'messages[{i}]': two assistant messages in a row"
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        return "field 'messages': no assistant message (nothing to learn)"
    return None


def _tools_of(obj: dict[str, Any], tools_for: ToolsFor | None) -> list[dict[str, Any]] | str:
    """The record's tool schemas, or why it has none. A JSON string holding the list is read
    (datasets often store it so); a record of a named task without ``tools`` (an older
    ``mtrl export``) gets that task's schemas from ``tools_for``."""
    tools = obj.get("tools")
    if tools is None and isinstance(obj.get("task"), str) and tools_for is not None:
        return tools_for(obj["task"])
    if tools is None:
        return "field 'tools' is missing (a list of OpenAI-style function schemas; [] for none)"
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (json.JSONDecodeError, RecursionError):
            return "field 'tools' is a string that is not a JSON list"
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return "field 'tools' must be a list of objects (OpenAI-style function schemas)"
    return tools


def demonstration_from_record(
    obj: dict[str, Any], source: str, tools_for: ToolsFor | None = None
) -> Demonstration:
    """The demonstration of one JSONL record; ``"<source>: …"`` when it is not one."""
    why = (
        check_messages(obj.get("messages")) if "messages" in obj else "field 'messages' is missing"
    )
    if why:
        raise UserError(f"{source}: {why}")
    tools = _tools_of(obj, tools_for)
    if isinstance(tools, str):
        raise UserError(f"{source}: {tools}")
    return Demonstration([dict(m) for m in obj["messages"]], tools, source)


def read_demonstrations(
    path: str | os.PathLike[str], tools_for: ToolsFor | None = None
) -> list[Demonstration]:
    """Every demonstration of a JSONL file; ``"<file>:<line>: …"`` on the first bad line, and
    an error for a file with none."""
    demos = [
        demonstration_from_record(obj, f"{path}:{lineno}", tools_for)
        for lineno, obj in read_jsonl(path)
    ]
    if not demos:
        raise UserError(f"{path}: no demonstrations in file")
    return demos


def expert_demonstrations(
    task: ExpertTask,
    cases: Sequence[Any],
    *,
    noise_rate: float,
    per_case: int = 1,
    seed: int = 0,
) -> Iterator[Demonstration]:
    """The task's expert on each case, ``per_case`` times with noise seeds ``seed·1000 + k``:
    what ``mtrl export noisy`` writes, made lazily (take only as many as needed)."""
    for case in cases:
        for k in range(per_case):
            run = task.run_expert(
                case, seed=seed, noise_rate=noise_rate, noise_seed=seed * 1000 + k
            )
            source = f"{task.name} case {case.case_id} (noise seed {seed * 1000 + k})"
            yield Demonstration(list(run.messages), list(run.tools), source)


def encode_demonstration(codec: ChatCodec, demo: Demonstration) -> tuple[list[int], list[int]]:
    """``(input_ids, assistant_mask)`` of ``demo``, built as the rollout engine builds a trajectory.

    ``codec.encode_prompt`` of the messages before the first assistant turn (with the tools);
    per assistant turn ``codec.encode_assistant`` of its text in the codec's format (mask 1, the
    eos included: the model learns to stop); between turns ``codec.encode_continuation`` of the
    messages there (mask 0; tool results get the format's role). Messages after the last
    assistant turn are dropped: a rollout ends at the last sampled eos.
    """
    why = check_messages(demo.messages)
    if why:
        raise UserError(f"{demo.source}: {why}")
    messages = demo.messages
    first = next(k for k, m in enumerate(messages) if m["role"] == "assistant")
    ids = codec.encode_prompt(messages[:first], demo.tools)
    mask = [0] * len(ids)
    turns = [k for k in range(first, len(messages)) if messages[k]["role"] == "assistant"]
    for k, nxt in zip(turns, [*turns[1:], None], strict=True):
        try:
            text = codec.assistant_text_of(messages[k])
        except UserError as exc:
            raise UserError(f"{demo.source}: messages[{k}].{exc}") from None
        sampled = codec.encode_assistant(text)
        glue = [] if nxt is None else codec.encode_continuation(messages[k + 1 : nxt])
        ids += sampled + glue
        mask += [1] * len(sampled) + [0] * len(glue)
    return ids, mask


__all__ = [
    "Demonstration",
    "ToolsFor",
    "check_messages",
    "demonstration_from_record",
    "encode_demonstration",
    "expert_demonstrations",
    "read_demonstrations",
]
