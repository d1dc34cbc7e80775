"""Trajectories: token in, token out (docs/design.md, "Trajectories").

A :class:`Trajectory` keeps the exact ids the sampler produced. The prompt is encoded once; each
model turn appends its sampled ids (``loss_mask`` 1, with the sampler's logprobs); the tool results
and chat-template glue that follow are appended as ids (``loss_mask`` 0). Nothing is decoded and
re-encoded to build training data: the decoded text in ``messages`` exists for the environment,
the scorers and people, never for the trainer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "max_turns", "error"]


@dataclass
class TurnSpan:
    """One model turn inside ``input_ids``: sampled tokens are ``input_ids[start:end]``."""

    start: int
    end: int
    finish_reason: FinishReason
    tool_calls: int = 0
    tool_errors: int = 0

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


@dataclass
class Trajectory:
    """One episode as the trainer sees it, plus what the evaluators and the dashboard need."""

    task: str
    case_id: str
    split: str
    ground_truth: dict[str, Any]
    #: Prompt length: ``input_ids[:prompt_len]`` is the encoded system + user turns.
    prompt_len: int = 0
    input_ids: list[int] = field(default_factory=list)
    #: 1 on sampled assistant tokens only (tool results and template glue are context, not action).
    loss_mask: list[int] = field(default_factory=list)
    #: The sampler's logprob of each token (0.0 where ``loss_mask`` is 0).
    behaviour_logprobs: list[float] = field(default_factory=list)
    turns: list[TurnSpan] = field(default_factory=list)
    #: Chat messages (decoded model text, tool results) for the environment, scorers and display.
    messages: list[dict[str, Any]] = field(default_factory=list)
    #: Why the episode ended: final_answer, no_action, max_turns, length, error.
    done_reason: str | None = None
    tool_calls: int = 0
    tool_errors: int = 0
    #: Environment failed permanently (not the agent's fault): excluded from training, counted.
    failed: bool = False
    reward: float | list[float] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    strict: float | None = None
    group_id: str = ""
    sample_index: int = 0
    seed: int = 0
    policy_version: int = 0
    #: What the rollout engine counted in this episode (malformed tool calls, unknown tools, text
    #: after the final answer, truncated turns, …): logged, never optimised.
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def n_turns(self) -> int:
        return len(self.turns)

    @property
    def truncated(self) -> bool:
        """A turn hit the per-turn token budget (finish reason ``length``)."""
        return any(t.finish_reason == "length" for t in self.turns)

    @property
    def completed(self) -> bool:
        """The agent emitted a final answer (``metrics['completion']`` when a reward ran)."""
        if "completion" in self.metrics:
            return bool(self.metrics["completion"])
        return self.done_reason == "final_answer"

    def check(self) -> None:
        """Raise ``ValueError`` if the token-level fields disagree (lengths, spans, masks)."""
        n = len(self.input_ids)
        if len(self.loss_mask) != n or len(self.behaviour_logprobs) != n:
            raise ValueError("input_ids, loss_mask and behaviour_logprobs differ in length")
        masked = 0
        last = self.prompt_len
        for span in self.turns:
            if not last <= span.start <= span.end <= n:
                raise ValueError(f"turn span {span.start}:{span.end} out of order")
            if any(m != 1 for m in self.loss_mask[span.start : span.end]):
                raise ValueError("loss_mask is not 1 on a sampled span")
            masked += span.n_tokens
            last = span.end
        if sum(self.loss_mask) != masked:
            raise ValueError("loss_mask is 1 outside the sampled spans")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; also a valid line of a rollouts file (messages + ground_truth)."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Trajectory:
        data = {k: v for k, v in obj.items() if k in cls.__dataclass_fields__}
        data["turns"] = [TurnSpan(**t) for t in data.get("turns", [])]
        return cls(**data)
