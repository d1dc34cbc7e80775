"""Every refusal of the rollout server as an OpenAI-shaped JSON error, never a stack trace.

``{"error": {"message", "type", "param", "code"}}`` is what OpenAI clients parse into their
exceptions (``AuthenticationError`` for a 401, ``BadRequestError`` for a 400, …), so an agent sees
the server's message the way it sees the real API's.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtrl_local.server.messages import EpisodeError


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return "authentication_error" if status == 401 else "invalid_request_error"


def error_response(status: int, message: str, code: str) -> JSONResponse:
    """The JSON error body OpenAI clients understand."""
    return JSONResponse(
        status_code=status,
        content={
            "error": {"message": message, "type": error_type(status), "param": None, "code": code}
        },
    )


class RequestRejected(StarletteHTTPException):
    """A request refused before its route ran (body too large, not JSON, …).

    An ``HTTPException`` so that FastAPI re-raises it unchanged from its body parsing (any other
    exception there becomes a bare "There was an error parsing the body")."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code


def validation_message(exc: RequestValidationError) -> str:
    """The first few of pydantic's complaints, each naming its field."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "malformed request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app raises to :func:`error_response`."""

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(exc), "invalid_request")

    @app.exception_handler(EpisodeError)
    async def episode_error(request: Request, exc: EpisodeError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = exc.code if isinstance(exc, RequestRejected) else "http_error"
        return error_response(exc.status_code, str(exc.detail), code)


__all__ = [
    "RequestRejected",
    "error_response",
    "error_type",
    "install_error_handlers",
    "validation_message",
]
