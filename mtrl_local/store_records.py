"""Rows of the run store: what a trajectory is stored as, and what readers get back.

Readers get plain dataclasses with the JSON columns decoded; kept apart from
:mod:`mtrl_local.store` so the dashboard's formatting code can depend on these shapes without
reading the SQL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from mtrl_local.scoring import scalar
from mtrl_local.trajectory import Trajectory

#: What a trajectory listing can be narrowed to (``RunStore.trajectories(filter=…)``).
TrajectoryFilter = Literal["failures", "truncated", "zero_reward", "disagree"]

#: Columns a listing returns; ``messages`` and ``ground_truth`` only when asked (they are large).
LIGHT_COLUMNS = (
    "id, step, label, split, policy_version, group_id, case_id, sample_index, seed, reward, "
    "per_turn_rewards, strict, done_reason, failed, truncated, completed, n_turns, turn_tokens, "
    "finish_reasons, tool_calls, tool_errors, metrics, counters, created_at"
)
TRAJECTORY_FILTERS: dict[str, str] = {
    "failures": "(failed = 1 OR done_reason = 'error')",
    "truncated": "truncated = 1",
    "zero_reward": "reward = 0",
    "disagree": (
        "(reward IS NOT NULL AND strict IS NOT NULL AND "
        "((reward >= :threshold AND strict = 0) OR (reward < :threshold AND strict >= 1)))"
    ),
}


def json_value(value: Any) -> str:
    """A JSON column's text (keys sorted, anything else as its string)."""
    return json.dumps(value, default=str, sort_keys=True)


def _load(value: str | None) -> Any:
    return None if value is None else json.loads(value)


@dataclass(frozen=True)
class RunInfo:
    id: int
    name: str
    task: str
    #: ``created``, ``running``, ``finished``, ``failed``, ``stopped``.
    status: str
    #: Why the status was set (the error of a failed run).
    message: str | None
    created_at: float
    #: Refreshed by every write: the run's heartbeat (a ``running`` run whose ``updated_at`` is
    #: old has died without setting its status).
    updated_at: float
    config: dict[str, Any]


@dataclass(frozen=True)
class TrajectoryRecord:
    """One stored trajectory. ``messages``/``ground_truth`` are ``None`` in listings."""

    id: int
    step: int
    #: ``""`` for training rollouts; the evaluated model's label (``base``, ``tuned``) otherwise.
    label: str
    split: str
    policy_version: int
    group_id: str
    case_id: str
    sample_index: int
    seed: int
    #: Scalar return (a per-turn list summed); ``None`` if unscored.
    reward: float | None
    per_turn_rewards: list[float] | None
    strict: float | None
    done_reason: str | None
    failed: bool
    truncated: bool
    completed: bool
    n_turns: int
    turn_tokens: list[int]
    finish_reasons: list[str]
    tool_calls: int
    tool_errors: int
    metrics: dict[str, float]
    counters: dict[str, int]
    created_at: float
    messages: list[dict[str, Any]] | None = None
    ground_truth: dict[str, Any] | None = None


@dataclass(frozen=True)
class EvaluationRecord:
    id: int
    step: int
    split: str
    label: str
    report: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class DiagnosticRecord:
    id: int
    step: int
    code: str
    #: ``info``, ``warning`` or ``error``.
    severity: str
    message: str
    evidence: dict[str, Any]
    first_change: str | None
    confirm_with: str | None
    created_at: float


def run_info(row: dict[str, Any]) -> RunInfo:
    return RunInfo(
        id=row["id"],
        name=row["name"],
        task=row["task"],
        status=row["status"],
        message=row["message"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        config=json.loads(row["config"]),
    )


def trajectory_record(row: dict[str, Any]) -> TrajectoryRecord:
    return TrajectoryRecord(
        id=row["id"],
        step=row["step"],
        label=row["label"],
        split=row["split"],
        policy_version=row["policy_version"],
        group_id=row["group_id"],
        case_id=row["case_id"],
        sample_index=row["sample_index"],
        seed=row["seed"],
        reward=row["reward"],
        per_turn_rewards=_load(row["per_turn_rewards"]),
        strict=row["strict"],
        done_reason=row["done_reason"],
        failed=bool(row["failed"]),
        truncated=bool(row["truncated"]),
        completed=bool(row["completed"]),
        n_turns=row["n_turns"],
        turn_tokens=_load(row["turn_tokens"]) or [],
        finish_reasons=_load(row["finish_reasons"]) or [],
        tool_calls=row["tool_calls"],
        tool_errors=row["tool_errors"],
        metrics=_load(row["metrics"]) or {},
        counters=_load(row["counters"]) or {},
        created_at=row["created_at"],
        messages=_load(row.get("messages")),
        ground_truth=_load(row.get("ground_truth")),
    )


def evaluation_record(row: dict[str, Any]) -> EvaluationRecord:
    return EvaluationRecord(
        id=row["id"],
        step=row["step"],
        split=row["split"],
        label=row["label"],
        report=json.loads(row["report"]),
        created_at=row["created_at"],
    )


def diagnostic_record(row: dict[str, Any]) -> DiagnosticRecord:
    return DiagnosticRecord(
        id=row["id"],
        step=row["step"],
        code=row["code"],
        severity=row["severity"],
        message=row["message"],
        evidence=_load(row["evidence"]) or {},
        first_change=row["first_change"],
        confirm_with=row["confirm_with"],
        created_at=row["created_at"],
    )


def trajectory_row(run_id: int, step: int, t: Trajectory, label: str, now: float) -> dict[str, Any]:
    """The ``trajectories`` row of ``t`` (decoded text, rewards, per-turn counts; no token ids)."""
    return {
        "run_id": run_id,
        "step": int(step),
        "label": label,
        "split": t.split,
        "policy_version": t.policy_version,
        "group_id": t.group_id,
        "case_id": t.case_id,
        "sample_index": t.sample_index,
        "seed": t.seed,
        "reward": None if t.reward is None else scalar(t.reward),
        "per_turn_rewards": json_value(t.reward) if isinstance(t.reward, list) else None,
        "strict": t.strict,
        "done_reason": t.done_reason,
        "failed": int(t.failed),
        "truncated": int(t.truncated),
        "completed": int(t.completed),
        "n_turns": t.n_turns,
        "turn_tokens": json_value([s.n_tokens for s in t.turns]),
        "finish_reasons": json_value([s.finish_reason for s in t.turns]),
        "tool_calls": t.tool_calls,
        "tool_errors": t.tool_errors,
        "messages": json_value(t.messages),
        "ground_truth": json_value(t.ground_truth),
        "metrics": json_value(t.metrics),
        "counters": json_value(t.counters),
        "created_at": now,
    }
