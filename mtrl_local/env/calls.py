"""Running one tool call so that nothing the tool does can take the rollout down.

:func:`run_tool` turns every outcome of a call into a :class:`ToolResult`: a value (encoded as
JSON unless it is a string), an argument mistake, a :class:`ToolError`, any exception — including
``BaseException`` subclasses such as ``SystemExit`` or ``GeneratorExit`` — and a value JSON cannot
encode. Every content is capped at ``max_chars`` and made encodable as UTF-8 (a lone surrogate
would otherwise fail later, when the trajectory is tokenised or written).

:class:`ToolCall` runs :func:`run_tool` on a daemon worker thread so the caller can stop waiting
after a timeout. Python cannot kill a thread: a call that times out keeps running in the
background, and the environment that owns it must be treated as abandoned (see
:meth:`~mtrl_local.env.Environment.call_tool`).

``KeyboardInterrupt`` is the user's Ctrl-C. Signals are delivered to the main thread only, so one
raised on a worker thread was raised by the tool itself and becomes an error result, while one
that reaches the waiting caller (or a tool run inline, on the caller's thread) propagates and
stops the program as the user asked.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from mtrl_local.env.tools import Tool, ToolArgumentError

ERROR_PREFIX = "error: "
TRUNCATION_MARKER = "…[truncated {n} chars]"
#: The caller waits in slices this long, so a Ctrl-C delivered while it waits is seen promptly.
_WAIT_SLICE_S = 0.1


@dataclass(frozen=True)
class ToolLimits:
    """Per-run overrides of an environment's tool limits (``None`` keeps the environment's own):
    ``timeout_s`` per call (0 runs tools inline, with no timeout) and ``max_output_chars`` of
    each result."""

    timeout_s: float | None = None
    max_output_chars: int | None = None


class ToolError(Exception):
    """Raised by a tool to send a specific, expected error message to the agent."""


@dataclass(frozen=True)
class ToolResult:
    """What a tool call returned to the agent. ``error`` marks results counted in tool_errors;
    ``timed_out`` marks a call abandoned at the environment's tool timeout."""

    name: str
    content: str
    error: bool = False
    truncated: bool = False
    timed_out: bool = False


def describe(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when the exception's own ``__str__`` fails."""
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def cap_result(name: str, content: str, max_chars: int, *, error: bool = False) -> ToolResult:
    """A result whose content is at most ``max_chars`` (plus a marker) and valid UTF-8."""
    truncated = len(content) > max_chars
    if truncated:
        content = content[:max_chars] + TRUNCATION_MARKER.format(n=len(content) - max_chars)
    safe = content.encode("utf-8", "replace").decode("utf-8")
    return ToolResult(name, safe, error=error, truncated=truncated)


def error_result(name: str, message: str, max_chars: int) -> ToolResult:
    """An ``error: …`` result, capped like any other content."""
    return cap_result(name, ERROR_PREFIX + message, max_chars, error=True)


def _encode(name: str, value: Any, max_chars: int) -> ToolResult:
    """A tool's return value as the agent's text: strings as they are, the rest as JSON."""
    if isinstance(value, str):
        return cap_result(name, str.__str__(value), max_chars)
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    except (TypeError, ValueError, RecursionError):
        kind = type(value).__name__
        message = f"tool {name} returned a value that is not JSON-serialisable ({kind})"
        return error_result(name, message, max_chars)
    return cap_result(name, text, max_chars)


def run_tool(tool: Tool, arguments: Any, max_chars: int) -> ToolResult:
    """Validate, call and encode; every failure of the tool is an error result.

    Only ``KeyboardInterrupt`` propagates (see the module docstring).
    """
    name = tool.name
    try:
        return _encode(name, tool.invoke(arguments), max_chars)
    except KeyboardInterrupt:
        raise
    except (ToolArgumentError, ToolError) as exc:
        return error_result(name, describe(exc), max_chars)
    except BaseException as exc:  # a tool bug, even sys.exit, must not end the rollout
        return error_result(
            name, f"tool {name} failed: {type(exc).__name__}: {describe(exc)}", max_chars
        )


class ToolCall:
    """One tool call running on its own daemon thread; :meth:`wait` gives up at a deadline."""

    def __init__(self, tool: Tool, arguments: Any, max_chars: int) -> None:
        self.name = tool.name
        self.future: Future[ToolResult] = Future()
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run,
            args=(self._work, tool, arguments, max_chars),
            name=f"mtrl-tool-{tool.name}",
            daemon=True,
        )

    def start(self) -> ToolCall:
        """Start the worker thread; returns ``self``."""
        self._thread.start()
        return self

    def _work(self, tool: Tool, arguments: Any, max_chars: int) -> None:
        """Run the call and always resolve the future, whatever escapes :func:`run_tool`."""
        result = ToolResult(self.name, f"{ERROR_PREFIX}tool {self.name} failed", error=True)
        try:
            result = run_tool(tool, arguments, max_chars)
        except BaseException as exc:  # the tool's own KeyboardInterrupt, or a failure to report
            try:
                message = f"tool {self.name} failed: {type(exc).__name__}: {describe(exc)}"
                result = error_result(self.name, message, max_chars)
            except BaseException:
                pass  # keep the short fallback result
        finally:
            self.future.set_result(result)

    def wait(self, timeout_s: float) -> ToolResult | None:
        """The call's result, or ``None`` if it has not finished within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                return self.future.result(timeout=min(remaining, _WAIT_SLICE_S))
            except FutureTimeout:
                continue
