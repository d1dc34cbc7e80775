"""Request and response bodies of the rollout server (OpenAI chat-completions shape + episodes).

Only the fields the server acts on are typed strictly; everything else an OpenAI client may send
(``frequency_penalty``, ``response_format``, ``parallel_tool_calls``, …) is accepted and ignored,
so agents written against the real API do not break on a field we do not implement. Fields we
cannot honour faithfully (``stream``, ``n > 8``) are refused with a 400 that says why.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Seeds go to the sampler's generator, which takes 63-bit non-negative integers.
MAX_SEED = 2**63 - 1


class ChatMessage(BaseModel):
    """One OpenAI chat message. ``content`` may be a string, a list of text parts or null."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="allow")

    model: str = "policy"
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    #: Newer clients send this instead of ``max_tokens``.
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    #: OpenAI's end-user id; we read the episode id from it when no ``X-Episode-Id`` header is set.
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and (len(value) > 4 or any(not s for s in value)):
            raise ValueError("stop: at most 4 non-empty strings")
        if isinstance(value, str) and not value:
            raise ValueError("stop: empty string")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise ValueError("tool_choice must be 'none', 'auto', 'required' or a function object")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EpisodeStartRequest(BaseModel):
    """``POST /v1/episodes``: claim a trainer-assigned episode, or open one of the agent's own."""

    model_config = ConfigDict(extra="forbid")

    #: A trainer-assigned id (``MTRL_EPISODE_ID``); omitted: the server creates a new episode.
    episode_id: str | None = None
    task: str | None = None
    case_id: str | None = None
    #: Episodes sharing a group id are compared for group advantages; default: the prompt's hash.
    group_id: str | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    metadata: dict[str, Any] = Field(default_factory=dict)


class EpisodeInfo(BaseModel):
    """What an agent needs to run its episode (the start response, ``GET /v1/episodes/{id}``).

    The response that opens a new episode also carries ``episode_key``: the bearer key every later
    call on that episode must present (:mod:`~mtrl_local.server.auth`); it is sent only then."""

    episode_id: str
    task: str | None
    case_id: str | None
    split: str
    group_id: str | None
    sample_index: int
    seed: int
    max_turns: int | None
    state: str
    turns: int
    policy_version: int


class RewardReport(BaseModel):
    """``POST /v1/episodes/{id}/reward`` (``update_reward``): a scalar or one value per turn.

    Every value must be finite (a NaN reward would make its group's advantages NaN): the registry
    refuses others with a 422 naming the field."""

    model_config = ConfigDict(extra="forbid")

    reward: float | list[float]
    metrics: dict[str, float] = Field(default_factory=dict)
    #: Why the episode ended, in the agent's words (``final_answer``, ``no_action``, …).
    done_reason: str | None = None
    #: Close the episode with this report (the usual case); ``false`` keeps it open for more turns.
    close: bool = True


class CloseRequest(BaseModel):
    """``POST /v1/episodes/{id}/close``: ends the episode (failed if no reward was reported)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = None


__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CloseRequest",
    "EpisodeInfo",
    "EpisodeStartRequest",
    "RewardReport",
]
