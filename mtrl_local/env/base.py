"""Environments and episodes.

An :class:`Environment` instance is one episode's world: ``reset(case, seed)`` builds its state and
returns the opening messages, :meth:`Environment.call_tool` dispatches a call to a ``@tool`` method,
and :meth:`Environment.close` releases whatever ``reset`` allocated. :class:`Episode` drives an
environment with raw assistant text (what a model or a scripted policy wrote), enforces
``max_turns``, counts tool calls and errors, and closes the environment in a ``finally`` whatever
happens — final answer, turn limit or an exception.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from mtrl_local.env.actions import has_final_response, parse_tool_calls
from mtrl_local.env.tools import Tool, ToolArgumentError

logger = logging.getLogger(__name__)

Message = dict[str, Any]
DoneReason = Literal["final_answer", "no_action", "max_turns", "error", "aborted"]

ERROR_PREFIX = "error: "
TRUNCATION_MARKER = "…[truncated {n} chars]"


class ToolError(Exception):
    """Raised by a tool to send a specific, expected error message to the agent."""


@dataclass(frozen=True)
class ToolResult:
    """What a tool call returned to the agent. ``error`` marks results counted in tool_errors."""

    name: str
    content: str
    error: bool = False
    truncated: bool = False


def _format_output(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


class Environment:
    """Base class for one episode's world. Subclasses define ``@tool`` methods and ``setup``.

    Override :meth:`setup` (allocate per-episode state from the case and seed),
    :meth:`initial_messages` (system + user turns) and :meth:`teardown` (release state). Tools are
    methods decorated with :func:`~mtrl_local.env.tools.tool`.
    """

    #: Tool outputs longer than this are cut and end with a truncation marker.
    max_tool_output_chars: int = 4000

    def __init__(self, max_tool_output_chars: int | None = None) -> None:
        if max_tool_output_chars is not None:
            self.max_tool_output_chars = max_tool_output_chars
        self._tools: dict[str, Tool] = {}
        for attr in dir(type(self)):
            fn = getattr(type(self), attr, None)
            if callable(fn) and getattr(fn, "__mtrl_tool__", False):
                bound = getattr(self, attr)
                self._tools[attr] = Tool.from_callable(bound, name=attr)
        self._open = False
        self.case: Any = None
        self.seed: int = 0

    # -- the episode lifecycle -------------------------------------------------------------
    def reset(self, case: Any, seed: int = 0) -> list[Message]:
        """Allocate state for ``case`` with ``seed``; return the opening messages."""
        if self._open:
            self.close()
        self.case = case
        self.seed = seed
        self._open = True
        try:
            self.setup(case, seed)
            return self.initial_messages(case)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release per-episode state. Idempotent; safe after a failed ``reset``."""
        if not self._open:
            return
        self._open = False
        self.teardown()

    # -- hooks -----------------------------------------------------------------------------
    def setup(self, case: Any, seed: int) -> None:
        """Build the per-episode state (override)."""

    def teardown(self) -> None:
        """Release the per-episode state (override)."""

    def initial_messages(self, case: Any) -> list[Message]:
        """The system and user turns that open the episode (override)."""
        raise NotImplementedError

    # -- tools -----------------------------------------------------------------------------
    @property
    def tools(self) -> list[Tool]:
        """The tools exposed to the agent, sorted by name (stable schema order)."""
        return [self._tools[k] for k in sorted(self._tools)]

    def tool_schemas(self) -> list[dict[str, Any]]:
        """OpenAI-style schemas of :attr:`tools`."""
        return [t.schema() for t in self.tools]

    def call_tool(self, name: Any, arguments: Any) -> ToolResult:
        """Dispatch one call. Never raises for anything the agent did wrong."""
        label = name if isinstance(name, str) else "?"
        if not isinstance(name, str) or name not in self._tools:
            return ToolResult(label, f"{ERROR_PREFIX}unknown tool '{label}'", error=True)
        if not self._open:
            return ToolResult(name, f"{ERROR_PREFIX}environment is closed", error=True)
        tool = self._tools[name]
        try:
            value = tool.invoke(arguments)
        except ToolArgumentError as exc:
            return ToolResult(name, f"{ERROR_PREFIX}{exc}", error=True)
        except ToolError as exc:
            return ToolResult(name, f"{ERROR_PREFIX}{exc}", error=True)
        except Exception as exc:  # a tool bug must not end the rollout
            logger.debug("tool %s raised", name, exc_info=True)
            return ToolResult(
                name, f"{ERROR_PREFIX}tool {name} failed: {type(exc).__name__}: {exc}", error=True
            )
        content = _format_output(value)
        limit = self.max_tool_output_chars
        if len(content) > limit:
            cut = len(content) - limit
            return ToolResult(
                name, content[:limit] + TRUNCATION_MARKER.format(n=cut), truncated=True
            )
        return ToolResult(name, content)


@dataclass
class StepResult:
    """What :meth:`Episode.step` returns: messages to append and whether the episode ended."""

    messages: list[Message]
    done: bool
    results: list[ToolResult] = field(default_factory=list)


@dataclass
class EpisodeStats:
    """Counters of one episode (logged per trajectory)."""

    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated_tool_outputs: int = 0
    done_reason: DoneReason | None = None


class Episode:
    """Drives an :class:`Environment` with assistant text, enforcing ``max_turns``.

    Use as a context manager (or call :meth:`close`) so teardown always runs::

        with Episode(env, case, seed=0, max_turns=12) as ep:
            messages = ep.reset()
            while not ep.done:
                ep.step(policy(messages))
    """

    def __init__(self, env: Environment, case: Any, seed: int = 0, max_turns: int = 16) -> None:
        if max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        self.env = env
        self.case = case
        self.seed = seed
        self.max_turns = max_turns
        self.messages: list[Message] = []
        self.stats = EpisodeStats()
        self.done = False

    def __enter__(self) -> Episode:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and not self.done:
            self._finish("error")
        self.close()

    def reset(self) -> list[Message]:
        """Open the episode; returns the opening messages (also kept in :attr:`messages`)."""
        self.messages = list(self.env.reset(self.case, self.seed))
        return list(self.messages)

    def step(self, assistant_text: str) -> StepResult:
        """Append the assistant turn, run its tool calls, and return the tool messages.

        A turn with a ``<final_response>`` block, or with no tool call at all, ends the episode.
        Reaching ``max_turns`` ends it too. The environment is closed as soon as it ends.
        """
        if self.done:
            raise RuntimeError("episode is already done")
        self.stats.turns += 1
        calls = [] if has_final_response(assistant_text) else parse_tool_calls(assistant_text)
        message: Message = {"role": "assistant", "content": assistant_text}
        if calls:
            message["tool_calls"] = [
                {"name": c.name, "arguments": c.arguments} for c in calls if c.error is None
            ]
        self.messages.append(message)
        if not calls:
            self._finish("final_answer" if has_final_response(assistant_text) else "no_action")
            return StepResult([], True)
        out: list[Message] = []
        results: list[ToolResult] = []
        try:
            for call in calls:
                if call.error is not None:
                    result = ToolResult("?", f"{ERROR_PREFIX}{call.error}", error=True)
                else:
                    result = self.env.call_tool(call.name, call.arguments)
                self.stats.tool_calls += 1
                self.stats.tool_errors += int(result.error)
                self.stats.truncated_tool_outputs += int(result.truncated)
                results.append(result)
                out.append({"role": "tool", "name": result.name, "content": result.content})
        except BaseException:
            self._finish("error")
            raise
        self.messages.extend(out)
        if self.stats.turns >= self.max_turns:
            self._finish("max_turns")
            return StepResult(out, True, results)
        return StepResult(out, False, results)

    def abort(self, reason: DoneReason = "aborted") -> None:
        """End the episode from outside (e.g. the model's turn failed); closes the environment."""
        if not self.done:
            self._finish(reason)

    def _finish(self, reason: DoneReason) -> None:
        self.done = True
        self.stats.done_reason = reason
        self.close()

    def close(self) -> None:
        """Tear the environment down (idempotent)."""
        self.env.close()


def run_episode(
    env: Environment,
    case: Any,
    act: Callable[[list[Message]], str],
    seed: int = 0,
    max_turns: int = 16,
) -> Episode:
    """Run one episode to the end with ``act(messages) -> assistant text``; always closes."""
    episode = Episode(env, case, seed=seed, max_turns=max_turns)
    with episode:
        episode.reset()
        while not episode.done:
            episode.step(act(list(episode.messages)))
    return episode
