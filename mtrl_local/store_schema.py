"""The run store's file format: tables, keys, and the version check (see :mod:`mtrl_local.store`).

Bump :data:`SCHEMA_VERSION` on any change a reader of the previous version would misread; a store
of another version is refused with a :class:`~mtrl_local.errors.UserError`, never guessed at.

Tables (``run_id`` is always 1: one run per file, kept so rows stay self-describing):

* ``meta(key PK, value)``: ``schema_version``, ``created_by``.
* ``runs(id PK, name, task, status, message, created_at, updated_at, config JSON)``.
* ``configs(id PK, run_id, created_at, reason, config JSON)``: every config the run had.
* ``metrics(run_id, name, step, value, wall_time)``, PK ``(run_id, name, step)``.
* ``trajectories(id PK, run_id, step, label, split, policy_version, group_id, case_id,
  sample_index, seed, reward, per_turn_rewards JSON, strict, done_reason, failed, truncated,
  completed, n_turns, turn_tokens JSON, finish_reasons JSON, tool_calls, tool_errors,
  messages JSON, ground_truth JSON, metrics JSON, counters JSON, created_at)``, unique
  ``(run_id, step, label, split, group_id, sample_index)``.
* ``evaluations(id PK, run_id, step, split, label, report JSON, created_at)``, unique
  ``(run_id, step, split, label)``.
* ``diagnostics(id PK, run_id, step, code, severity, message, evidence JSON, first_change,
  confirm_with, created_at)``, unique ``(run_id, step, code)``.

Times are Unix seconds (float).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from mtrl_local.errors import UserError

SCHEMA_VERSION = 1
TRAJECTORY_KEY = ("run_id", "step", "label", "split", "group_id", "sample_index")


def create_schema(db: sqlite_utils.Database) -> None:
    db.table("meta").create({"key": str, "value": str}, pk="key")
    db.table("runs").create(
        {
            "id": int,
            "name": str,
            "task": str,
            "status": str,
            "message": str,
            "created_at": float,
            "updated_at": float,
            "config": str,
        },
        pk="id",
        not_null={"name", "task", "status", "created_at", "updated_at", "config"},
    )
    db.table("configs").create(
        {"id": int, "run_id": int, "created_at": float, "reason": str, "config": str},
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("metrics").create(
        {"run_id": int, "name": str, "step": int, "value": float, "wall_time": float},
        pk=("run_id", "name", "step"),  # the (name, step) index the charts read by
    )
    db.table("metrics").create_index(["run_id", "step"])
    db.table("trajectories").create(
        {
            "id": int,
            "run_id": int,
            "step": int,
            "label": str,
            "split": str,
            "policy_version": int,
            "group_id": str,
            "case_id": str,
            "sample_index": int,
            "seed": int,
            "reward": float,
            "per_turn_rewards": str,
            "strict": float,
            "done_reason": str,
            "failed": int,
            "truncated": int,
            "completed": int,
            "n_turns": int,
            "turn_tokens": str,
            "finish_reasons": str,
            "tool_calls": int,
            "tool_errors": int,
            "messages": str,
            "ground_truth": str,
            "metrics": str,
            "counters": str,
            "created_at": float,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("trajectories").create_index(list(TRAJECTORY_KEY), unique=True)
    db.table("evaluations").create(
        {
            "id": int,
            "run_id": int,
            "step": int,
            "split": str,
            "label": str,
            "report": str,
            "created_at": float,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("evaluations").create_index(["run_id", "step", "split", "label"], unique=True)
    db.table("diagnostics").create(
        {
            "id": int,
            "run_id": int,
            "step": int,
            "code": str,
            "severity": str,
            "message": str,
            "evidence": str,
            "first_change": str,
            "confirm_with": str,
            "created_at": float,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("diagnostics").create_index(["run_id", "step", "code"], unique=True)


def check_schema(db: sqlite_utils.Database, path: Path) -> None:
    """Refuse a file that is not a run store, or one of another schema version."""
    try:
        tables = set(db.table_names())
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path}: not an mtrl-local run store ({exc})") from None
    if "meta" not in tables:
        raise UserError(f"{path}: not an mtrl-local run store (no meta table)")
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        version = int(row[0]) if row else None
    except ValueError:
        version = None
    if version is None:
        raise UserError(f"{path}: not an mtrl-local run store (no schema_version in meta)")
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{path} was written by schema version {version}, "
            f"this mtrl-local reads {SCHEMA_VERSION}"
        )


#: How long a statement waits for a lock before failing (writer checkpointing, reader opening).
BUSY_TIMEOUT_S = 30.0


def connect(path: Path, readonly: bool) -> sqlite_utils.Database:
    """A connection to the store file: read-only (``mode=ro``, ``query_only``) or the writer's
    (WAL, ``synchronous=FULL``, foreign keys)."""
    if readonly:
        # mode=ro: this connection cannot write, whatever the code above it does.
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            check_same_thread=False,
        )
    else:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    db = sqlite_utils.Database(conn, execute_plugins=False)
    db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    if readonly:
        db.execute("PRAGMA query_only = 1")
    else:
        try:
            db.enable_wal()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise UserError(f"{path}: not an mtrl-local run store ({exc})") from None
        # FULL: a commit is on disk when it returns (NORMAL could lose the last commits on
        # power loss; a crash of the process alone loses nothing either way).
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
    return db
