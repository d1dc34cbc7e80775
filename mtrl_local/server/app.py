"""The rollout server: an OpenAI-compatible chat endpoint that serves, and records, the policy.

Endpoints (all but ``/health`` need a bearer credential; every refusal is OpenAI's error shape)::

    POST /v1/chat/completions          OpenAI chat completion on the episode of the key
    GET  /v1/models                    the policy, as one model
    POST /v1/episodes                  claim a trainer-assigned episode, or open one's own
    GET  /v1/episodes/{id}             its assignment and state
    POST /v1/episodes/{id}/reward      update_reward: scalar or per-turn list + metrics
    POST /v1/episodes/{id}/close       end it (failed if it never reported a reward)
    GET  /health                       liveness, no auth

Credentials (:mod:`~mtrl_local.server.auth`): the server token opens episodes; each episode has its
own key, issued with it, and only that key acts on it — one agent cannot touch another's episode.
Limits (:mod:`~mtrl_local.server.limits`): bodies over ``max_body_bytes`` are a 413 before they
are parsed, JSON is parsed strictly (no NaN or Infinity) off the event loop, and a conversation
over ``max_request_chars`` is a 413 before it is tokenised. Tokenising, decoding and every call
into the episode registry (which holds its lock while it tokenises) run on worker threads, so the
event loop keeps answering — ``/health`` included — while a long conversation is encoded.

Sampling: by default the trainer's :class:`SamplingParams` win over the request's ``temperature``
and ``top_p`` (the policy gradient assumes the trainer's sampling distribution); the request's
``max_tokens`` may only lower the per-turn budget. ``honor_request_sampling=True`` (serving, not
training) lets the request decide. ``tool_choice="none"`` returns tool-call text as content; other
values cannot be enforced without constrained decoding and act as ``"auto"``.

The server binds 127.0.0.1. Another host must be asked for explicitly, and gets a warning: anyone
who can reach the port and holds a credential drives the policy and writes training data.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import FastAPI, Request
from transformers import PreTrainedTokenizerBase

from mtrl_local.rollout.sampler import (
    GenerationRequest,
    GenerationResult,
    Sampler,
    SamplingParams,
)
from mtrl_local.server.auth import (
    chat_episode,
    install_auth,
    principal_of,
    require_episode,
    require_opener,
)
from mtrl_local.server.batcher import GenerationBatcher
from mtrl_local.server.episodes import (
    EpisodeError,
    EpisodeRecord,
    EpisodeRegistry,
    TurnPlan,
    make_choice,
)
from mtrl_local.server.errors import install_error_handlers
from mtrl_local.server.limits import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_REQUEST_CHARS,
    BodyLimit,
    StrictJSONRoute,
    check_request_chars,
)
from mtrl_local.server.messages import Choice
from mtrl_local.server.schemas import (
    ChatCompletionRequest,
    CloseRequest,
    EpisodeInfo,
    EpisodeStartRequest,
    RewardReport,
)

logger = logging.getLogger(__name__)

EPISODE_HEADER = "x-episode-id"
LOOPBACK = "127.0.0.1"
T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on a worker thread: CPU work and lock waits never stall the event loop."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


class RolloutServer:
    """The HTTP server, its episode registry and its batcher; runs uvicorn on a thread.

    ``sampling`` is what the trainer sets each step (temperature, top_p, per-turn budget, seed);
    ``model_name`` is what ``/v1/models`` and responses report; ``token`` is the server token
    (random by default); ``max_body_bytes`` and ``max_request_chars`` are the request limits of
    :mod:`~mtrl_local.server.limits`.
    """

    def __init__(
        self,
        sampler: Sampler,
        tokenizer: PreTrainedTokenizerBase,
        *,
        sampling: SamplingParams | None = None,
        token: str | None = None,
        host: str = LOOPBACK,
        port: int = 0,
        model_name: str = "policy",
        max_batch: int = 64,
        batch_window_s: float = 0.005,
        honor_request_sampling: bool = False,
        idle_timeout_s: float = 300.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_request_chars: int = DEFAULT_MAX_REQUEST_CHARS,
    ) -> None:
        if host not in (LOOPBACK, "localhost", "::1"):
            logger.warning(
                "rollout server binds %s, not loopback: anyone who reaches this port with a "
                "credential can drive the policy and write training data",
                host,
            )
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.sampling = sampling or SamplingParams()
        self.token = token or secrets.token_urlsafe(24)
        self.host = host
        self.model_name = model_name
        self.honor_request_sampling = honor_request_sampling
        self.idle_timeout_s = idle_timeout_s
        self.max_body_bytes = max_body_bytes
        self.max_request_chars = max_request_chars
        self.registry = EpisodeRegistry(tokenizer, sampler.eos_token_id)
        self.batcher = GenerationBatcher(sampler, max_batch=max_batch, window_s=batch_window_s)
        self.app = self._build_app()
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL for OpenAI clients (``OPENAI_BASE_URL``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    # -- running -----------------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> RolloutServer:
        """Serve on a background thread; returns once the socket accepts connections."""
        import uvicorn

        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="rollout-server",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("rollout server failed to start")
            time.sleep(0.01)
        logger.info("rollout server on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.batcher.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> RolloutServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the app -----------------------------------------------------------------------------------
    def _info(self, rec: EpisodeRecord) -> dict[str, Any]:
        return EpisodeInfo(
            episode_id=rec.episode_id,
            task=rec.task,
            case_id=rec.case_id,
            split=rec.split,
            group_id=rec.group_id,
            sample_index=rec.sample_index,
            seed=rec.seed,
            max_turns=rec.max_turns,
            state=rec.state,
            turns=len(rec.turns),
            policy_version=self.sampler.policy_version,
        ).model_dump()

    def _params(self, body: ChatCompletionRequest, room: int | None) -> SamplingParams:
        params = self.sampling
        if self.honor_request_sampling:
            changes: dict[str, Any] = {}
            if body.temperature is not None:
                changes["temperature"] = body.temperature
            if body.top_p is not None:
                changes["top_p"] = body.top_p
            if body.seed is not None:
                changes["seed"] = body.seed
            params = replace(params, **changes)
        budget = min(params.max_tokens, body.token_budget() or params.max_tokens)
        if room is not None:
            budget = min(budget, room)
        return replace(params, max_tokens=budget)

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="mtrl-local rollout server", docs_url=None, redoc_url=None)
        app.router.route_class = StrictJSONRoute
        install_error_handlers(app)
        self._add_episode_routes(app)
        # Added last, so outermost: a request without a credential is refused unread.
        app.add_middleware(BodyLimit, max_bytes=self.max_body_bytes)
        install_auth(app, self.token, self.registry.keys, self.registry.stats)

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {"status": "ok", "policy_version": self.sampler.policy_version}

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            model = {
                "id": self.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "mtrl-local",
            }
            return {"object": "list", "data": [model]}

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
            named = request.headers.get(EPISODE_HEADER) or body.user
            return await self._complete(body, chat_episode(principal_of(request), named))

        return app

    def _add_episode_routes(self, app: FastAPI) -> None:
        """Start, read, reward and close an episode; each needs that episode's key (opening a new
        one, the server token)."""
        registry = self.registry

        @app.post("/v1/episodes")
        async def start_episode(
            request: Request, body: EpisodeStartRequest | None = None
        ) -> dict[str, Any]:
            body = body or EpisodeStartRequest()
            require_opener(principal_of(request), body.episode_id)
            rec = await off_loop(
                registry.start,
                body.episode_id,
                task=body.task,
                case_id=body.case_id,
                group_id=body.group_id,
                seed=body.seed,
                metadata=body.metadata,
            )
            info = self._info(rec)
            if body.episode_id is None:
                info["episode_key"] = rec.key  # sent once, to the opener
            return info

        @app.get("/v1/episodes/{episode_id}")
        async def get_episode(episode_id: str, request: Request) -> dict[str, Any]:
            require_episode(principal_of(request), episode_id)
            return self._info(await off_loop(registry.get, episode_id))

        @app.post("/v1/episodes/{episode_id}/reward")
        async def update_reward(
            episode_id: str, body: RewardReport, request: Request
        ) -> dict[str, Any]:
            require_episode(principal_of(request), episode_id)
            rec = await off_loop(
                registry.report, episode_id, body.reward, body.metrics, body.done_reason, body.close
            )
            return self._info(rec)

        @app.post("/v1/episodes/{episode_id}/close")
        async def close_episode(
            episode_id: str, request: Request, body: CloseRequest | None = None
        ) -> dict[str, Any]:
            require_episode(principal_of(request), episode_id)
            rec = await off_loop(registry.close, episode_id, body.reason if body else None)
            return self._info(rec)

    async def _complete(self, body: ChatCompletionRequest, episode_id: str) -> dict[str, Any]:
        """One chat completion of an episode: plan the turn, sample it, record it, answer."""
        plan, params = await off_loop(self._plan, body, episode_id)
        keys = [plan.key] + [f"{plan.key}~{i}" for i in range(1, body.n)]
        requests = [GenerationRequest(k, plan.context_ids, params.max_tokens) for k in keys]
        version = self.sampler.policy_version
        try:
            results = await asyncio.wrap_future(self.batcher.submit(requests, params))
        except Exception as exc:
            await off_loop(self.registry.abandon, plan, f"{type(exc).__name__}: {exc}")
            raise EpisodeError(500, "generation failed", "server_error") from exc
        for k in keys[1:]:
            self.batcher.release(k)
        choices = await off_loop(self._record, body, plan, results, version)
        return self._completion(plan, choices, version)

    def _plan(
        self, body: ChatCompletionRequest, episode_id: str
    ) -> tuple[TurnPlan, SamplingParams]:
        """The turn to sample (what the episode's history makes of the request) and its params.
        Runs on a worker thread: it tokenises what the request appended."""
        if body.stream:
            raise EpisodeError(400, "stream=true is not supported", "unsupported")
        check_request_chars(body.messages, body.tools, self.max_request_chars)
        # Standalone servers have no launcher watching the clock: expire silent episodes here.
        self.registry.expire(self.idle_timeout_s)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        plan = self.registry.prepare(episode_id, messages, body.tools)
        limit = self.sampler.max_context_len
        room = None if limit is None else limit - len(plan.context_ids)
        if room is not None and room < 1:
            self.registry.abandon(plan, "context window full")
            raise EpisodeError(
                400,
                f"the episode's context ({len(plan.context_ids)} tokens) fills the model's "
                f"window ({limit})",
                "context_length_exceeded",
            )
        return plan, self._params(body, room)

    def _record(
        self,
        body: ChatCompletionRequest,
        plan: TurnPlan,
        results: list[GenerationResult],
        version: int,
    ) -> list[Choice]:
        """Decode the sampled choices and record the first (on a worker thread: it decodes)."""
        call_prefix = f"call_{uuid.uuid4().hex[:12]}"
        choices = [
            make_choice(
                self.tokenizer,
                r,
                eos_token_id=self.sampler.eos_token_id,
                stop=body.stop_strings(),
                parse_tools=body.tool_choice != "none",
                call_id_prefix=f"{call_prefix}{i}",
            )
            for i, r in enumerate(results)
        ]
        self.registry.commit(plan, choices, version)
        return choices

    def _completion(self, plan: TurnPlan, choices: list[Choice], version: int) -> dict[str, Any]:
        """The OpenAI chat-completion body for the sampled choices."""
        completion = sum(len(c.ids) for c in choices)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "system_fingerprint": f"policy-v{version}",
            "choices": [
                {
                    "index": i,
                    "message": c.message,
                    "finish_reason": c.finish_reason,
                    "logprobs": None,
                }
                for i, c in enumerate(choices)
            ],
            "usage": {
                "prompt_tokens": len(plan.context_ids),
                "completion_tokens": completion,
                "total_tokens": len(plan.context_ids) + completion,
            },
            # Ours, ignored by OpenAI clients: what was recorded for training.
            "mtrl": {
                "episode_id": plan.episode_id,
                "policy_version": version,
                "recorded": not plan.detached,
            },
        }


__all__ = ["EPISODE_HEADER", "RolloutServer"]
