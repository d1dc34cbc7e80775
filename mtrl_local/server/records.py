"""What the rollout server records of one episode, and the trajectory the trainer gets from it."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtrl_local.env.actions import FINAL_OPEN
from mtrl_local.scoring import Scorer
from mtrl_local.server.messages import Choice, EpisodeError, Message, WireMessage
from mtrl_local.trajectory import Trajectory, TurnSpan

OPEN, RUNNING, FINISHED, FAILED = "assigned", "running", "finished", "failed"


@dataclass
class EpisodeRecord:
    """Everything the server knows about one episode."""

    episode_id: str
    #: The episode's own bearer key (:mod:`~mtrl_local.server.auth`), set when it is registered;
    #: left out of ``repr`` so that no log line carries it.
    key: str = field(default="", repr=False)
    task: str | None = None
    case_id: str | None = None
    split: str = ""
    ground_truth: dict[str, Any] = field(default_factory=dict)
    group_id: str | None = None
    sample_index: int = 0
    seed: int = 0
    max_turns: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Created by the trainer (trained on) or by the agent itself (recorded; the caller decides).
    assigned: bool = False
    state: str = OPEN
    failure: str | None = None
    tools: str | None = None
    wire: list[WireMessage] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    prompt_len: int = 0
    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    turns: list[TurnSpan] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    #: The committed last turn (for the eos glue) and the other choices of it (``n > 1``).
    last: Choice | None = None
    alternates: list[Choice] = field(default_factory=list)
    #: Index in ``wire`` of the last sampled assistant message.
    last_index: int = -1
    rewritten: bool = False
    busy: bool = False
    counters: Counter[str] = field(default_factory=Counter)
    reward: float | list[float] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    done_reason: str | None = None
    created: float = field(default_factory=time.monotonic)
    touched: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.state in (FINISHED, FAILED)

    def _append(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        self.input_ids.extend(ids)
        self.loss_mask.extend([0 if logprobs is None else 1] * len(ids))
        self.behaviour_logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))

    def _truncate(self, n: int) -> None:
        del self.input_ids[n:], self.loss_mask[n:], self.behaviour_logprobs[n:]


@dataclass
class TurnPlan:
    """What to sample for one request: under which sampler key, from which context."""

    episode_id: str
    key: str
    context_ids: list[int]
    #: ``True``: the history was rewritten; serve the agent but record nothing.
    detached: bool = False


def check_finite_report(reward: float | Sequence[float], metrics: Mapping[str, float]) -> None:
    """A 422 naming the first NaN or infinite value of a reward report: one such reward makes
    its group's advantages NaN, and the trainer then skips the whole step's update."""
    values = (
        [(f"reward[{i}]", v) for i, v in enumerate(reward)]
        if isinstance(reward, Sequence)
        else [("reward", reward)]
    )
    values += [(f"metrics.{k}", v) for k, v in metrics.items()]
    for name, value in values:
        if not math.isfinite(value):
            raise EpisodeError(
                422, f"{name} must be a finite number, got {value}", "non_finite_reward"
            )


def _done_reason(rec: EpisodeRecord, failed: bool) -> str:
    if rec.done_reason:
        return rec.done_reason
    if failed:
        return "error"
    last_text = next((m["content"] for m in reversed(rec.messages) if m["role"] == "assistant"), "")
    if FINAL_OPEN in str(last_text):
        return "final_answer"
    if rec.turns and rec.turns[-1].finish_reason == "length":
        return "length"
    return "no_action"


def to_trajectory(
    rec: EpisodeRecord, default_version: int = 0, scorer: Scorer | None = None
) -> Trajectory:
    """The episode as the trainer trains on it (a failed one is kept, flagged, for counting);
    ``scorer`` fills ``strict``."""
    failed = rec.state != FINISHED
    traj = Trajectory(
        task=rec.task or "agent",
        case_id=rec.case_id or rec.episode_id,
        split=rec.split,
        ground_truth=dict(rec.ground_truth),
        prompt_len=rec.prompt_len,
        input_ids=list(rec.input_ids),
        loss_mask=list(rec.loss_mask),
        behaviour_logprobs=list(rec.behaviour_logprobs),
        turns=[TurnSpan(**vars(t)) for t in rec.turns],
        messages=[dict(m) for m in rec.messages],
        done_reason=_done_reason(rec, failed),
        tool_calls=sum(t.tool_calls for t in rec.turns),
        tool_errors=sum(
            m["role"] == "tool" and str(m.get("content", "")).startswith("error: ")
            for m in rec.messages
        ),
        failed=failed,
        reward=rec.reward if not failed else None,
        metrics=dict(rec.metrics),
        group_id=rec.group_id or rec.episode_id,
        sample_index=rec.sample_index,
        seed=rec.seed,
        policy_version=min(rec.versions) if rec.versions else default_version,
        counters={k: int(v) for k, v in rec.counters.items() if v},
    )
    if rec.failure:
        traj.counters["failed:" + rec.failure.split(":")[0].replace(" ", "_")] = 1
    if scorer is not None and rec.ground_truth and traj.messages:
        traj.strict = scorer(traj.messages, traj.ground_truth)
    return traj
