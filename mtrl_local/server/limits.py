"""What the rollout server accepts: request size, JSON strictness, conversation length.

Every limit answers with an OpenAI-shaped error naming it, before the work it guards is done:

* **body size** (``max_body_bytes``, default 4 MiB): a declared ``Content-Length`` over the limit
  is a 413 before a byte is read; a chunked body is counted as it streams in and refused the
  moment it passes the limit. Nothing is parsed in either case.
* **strict JSON**: Python's ``json`` accepts ``NaN``, ``Infinity`` and ``1e400`` (parsed as
  infinity); one such reward makes a whole group's advantages NaN, which skips the step's update.
  Any non-finite number anywhere in a body is a 422 naming where it was; a body that is not UTF-8,
  not JSON, nested deeper than :data:`MAX_JSON_DEPTH` or not sent as ``application/json`` is a
  400 (415 for the content type). Bodies are parsed on a worker thread, not the event loop.
* **conversation size** (``max_request_chars``, default 500,000 characters — far beyond any
  context window we train on): a chat request whose messages and tools hold more text is a 413
  before anything is tokenised.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio.to_thread
from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mtrl_local.server.errors import RequestRejected, error_response
from mtrl_local.server.messages import EpisodeError
from mtrl_local.server.schemas import ChatMessage

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_REQUEST_CHARS = 500_000
#: Deeper than any tool schema; far below the recursion limit of the code that walks the values.
MAX_JSON_DEPTH = 64
NON_FINITE = "JSON numbers must be finite (no NaN, Infinity or values beyond ±1.8e308)"
TOO_DEEP = f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels"
#: Integer literals longer than this are beyond any float (and near Python's int-parsing limit).
_MAX_INT_DIGITS = 400


# -- body size -------------------------------------------------------------------------------------
class _Disconnected(Exception):
    """The client went away before its body was read."""


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (413) before the app sees them.

    The body is read here, counting, and handed on whole; what FastAPI reads later is that copy."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        body = None if declared is not None and declared > self.max_bytes else b""
        try:
            if body is not None:
                body = await self._read(receive)
        except _Disconnected:
            return
        if body is None:
            message = f"request body exceeds the limit of {self.max_bytes} bytes (max_body_bytes)"
            await error_response(413, message, "request_too_large")(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or ``None`` as soon as it passes the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the buffered body once, then whatever the client sends next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# -- strict JSON -----------------------------------------------------------------------------------
def parse_json_body(body: bytes) -> Any:
    """``body`` as JSON, refusing what Python's parser lets through (module docstring)."""
    try:
        value = json.loads(body, parse_int=_parse_int)
    except RecursionError:
        raise RequestRejected(400, TOO_DEEP, "invalid_json") from None
    except UnicodeDecodeError:
        raise RequestRejected(400, "the JSON body is not valid UTF-8", "invalid_json") from None
    except json.JSONDecodeError as exc:
        message = f"malformed JSON body: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        raise RequestRejected(400, message, "invalid_json") from None
    _check_values(value)
    return value


def _parse_int(literal: str) -> int | float:
    # An integer too long for any float is as unusable as Infinity: mark it so for the check.
    if len(literal) > _MAX_INT_DIGITS:
        return -math.inf if literal.startswith("-") else math.inf
    return int(literal)


def _check_values(value: Any) -> None:
    """Walk the parsed body (iteratively): refuse too much nesting and any non-finite number."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict | list):
            if len(path) >= MAX_JSON_DEPTH:
                raise RequestRejected(400, TOO_DEEP, "invalid_json")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((v, (*path, k)) for k, v in items)
        elif isinstance(node, float | int) and not isinstance(node, bool) and not _finite(node):
            message = f"non-finite number at {_path_text(path)}: {NON_FINITE}"
            raise RequestRejected(422, message, "non_finite_number")


def _finite(number: float | int) -> bool:
    if isinstance(number, float):
        return math.isfinite(number)
    return abs(number) <= sys.float_info.max


def _path_text(path: tuple[str | int, ...]) -> str:
    """``("metrics", "acc")`` → ``metrics.acc``; ``("reward", 1)`` → ``reward[1]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class StrictJSONRequest(Request):
    """A request whose JSON body FastAPI gets from :func:`parse_json_body`, run on a thread."""

    _parsed: Any = None
    _has_parsed = False

    async def json(self) -> Any:
        if not self._has_parsed:
            body = await self.body()
            self._parsed = await anyio.to_thread.run_sync(parse_json_body, body)
            self._has_parsed = True
        return self._parsed


class StrictJSONRoute(APIRoute):
    """A route that reads its body as :class:`StrictJSONRequest` and only as ``application/json``
    (FastAPI's documented seam for a custom request class)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            strict = StrictJSONRequest(request.scope, request.receive)
            if await strict.body() and not _is_json(strict.headers.get("content-type")):
                raise RequestRejected(
                    415, "Content-Type must be application/json", "unsupported_media_type"
                )
            return await handler(strict)

        return strict_handler


# -- conversation size -----------------------------------------------------------------------------
def request_chars(messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] | None) -> int:
    """The characters a chat request could make the server tokenise: message texts, names, tool
    call names and arguments, and the tool schemas (as JSON)."""
    total = len(json.dumps(list(tools))) if tools else 0
    for m in messages:
        total += len(m.name or "")
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content is not None:
            total += sum(len(str(p.get("text", ""))) for p in m.content if isinstance(p, dict))
        for call in m.tool_calls or []:
            fn = call.get("function") or call
            arguments = fn.get("arguments", "")
            total += len(str(fn.get("name", "")))
            total += len(arguments) if isinstance(arguments, str) else len(json.dumps(arguments))
    return total


def check_request_chars(
    messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] | None, limit: int
) -> None:
    """A 413 for a chat request over ``limit`` characters (:func:`request_chars`)."""
    chars = request_chars(messages, tools)
    if chars > limit:
        raise EpisodeError(
            413,
            f"the request's messages and tools hold {chars} characters, more than the limit of "
            f"{limit} (max_request_chars)",
            "request_too_large",
        )


__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_REQUEST_CHARS",
    "MAX_JSON_DEPTH",
    "BodyLimit",
    "StrictJSONRequest",
    "StrictJSONRoute",
    "check_request_chars",
    "parse_json_body",
    "request_chars",
]
