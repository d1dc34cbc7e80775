"""Environments and episodes.

An :class:`Environment` instance is one episode's world: ``reset(case, seed)`` builds its state and
returns the opening messages, :meth:`Environment.call_tool` dispatches a call to a ``@tool`` method,
and :meth:`Environment.close` releases whatever ``reset`` allocated. :class:`Episode` drives an
environment with raw assistant text (what a model or a scripted policy wrote), enforces
``max_turns``, counts tool calls and errors, and closes the environment in a ``finally`` whatever
happens — final answer, turn limit or an exception.

Tool calls are guarded in one place, :meth:`Environment.call_tool` (the rollout engine, the
suite's expert and the rollout server's agents all go through it): a per-call timeout, an output
cap, and every failure of a tool — ``sys.exit`` included — as an ``error: …`` result
(:mod:`mtrl_local.env.calls`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from mtrl_local.env.actions import ParsedCall, has_final_response, parse_tool_calls
from mtrl_local.env.calls import ERROR_PREFIX as ERROR_PREFIX  # re-exported (rollout counters)
from mtrl_local.env.calls import ToolCall, ToolResult, error_result, run_tool
from mtrl_local.env.calls import ToolError as ToolError  # re-exported: tools raise it
from mtrl_local.env.tools import Tool

logger = logging.getLogger(__name__)

Message = dict[str, Any]
DoneReason = Literal["final_answer", "no_action", "max_turns", "error", "aborted"]


class Environment:
    """Base class for one episode's world. Subclasses define ``@tool`` methods and ``setup``.

    Override :meth:`setup` (allocate per-episode state from the case and seed),
    :meth:`initial_messages` (system + user turns) and :meth:`teardown` (release state). Tools are
    methods decorated with :func:`~mtrl_local.env.tools.tool`.

    Tools run on a worker thread, one call at a time, so that a call can be given up after
    :attr:`tool_timeout_s`; state built in ``setup`` must therefore be usable from another thread
    (e.g. ``sqlite3.connect(..., check_same_thread=False)``). An environment whose tools need the
    caller's thread sets ``tool_timeout_s = 0`` and runs them inline, without a timeout.
    """

    #: Tool outputs (and error messages) longer than this are cut and end with a marker.
    max_tool_output_chars: int = 4000
    #: Seconds one tool call may run before the agent gets a timeout error and the environment is
    #: abandoned; 0 or less runs tools inline on the caller's thread, with no timeout.
    tool_timeout_s: float = 30.0

    _stuck_calls: ClassVar[int] = 0
    _stuck_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self, max_tool_output_chars: int | None = None, tool_timeout_s: float | None = None
    ) -> None:
        self.set_limits(max_tool_output_chars=max_tool_output_chars, tool_timeout_s=tool_timeout_s)
        self._tools: dict[str, Tool] = {}
        for attr in dir(type(self)):
            fn = getattr(type(self), attr, None)
            if callable(fn) and getattr(fn, "__mtrl_tool__", False):
                bound = getattr(self, attr)
                self._tools[attr] = Tool.from_callable(bound, name=attr)
        self._open = False
        self.case: Any = None
        self.seed: int = 0
        self._stuck: ToolCall | None = None
        self._stuck_running = False
        self._teardown_deferred = False
        self._state_lock = threading.Lock()

    def set_limits(
        self, *, max_tool_output_chars: int | None = None, tool_timeout_s: float | None = None
    ) -> None:
        """Override the class defaults of the tool limits for this instance (``None``: keep)."""
        if max_tool_output_chars is not None:
            if max_tool_output_chars < 1:
                raise ValueError("max_tool_output_chars must be >= 1")
            self.max_tool_output_chars = max_tool_output_chars
        if tool_timeout_s is not None:
            if math.isnan(tool_timeout_s):
                raise ValueError("tool_timeout_s must be a number of seconds")
            self.tool_timeout_s = tool_timeout_s

    # -- the episode lifecycle -------------------------------------------------------------
    def reset(self, case: Any, seed: int = 0) -> list[Message]:
        """Allocate state for ``case`` with ``seed``; return the opening messages.

        Refused (``RuntimeError``) while a call abandoned in the previous episode still runs: its
        thread may still touch the state that a new episode would build.
        """
        if self._open:
            self.close()
        if self._stuck_running:
            name = self._stuck.name if self._stuck is not None else "?"
            raise RuntimeError(
                f"tool {name} of the previous episode is still running; this environment"
                " cannot be reused (make a new one)"
            )
        self._stuck = None
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
        """Release per-episode state. Idempotent; safe after a failed ``reset``.

        While an abandoned call still runs, teardown is deferred: it runs on that call's worker
        thread when the call returns (if it ever does), never under its feet.
        """
        if not self._open:
            return
        self._open = False
        with self._state_lock:
            if self._stuck_running:
                self._teardown_deferred = True
                return
        self.teardown()

    # -- hooks -----------------------------------------------------------------------------
    def setup(self, case: Any, seed: int) -> None:
        """Build the per-episode state (override)."""

    def teardown(self) -> None:
        """Release the per-episode state (override)."""

    def initial_messages(self, case: Any) -> list[Message]:
        """The system and user turns that open the episode (override)."""
        raise NotImplementedError

    def interrupt_tools(self) -> None:
        """Ask a call that timed out to stop early (override; by default nothing can be done).

        Called on the caller's thread while the call still runs on its worker thread.
        """

    # -- tools -----------------------------------------------------------------------------
    @property
    def tools(self) -> list[Tool]:
        """The tools exposed to the agent, sorted by name (stable schema order)."""
        return [self._tools[k] for k in sorted(self._tools)]

    def tool_schemas(self) -> list[dict[str, Any]]:
        """OpenAI-style schemas of :attr:`tools`."""
        return [t.schema() for t in self.tools]

    def call_tool(self, name: Any, arguments: Any) -> ToolResult:
        """Dispatch one call. Never raises for anything the agent or the tool did wrong.

        The call runs on a worker thread for at most :attr:`tool_timeout_s`. Python cannot kill a
        thread, so a call that overruns is abandoned, not stopped: the agent gets a timeout error,
        :meth:`interrupt_tools` is asked to cut the call short, the environment answers every
        later call with an "no longer usable" error and its teardown waits for the call to
        return. The rollout goes on; the cost is a thread (and the state it holds) left running
        in the background, counted by :meth:`stuck_tool_calls` and logged. Only a
        ``KeyboardInterrupt`` (the user's Ctrl-C) propagates.
        """
        limit = self.max_tool_output_chars
        label = name if isinstance(name, str) else "?"
        if not isinstance(name, str) or name not in self._tools:
            return error_result(label, f"unknown tool '{label}'", limit)
        if not self._open:
            return error_result(name, "environment is closed", limit)
        if self._stuck is not None:
            message = f"environment is no longer usable: tool {self._stuck.name} did not finish"
            return error_result(name, message, limit)
        tool = self._tools[name]
        if self.tool_timeout_s <= 0:
            return run_tool(tool, arguments, limit)
        return self._call_with_timeout(tool, arguments)

    def _call_with_timeout(self, tool: Tool, arguments: Any) -> ToolResult:
        """Run the call on a worker thread; abandon the environment if it overruns."""
        limit = self.max_tool_output_chars
        call = ToolCall(tool, arguments, limit)
        try:
            call.start()
        except RuntimeError as exc:  # the process has run out of threads
            logger.warning("tool %s: no worker thread: %s", tool.name, exc)
            return error_result(tool.name, f"tool {tool.name} could not start", limit)
        try:
            result = call.wait(self.tool_timeout_s)
        except BaseException:  # Ctrl-C while waiting: the call runs on, the state is not ours
            self._abandon(call)
            raise
        if result is not None:
            return result
        self._abandon(call)
        message = (
            f"tool {tool.name} did not finish within {self.tool_timeout_s:g} s;"
            " the environment is no longer usable"
        )
        return replace(error_result(tool.name, message, limit), timed_out=True)

    def _abandon(self, call: ToolCall) -> None:
        """Mark the environment unusable while ``call`` runs on; teardown waits for it."""
        with self._state_lock:
            self._stuck = call
            self._stuck_running = True
        with Environment._stuck_lock:
            Environment._stuck_calls += 1
            stuck = Environment._stuck_calls
        logger.warning(
            "tool %s did not finish within %g s: %s abandoned (%d stuck calls in the process)",
            call.name,
            self.tool_timeout_s,
            type(self).__name__,
            stuck,
        )
        try:
            self.interrupt_tools()
        except Exception:
            logger.warning("interrupting tool %s failed", call.name, exc_info=True)
        call.future.add_done_callback(self._stuck_call_returned)

    def _stuck_call_returned(self, _: Future[ToolResult]) -> None:
        """On the worker thread, once an abandoned call returns: run a deferred teardown."""
        with Environment._stuck_lock:
            Environment._stuck_calls -= 1
        with self._state_lock:
            self._stuck_running = False
            deferred, self._teardown_deferred = self._teardown_deferred, False
        logger.info("abandoned tool call of %s returned", type(self).__name__)
        if deferred:
            try:
                self.teardown()
            except Exception:
                logger.warning("deferred teardown of %s failed", type(self).__name__, exc_info=True)

    @classmethod
    def stuck_tool_calls(cls) -> int:
        """Calls abandoned at their timeout that are still running, over the whole process."""
        return Environment._stuck_calls


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
    tool_timeouts: int = 0
    done_reason: DoneReason | None = None


class Episode:
    """Drives an :class:`Environment` with assistant text, enforcing ``max_turns``.

    Use as a context manager (or call :meth:`close`) so teardown always runs::

        with Episode(env, case, seed=0, max_turns=12) as ep:
            messages = ep.reset()
            while not ep.done:
                ep.step(policy(messages))
    """

    def __init__(
        self,
        env: Environment,
        case: Any,
        seed: int = 0,
        max_turns: int = 16,
        parse_calls: Callable[[str], list[ParsedCall]] = parse_tool_calls,
    ) -> None:
        if max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        self.env = env
        #: Reads the tool calls of an assistant turn (the model's chat format; ours by default).
        self.parse_calls = parse_calls
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
        calls = [] if has_final_response(assistant_text) else self.parse_calls(assistant_text)
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
                    limit = self.env.max_tool_output_chars
                    result = error_result("?", call.error, limit)
                else:
                    result = self.env.call_tool(call.name, call.arguments)
                self.stats.tool_calls += 1
                self.stats.tool_errors += int(result.error)
                self.stats.truncated_tool_outputs += int(result.truncated)
                self.stats.tool_timeouts += int(result.timed_out)
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
