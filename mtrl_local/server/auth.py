"""Who may call what on the rollout server: one server token, and one key per episode.

Both are bearer credentials (``Authorization: Bearer …``) drawn from ``secrets.token_urlsafe``:

* the **server token** (``RolloutServer.token``) opens new episodes (``POST /v1/episodes`` without
  an id) and lists the model. It acts on no episode.
* an **episode key** (``mtrl-ep-…``, 256 random bits) is issued with each episode: to the trainer
  when it assigns one (``mtrl train --agent-cmd`` hands it to that episode's agent as
  ``OPENAI_API_KEY``), or in the ``episode_key`` field of the ``POST /v1/episodes`` response that
  opens one. Every call on the episode (chat completions, claim, read, reward, close) must present
  it, and it works on no other episode; a chat request needs no episode id, the key names it.

Episode ids are predictable (``s00003-case-1``), keys are not: an agent can reach only its own
episode, never report another's reward, append to its history or close it. Every wrong, missing
or foreign credential is a 401 in OpenAI's error shape, whether or not the episode exists, so a 401
tells nothing about other episodes.

The server token is compared with ``secrets.compare_digest``. An episode key is looked up by its
SHA-256 digest: the lookup's timing depends on the digest, never on how many leading characters of
a key a guess got right. Keys live in memory only and are never logged (records leave them out of
``repr``); forgetting an episode revokes its key.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from starlette.responses import Response

from mtrl_local.server.errors import error_response
from mtrl_local.server.messages import EpisodeError

KEY_PREFIX = "mtrl-ep-"
BAD_CREDENTIAL = "invalid or missing bearer token"
#: Paths anyone may call: liveness only.
PUBLIC_PATHS = frozenset({"/health"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class EpisodeKeys:
    """The key of every live episode, indexed by digest; thread-safe, independent of the registry
    lock (the event loop checks keys while a worker thread may hold that lock for seconds)."""

    def __init__(self) -> None:
        self._owner: dict[bytes, str] = {}
        self._digest: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def issue(self, episode_id: str) -> str:
        """A fresh key for ``episode_id`` (replacing any earlier one); the caller hands it on."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = _digest(key)
        with self._lock:
            self._owner.pop(self._digest.get(episode_id, b""), None)
            self._owner[digest] = episode_id
            self._digest[episode_id] = digest
        return key

    def owner(self, key: str) -> str | None:
        """The episode ``key`` belongs to, or ``None``."""
        digest = _digest(key)
        with self._lock:
            return self._owner.get(digest)

    def revoke(self, episode_id: str) -> None:
        with self._lock:
            self._owner.pop(self._digest.pop(episode_id, b""), None)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the server-token holder (``episode_id is None``) or an episode."""

    episode_id: str | None = None


def identify(header: str, token: str, keys: EpisodeKeys) -> Principal | None:
    """The principal of an ``Authorization`` header, or ``None`` for a wrong or missing one."""
    scheme, _, given = header.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return None
    if secrets.compare_digest(given.encode(), token.encode()):
        return Principal()
    owner = keys.owner(given)
    return None if owner is None else Principal(owner)


def install_auth(app: FastAPI, token: str, keys: EpisodeKeys, stats: Counter[str]) -> None:
    """Every path but ``/health`` needs a credential; the route then checks what it may do."""

    @app.middleware("http")
    async def auth(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path in PUBLIC_PATHS:
            return await call_next(request)
        principal = identify(request.headers.get("authorization", ""), token, keys)
        if principal is None:
            stats["auth_failures"] += 1
            return error_response(401, BAD_CREDENTIAL, "invalid_api_key")
        request.state.principal = principal
        return await call_next(request)


def principal_of(request: Request) -> Principal:
    """The principal :func:`install_auth` attached to ``request``."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):  # a route outside the middleware: refuse
        raise EpisodeError(401, BAD_CREDENTIAL, "invalid_api_key")
    return principal


def require_episode(principal: Principal, episode_id: str) -> None:
    """Only ``episode_id``'s own key may act on it (the server token may not)."""
    if principal.episode_id is None or principal.episode_id != episode_id:
        raise EpisodeError(
            401, f"this call needs the key of episode '{episode_id}'", "invalid_api_key"
        )


def chat_episode(principal: Principal, named: str | None) -> str:
    """The episode a chat request runs on: its key's. A named one (``X-Episode-Id`` or ``user``)
    must be that same episode."""
    if named:
        require_episode(principal, named)
    if principal.episode_id is None:
        raise EpisodeError(
            401,
            "chat completions need an episode key: open an episode with POST /v1/episodes and "
            "use its episode_key as the API key",
            "invalid_api_key",
        )
    return principal.episode_id


def require_opener(principal: Principal, episode_id: str | None) -> None:
    """Claiming an assigned episode needs its key; opening a new one, the server token."""
    if episode_id is not None:
        require_episode(principal, episode_id)
    elif principal.episode_id is not None:
        raise EpisodeError(401, "opening an episode needs the server token", "invalid_api_key")


__all__ = [
    "BAD_CREDENTIAL",
    "KEY_PREFIX",
    "EpisodeKeys",
    "Principal",
    "chat_episode",
    "identify",
    "install_auth",
    "principal_of",
    "require_episode",
    "require_opener",
]
