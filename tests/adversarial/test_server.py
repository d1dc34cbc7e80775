"""Hostile and broken clients of the rollout server, over real HTTP on 127.0.0.1.

Each case sends one bad request and asserts the exact status, the exact OpenAI-shaped error message,
and that nothing was stored: the episode's reward, state and token history are what they were.

* credentials: one agent must not reach another's episode (each episode has its own key);
* numbers: NaN, Infinity and overflowing values never reach a reward (they would make a group's
  advantages NaN and skip the step's update);
* size and shape: bodies over the limit are refused before parsing, JSON is parsed strictly;
* the event loop: tokenising a big conversation does not stall ``/health``, and a conversation over
  the character limit is refused before it is tokenised.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest

from mtrl_local.model_io import load_model
from mtrl_local.rollout.sampler import SamplingParams
from mtrl_local.server import RolloutServer
from mtrl_local.server.episodes import EpisodeRecord
from tests.test_server import FINAL, TOKEN, TextSampler, opening
from tests.trainer_fixtures import build_tiny_model

BODY_LIMIT = 8_192
CHAR_LIMIT = 2_000
#: A deadlock breaker for the blocking tokenizer, never a timing assertion: after the fix it is
#: released as soon as ``/health`` answers; before it, the event loop is stuck until this expires.
RELEASE_WAIT_S = 20.0
_serial = itertools.count()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return load_model(str(model))[1]


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[RolloutServer]:
    rollout = RolloutServer(
        TextSampler(tokenizer, [FINAL]),
        tokenizer,
        sampling=SamplingParams(max_tokens=32),
        token=TOKEN,
        max_body_bytes=BODY_LIMIT,
        max_request_chars=CHAR_LIMIT,
    )
    with rollout.start():
        yield rollout


def new_episode(server: RolloutServer) -> EpisodeRecord:
    """A trainer-assigned episode (the way ``mtrl train --agent-cmd`` makes them)."""
    return server.registry.assign(EpisodeRecord(f"ep-{next(_serial)}", group_id="g"))


def call(
    server: RolloutServer,
    method: str,
    path: str,
    key: str | None,
    **kwargs: Any,
) -> httpx.Response:
    headers = dict(kwargs.pop("headers", {}))
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=60.0, **kwargs)


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["message"]


def chat(server: RolloutServer, key: str, **extra: Any) -> httpx.Response:
    return call(server, "POST", "/chat/completions", key, json={"messages": opening(), **extra})


def assert_untouched(rec: EpisodeRecord, state: str = "assigned") -> None:
    assert rec.reward is None and rec.metrics == {} and rec.state == state
    assert rec.input_ids == [] and rec.turns == []


# -------------------------------------------------------------------------------- credentials

NEEDS_KEY = "invalid or missing bearer token"


def victim_call(server: RolloutServer, route: str, victim: str, key: str | None) -> httpx.Response:
    if route == "reward":
        return call(server, "POST", f"/episodes/{victim}/reward", key, json={"reward": 1.0})
    if route == "close":
        return call(server, "POST", f"/episodes/{victim}/close", key, json={})
    if route == "read":
        return call(server, "GET", f"/episodes/{victim}", key)
    if route == "claim":
        return call(server, "POST", "/episodes", key, json={"episode_id": victim})
    body = {"messages": opening()}
    return call(
        server, "POST", "/chat/completions", key, json=body, headers={"X-Episode-Id": victim}
    )


ROUTES = ["reward", "close", "read", "claim", "chat"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("credential", ["server token", "other episode's key"])
def test_a_valid_credential_of_someone_else_is_refused(
    server: RolloutServer, route: str, credential: str
) -> None:
    victim, attacker = new_episode(server), new_episode(server)
    key = TOKEN if credential == "server token" else attacker.key
    r = victim_call(server, route, victim.episode_id, key)
    assert error_of(r) == (401, f"this call needs the key of episode '{victim.episode_id}'")
    assert r.json()["error"]["type"] == "authentication_error"
    assert_untouched(victim)
    assert_untouched(attacker)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("credential", ["missing", "made up", "key with a character changed"])
def test_no_credential_or_a_wrong_one_is_refused(
    server: RolloutServer, route: str, credential: str
) -> None:
    victim = new_episode(server)
    key = {
        "missing": None,
        "made up": "mtrl-ep-" + "A" * 43,
        "key with a character changed": victim.key[:-1] + ("B" if victim.key[-1] != "B" else "C"),
    }[credential]
    r = victim_call(server, route, victim.episode_id, key)
    assert error_of(r) == (401, NEEDS_KEY)
    assert_untouched(victim)


def test_a_key_of_an_unknown_or_forgotten_episode_is_refused(server: RolloutServer) -> None:
    gone = new_episode(server)
    server.registry.forget(gone.episode_id)
    assert error_of(victim_call(server, "reward", gone.episode_id, gone.key)) == (401, NEEDS_KEY)
    other = new_episode(server)
    r = victim_call(server, "reward", "no-such-episode", other.key)
    assert error_of(r) == (401, "this call needs the key of episode 'no-such-episode'")
    assert_untouched(other)


def test_an_opened_episode_gets_its_own_unguessable_key(server: RolloutServer) -> None:
    first = call(server, "POST", "/episodes", TOKEN, json={"task": "t"}).json()
    second = call(server, "POST", "/episodes", TOKEN, json={"task": "t"}).json()
    key = first["episode_key"]
    assert key != second["episode_key"] and len(key) >= 40
    # The server token opened it but does not act on it; its key does, on it alone.
    r = victim_call(server, "reward", first["episode_id"], TOKEN)
    assert r.status_code == 401
    assert chat(server, key).status_code == 200
    r = victim_call(server, "reward", second["episode_id"], key)
    assert r.status_code == 401
    ok = call(server, "POST", f"/episodes/{first['episode_id']}/reward", key, json={"reward": 1})
    assert ok.status_code == 200 and ok.json()["state"] == "finished"
    assert "episode_key" not in call(server, "GET", f"/episodes/{first['episode_id']}", key).json()
    assert server.registry.get(second["episode_id"]).reward is None


def test_an_episode_key_cannot_open_episodes(server: RolloutServer) -> None:
    rec = new_episode(server)
    before = server.registry.ids()
    r = call(server, "POST", "/episodes", rec.key, json={"task": "t"})
    assert error_of(r) == (401, "opening an episode needs the server token")
    assert server.registry.ids() == before


def test_chat_runs_on_the_keys_episode_without_naming_it(server: RolloutServer) -> None:
    rec = new_episode(server)
    r = chat(server, rec.key)
    assert r.status_code == 200 and r.json()["mtrl"]["episode_id"] == rec.episode_id
    assert len(rec.turns) == 1
    r = chat(server, rec.key, user="someone-else")  # `user` names an episode, like the header
    assert error_of(r) == (401, "this call needs the key of episode 'someone-else'")
    assert len(rec.turns) == 1


def test_keys_are_never_logged(server: RolloutServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rec = new_episode(server)
    chat(server, rec.key)
    victim_call(server, "reward", rec.episode_id, rec.key)
    victim_call(server, "reward", rec.episode_id, TOKEN)
    assert rec.key not in caplog.text and TOKEN not in caplog.text
    assert rec.key not in repr(rec)


# ------------------------------------------------------------------------------------ numbers

NON_FINITE = "JSON numbers must be finite (no NaN, Infinity or values beyond ±1.8e308)"


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ('{"reward": NaN}', "reward"),
        ('{"reward": Infinity}', "reward"),
        ('{"reward": -Infinity}', "reward"),
        ('{"reward": 1e400}', "reward"),
        ('{"reward": -1e999}', "reward"),
        ('{"reward": 1' + "0" * 400 + "}", "reward"),
        ('{"reward": [0.5, NaN]}', "reward[1]"),
        ('{"reward": 1.0, "metrics": {"acc": NaN}}', "metrics.acc"),
        ('{"reward": 1.0, "metrics": {"acc": 1e309}}', "metrics.acc"),
    ],
)
def test_non_finite_json_numbers_are_refused(server: RolloutServer, raw: str, where: str) -> None:
    rec = new_episode(server)
    r = call(
        server,
        "POST",
        f"/episodes/{rec.episode_id}/reward",
        rec.key,
        content=raw.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert error_of(r) == (422, f"non-finite number at {where}: {NON_FINITE}")
    assert_untouched(rec)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"reward": "nan"}, "reward must be a finite number, got nan"),
        ({"reward": "inf"}, "reward must be a finite number, got inf"),
        ({"reward": "-Infinity"}, "reward must be a finite number, got -inf"),
        ({"reward": "1e400"}, "reward must be a finite number, got inf"),
        (
            {"reward": 1.0, "metrics": {"len": "NaN"}},
            "metrics.len must be a finite number, got nan",
        ),
    ],
)
def test_non_finite_rewards_written_as_strings_are_refused(
    server: RolloutServer, body: dict[str, Any], message: str
) -> None:
    rec = new_episode(server)
    r = call(server, "POST", f"/episodes/{rec.episode_id}/reward", rec.key, json=body)
    assert error_of(r) == (422, message)
    assert_untouched(rec)


def test_non_finite_per_turn_reward_is_refused_and_a_finite_one_then_lands(
    server: RolloutServer,
) -> None:
    rec = new_episode(server)
    assert chat(server, rec.key).status_code == 200
    path = f"/episodes/{rec.episode_id}/reward"
    r = call(server, "POST", path, rec.key, json={"reward": ["nan"]})
    assert error_of(r) == (422, "reward[0] must be a finite number, got nan")
    assert rec.reward is None and rec.state == "running"
    ok = call(server, "POST", path, rec.key, json={"reward": [0.25]})
    assert ok.status_code == 200 and rec.reward == [0.25] and rec.state == "finished"


def test_registry_refuses_non_finite_rewards_from_python(server: RolloutServer) -> None:
    rec = new_episode(server)
    with pytest.raises(Exception, match=re.escape("reward must be a finite number, got nan")):
        server.registry.report(rec.episode_id, float("nan"), {}, None, close=True)
    with pytest.raises(Exception, match=re.escape("metrics.x must be a finite number, got inf")):
        server.registry.report(rec.episode_id, 1.0, {"x": float("inf")}, None, close=True)
    assert_untouched(rec)


@pytest.mark.parametrize(
    ("path", "raw", "where"),
    [
        ("/chat/completions", '{"messages": [], "temperature": NaN}', "temperature"),
        ("/episodes", '{"task": "t", "metadata": {"w": [1, Infinity]}}', "metadata.w[1]"),
    ],
)
def test_non_finite_numbers_are_refused_on_every_route(
    server: RolloutServer, path: str, raw: str, where: str
) -> None:
    before = server.registry.ids()
    r = call(
        server,
        "POST",
        path,
        TOKEN,
        content=raw.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert error_of(r) == (422, f"non-finite number at {where}: {NON_FINITE}")
    assert server.registry.ids() == before


# ----------------------------------------------------------------------------- size and shape

TOO_LARGE = f"request body exceeds the limit of {BODY_LIMIT} bytes (max_body_bytes)"


def test_a_body_over_the_limit_is_refused_by_its_length(server: RolloutServer) -> None:
    rec = new_episode(server)
    junk = b"{" + b"x" * BODY_LIMIT  # not even JSON: a 413, not a 400, shows it was never parsed
    r = call(
        server,
        "POST",
        f"/episodes/{rec.episode_id}/reward",
        rec.key,
        content=junk,
        headers={"Content-Type": "application/json"},
    )
    assert error_of(r) == (413, TOO_LARGE)
    assert_untouched(rec)


def test_a_chunked_body_over_the_limit_is_refused_while_streaming(server: RolloutServer) -> None:
    rec = new_episode(server)
    chunks = [b'{"reward": 1.0, "pad": "'] + [b"x" * 1024] * 12 + [b'"}']
    r = call(
        server,
        "POST",
        f"/episodes/{rec.episode_id}/reward",
        rec.key,
        content=iter(chunks),  # no Content-Length: Transfer-Encoding: chunked
        headers={"Content-Type": "application/json"},
    )
    assert "content-length" not in r.request.headers
    assert error_of(r) == (413, TOO_LARGE)
    assert_untouched(rec)


def test_a_body_just_under_the_limit_is_served(server: RolloutServer) -> None:
    rec = new_episode(server)
    head = json.dumps({"reward": 0.5, "done_reason": ""}).encode()
    body = head[:-2] + b"x" * (BODY_LIMIT - len(head)) + b'"}'
    assert len(body) == BODY_LIMIT
    r = call(
        server,
        "POST",
        f"/episodes/{rec.episode_id}/reward",
        rec.key,
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200 and rec.reward == 0.5


def nested(depth: int) -> bytes:
    return b'{"task": "t", "metadata": {"m": ' + b"[" * depth + b"]" * depth + b"}}"


@pytest.mark.parametrize(
    ("content", "content_type", "status", "message"),
    [
        (b'{"task": "t",', "application/json", 400,
         "malformed JSON body: Expecting property name enclosed in double quotes "
         "(line 1, column 14)"),
        (b"", "application/json", None, None),  # an empty start body opens an episode
        (b'{"task": "\xff\xfe"}', "application/json", 400, "the JSON body is not valid UTF-8"),
        (nested(65), "application/json", 400, "the JSON body is nested deeper than 64 levels"),
        (nested(3_000), "application/json", 400, "the JSON body is nested deeper than 64 levels"),
        (b'{"task": "t"}', "text/plain", 415, "Content-Type must be application/json"),
        (b'{"task": "t"}', "", 415, "Content-Type must be application/json"),
        (b'["task", "t"]', "application/json", 400,
         "malformed request: body: Input should be a valid dictionary or object to extract fields "
         "from"),
        (b'{"task": "t", "seed": 1' + b"0" * 30 + b"}", "application/json", 400,
         "malformed request: seed: Input should be less than or equal to 9223372036854775807"),
    ],
    ids=["truncated", "empty", "not utf-8", "depth 65", "depth 3000", "text/plain",
         "no content type", "a list", "huge seed"],
)  # fmt: skip
def test_malformed_bodies_are_refused_with_a_message(
    server: RolloutServer,
    content: bytes,
    content_type: str,
    status: int | None,
    message: str | None,
) -> None:
    before = server.registry.ids()
    headers = {"Content-Type": content_type} if content_type else {}
    r = call(server, "POST", "/episodes", TOKEN, content=content, headers=headers)
    if status is None:
        assert r.status_code == 200 and len(server.registry.ids()) == len(before) + 1
        return
    assert error_of(r) == (status, message)
    assert server.registry.ids() == before


def test_json_nested_within_the_limit_is_accepted(server: RolloutServer) -> None:
    r = call(
        server,
        "POST",
        "/episodes",
        TOKEN,
        content=nested(60),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200


# ------------------------------------------------------------------------- the event loop


class BlockingTokenizer:
    """The real tokenizer, except that encoding a text with ``marker`` in it waits until the test
    releases it, so a request is provably mid-tokenisation while ``/health`` is asked."""

    def __init__(self, inner: Any, marker: str) -> None:
        self._inner = inner
        self.marker = marker
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released_in_time: bool | None = None
        self.encoded: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        self.encoded.append(len(text))
        if self.marker in text:
            self.entered.set()
            self.released_in_time = self.release.wait(RELEASE_WAIT_S)
        return list(self._inner.encode(text, *args, **kwargs))


def test_health_answers_while_a_conversation_is_tokenised(tokenizer: Any) -> None:
    slow = BlockingTokenizer(tokenizer, marker="TOKENISE-ME-SLOWLY")
    sampler = TextSampler(tokenizer, [FINAL])
    params = SamplingParams(max_tokens=16)
    with RolloutServer(sampler, cast(Any, slow), token=TOKEN, sampling=params) as srv:
        rec = new_episode(srv)
        named = {"X-Episode-Id": rec.episode_id}
        messages = [*opening(), {"role": "user", "content": "TOKENISE-ME-SLOWLY " * 200}]
        answers: list[httpx.Response] = []
        worker = threading.Thread(
            target=lambda: answers.append(
                call(
                    srv,
                    "POST",
                    "/chat/completions",
                    rec.key,
                    json={"messages": messages},
                    headers=named,
                )
            )
        )
        worker.start()
        assert slow.entered.wait(60.0), "the request never reached the tokenizer"
        health = httpx.get(f"{srv.url.removesuffix('/v1')}/health", timeout=60.0)
        slow.release.set()  # only now may the tokenisation finish
        worker.join(60.0)
    assert health.status_code == 200
    assert slow.released_in_time is True, "/health was not answered while tokenising"
    assert answers and answers[0].status_code == 200 and len(rec.turns) == 1


def many(n: int, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text} for _ in range(n)]


CALL_MSG = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "x" * 2_100}}
    ],
}


@pytest.mark.parametrize(
    ("messages", "tools", "chars"),
    [
        ([{"role": "user", "content": "y" * 2_001}], None, 2_001),
        (many(5, "z" * 401), None, 2_005),
        ([{"role": "user", "content": [{"type": "text", "text": "w" * 2_500}]}], None, 2_500),
        ([*opening(), CALL_MSG, {"role": "tool", "content": "ok"}], None, 2_133),
        (opening(), [{"type": "function", "function": {"name": "f", "description": "d" * 2_000}}],
         2_098),
    ],
    ids=["one message", "many messages", "content parts", "tool call arguments", "tool schemas"],
)  # fmt: skip
def test_a_conversation_over_the_character_limit_is_not_tokenised(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, chars: int
) -> None:
    counting = BlockingTokenizer(tokenizer, marker="never")
    sampler = TextSampler(tokenizer, [FINAL])
    with RolloutServer(
        sampler, cast(Any, counting), token=TOKEN, max_request_chars=CHAR_LIMIT
    ) as srv:
        rec = new_episode(srv)
        body: dict[str, Any] = {"messages": messages}
        if tools is not None:
            body["tools"] = tools
        named = {"X-Episode-Id": rec.episode_id}
        r = call(srv, "POST", "/chat/completions", rec.key, json=body, headers=named)
        assert error_of(r) == (
            413,
            f"the request's messages and tools hold {chars} characters, more than the limit "
            f"of {CHAR_LIMIT} (max_request_chars)",
        )
        assert counting.encoded == [] and sampler.calls == []
        assert rec.input_ids == [] and rec.state == "assigned"
        assert chat(srv, rec.key).status_code == 200  # the episode goes on
