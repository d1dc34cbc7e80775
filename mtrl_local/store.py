"""The run store: one SQLite file per run directory, written by the trainer, read by the dashboard.

``<run_dir>/run.sqlite`` holds everything a person needs to follow and debug a run without the
process that wrote it: the config, every metric at every step (long format), the trajectories
(decoded messages, rewards, strict scores, per-turn token counts and finish reasons, but not the
token ids or logprobs, which only the trainer needs), the evaluations and the diagnostics.

Why it is built this way:

* **One writer, many readers, at the same time.** The file is in WAL mode, so a dashboard polling
  it never blocks the trainer and always sees whole transactions. Readers open it read-only
  (``mode=ro`` URI, ``query_only``) so a bug in the dashboard cannot write to a run.
* **Every write is committed before the call returns** (``synchronous=FULL``), each call in one
  transaction, so a trainer killed at any moment (SIGKILL, OOM) leaves a file that opens and holds
  exactly the calls that returned, never half of one.
* **Resuming never duplicates.** Trajectories are keyed by (run, step, label, split, group_id,
  sample_index) and inserted with ``INSERT OR IGNORE``; metrics, evaluations and diagnostics are
  keyed and upserted, so a resumed run that replays a step rewrites it instead of adding rows.
  ``label`` (``""`` for training rollouts, ``"base"``/``"tuned"`` for evaluations) and ``split``
  are in the key so an evaluation of the base model and of the tuned one at the same step do not
  collide.
* **A schema version** in the ``meta`` table: a file from another version (or not a run store at
  all) is refused with a :class:`~mtrl_local.errors.UserError` naming both versions.

The file format (tables, keys, version) is :mod:`mtrl_local.store_schema`; what readers get back
are the dataclasses of :mod:`mtrl_local.store_records`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import sqlite_utils

from mtrl_local import __version__
from mtrl_local.errors import UserError
from mtrl_local.run_dir import STORE_FILENAME
from mtrl_local.store_records import (
    LIGHT_COLUMNS,
    TRAJECTORY_FILTERS,
    DiagnosticRecord,
    EvaluationRecord,
    RunInfo,
    TrajectoryFilter,
    TrajectoryRecord,
    diagnostic_record,
    evaluation_record,
    json_value,
    run_info,
    trajectory_record,
    trajectory_row,
)
from mtrl_local.store_schema import SCHEMA_VERSION, check_schema, connect, create_schema
from mtrl_local.trajectory import Trajectory

logger = logging.getLogger(__name__)

RunStatus = Literal["created", "running", "finished", "failed", "stopped"]


class RunStore:
    """The run store of one run directory. Build with :meth:`create` or :meth:`open`.

    Thread-safe (one lock around the connection), so rollout threads and the trainer can share
    one writer. Usable as a context manager; :meth:`close` when done.
    """

    def __init__(self, db: sqlite_utils.Database, path: Path, readonly: bool) -> None:
        self.db = db
        self.path = path
        self.readonly = readonly
        self._lock = threading.RLock()
        row = db.execute("SELECT id FROM runs ORDER BY id LIMIT 1").fetchone()
        self.run_id: int = int(row[0]) if row else 1

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, run_dir: str | Path, name: str, task: str, config: Mapping[str, Any]
    ) -> RunStore:
        """A new store in ``run_dir`` (created if needed); refuses to overwrite an existing one."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / STORE_FILENAME
        if path.exists():
            raise UserError(
                f"{path} already exists: resume that run (RunStore.open) or pick a new run_dir"
            )
        db = connect(path, readonly=False)
        now = time.time()
        with db.atomic():  # all or nothing: a reader never sees a store without its meta
            create_schema(db)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?), ('created_by', ?)",
                (str(SCHEMA_VERSION), _package_version()),
            )
            db.execute(
                "INSERT INTO runs (id, name, task, status, created_at, updated_at, config) "
                "VALUES (1, ?, ?, 'created', ?, ?, ?)",
                (name, task, now, now, json_value(dict(config))),
            )
            db.execute(
                "INSERT INTO configs (run_id, created_at, reason, config) VALUES (1, ?, ?, ?)",
                (now, "create", json_value(dict(config))),
            )
        logger.info("run store created at %s", path)
        return cls(db, path, readonly=False)

    @classmethod
    def open(cls, run_dir: str | Path, readonly: bool = False) -> RunStore:
        """Open an existing store: ``readonly=True`` for the dashboard, ``False`` to resume."""
        path = Path(run_dir) / STORE_FILENAME
        if not path.is_file():
            raise UserError(f"{path}: no run store here (is {run_dir} a run directory?)")
        db = connect(path, readonly=readonly)
        try:
            check_schema(db, path)
        except BaseException:
            db.close()
            raise
        return cls(db, path, readonly=readonly)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.readonly:
            raise RuntimeError(f"{self.path} is opened read-only")

    def _touch(self, now: float) -> None:
        # The dashboard reads updated_at as the run's heartbeat.
        self.db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now, self.run_id))

    def set_status(self, status: RunStatus, message: str | None = None) -> None:
        """Record the run's state (``running``, ``finished``, ``failed`` with the error, …)."""
        self._writable()
        with self._lock, self.db.atomic():
            self.db.execute(
                "UPDATE runs SET status = ?, message = ?, updated_at = ? WHERE id = ?",
                (status, message, time.time(), self.run_id),
            )

    def record_config(self, config: Mapping[str, Any], reason: str = "resume") -> None:
        """Make ``config`` the run's current config, keeping the previous ones in ``configs``."""
        self._writable()
        now = time.time()
        with self._lock, self.db.atomic():
            self.db.execute(
                "UPDATE runs SET config = ?, updated_at = ? WHERE id = ?",
                (json_value(dict(config)), now, self.run_id),
            )
            self.db.execute(
                "INSERT INTO configs (run_id, created_at, reason, config) VALUES (?, ?, ?, ?)",
                (self.run_id, now, reason, json_value(dict(config))),
            )

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Upsert ``{name: value}`` at ``step`` (a replayed step overwrites). NaN is kept as NULL
        and read back as NaN: a NaN loss is something the dashboard must show."""
        self._writable()
        now = time.time()
        rows = [
            (self.run_id, name, int(step), None if math.isnan(v) else v, now)
            for name, value in metrics.items()
            if value is not None
            for v in [float(value)]
        ]
        with self._lock, self.db.atomic():
            self.db.conn.executemany(
                "INSERT INTO metrics (run_id, name, step, value, wall_time) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, name, step) DO UPDATE SET "
                "value = excluded.value, wall_time = excluded.wall_time",
                rows,
            )
            self._touch(now)

    def add_trajectories(
        self, step: int, trajectories: Sequence[Trajectory], label: str = ""
    ) -> int:
        """Insert one step's trajectories in one transaction; returns how many rows were new.

        Rows already stored under the same key (a resumed run replaying a step) are left as they
        are. Two trajectories of one call with the same key are a bug in the caller (usually an
        unset ``group_id``) and raise ``ValueError`` rather than silently dropping one.
        """
        self._writable()
        now = time.time()
        rows, seen = [], set()
        for t in trajectories:
            key = (label, t.split, t.group_id, t.sample_index)
            if key in seen:
                raise ValueError(
                    f"two trajectories share (label, split, group_id, sample_index) = {key} at "
                    f"step {step}: set group_id/sample_index before storing"
                )
            seen.add(key)
            rows.append(trajectory_row(self.run_id, step, t, label, now))
        if not rows:
            return 0
        columns = list(rows[0])
        sql = (
            f"INSERT OR IGNORE INTO trajectories ({', '.join(columns)}) "
            f"VALUES ({', '.join(':' + c for c in columns)})"
        )
        with self._lock, self.db.atomic():
            before = self.db.conn.total_changes
            self.db.conn.executemany(sql, rows)
            inserted = self.db.conn.total_changes - before
            self._touch(now)
        if inserted < len(rows):
            logger.info("step %d: %d trajectories already stored", step, len(rows) - inserted)
        return inserted

    def add_evaluation(self, step: int, split: str, label: str, report: Mapping[str, Any]) -> None:
        """Upsert an evaluation report (e.g. ``evaluate.summarize``'s dict) for (step, split,
        label); ``label`` names the model: ``base``, ``tuned``, ``reference``."""
        self._writable()
        now = time.time()
        with self._lock, self.db.atomic():
            self.db.execute(
                "INSERT INTO evaluations (run_id, step, split, label, report, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, step, split, label) DO UPDATE SET "
                "report = excluded.report, created_at = excluded.created_at",
                (self.run_id, int(step), split, label, json_value(dict(report)), now),
            )
            self._touch(now)

    def add_diagnostic(
        self,
        step: int,
        code: str,
        severity: str,
        message: str,
        evidence: Mapping[str, Any] | None = None,
        first_change: str | None = None,
        confirm_with: str | None = None,
    ) -> None:
        """Upsert one finding at ``step`` (one row per (step, code))."""
        self._writable()
        now = time.time()
        with self._lock, self.db.atomic():
            self.db.execute(
                "INSERT INTO diagnostics (run_id, step, code, severity, message, evidence, "
                "first_change, confirm_with, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, step, code) DO UPDATE SET severity = excluded.severity, "
                "message = excluded.message, evidence = excluded.evidence, "
                "first_change = excluded.first_change, confirm_with = excluded.confirm_with, "
                "created_at = excluded.created_at",
                (
                    self.run_id,
                    int(step),
                    code,
                    severity,
                    message,
                    json_value(dict(evidence or {})),
                    first_change,
                    confirm_with,
                    now,
                ),
            )
            self._touch(now)

    def add_findings(self, findings: Iterable[Any]) -> None:
        """Store :class:`mtrl_local.diagnostics.Finding` objects (each at its own step)."""
        for f in findings:
            self.add_diagnostic(
                f.step, f.code, f.severity, f.message, f.evidence, f.first_change, f.confirm_with
            )

    # -- reading -----------------------------------------------------------------------------------
    def _rows(self, sql: str, params: dict[str, Any] | Sequence[Any] = ()) -> list[dict]:
        with self._lock:
            return list(self.db.query(sql, params))

    def run(self) -> RunInfo:
        """Name, task, status (and its message), timestamps and the current config."""
        return run_info(self._rows("SELECT * FROM runs WHERE id = ?", [self.run_id])[0])

    def steps(self) -> list[int]:
        """Every step that has metrics or trajectories, ascending."""
        rows = self._rows(
            "SELECT step FROM metrics WHERE run_id = :r UNION "
            "SELECT step FROM trajectories WHERE run_id = :r ORDER BY step",
            {"r": self.run_id},
        )
        return [int(r["step"]) for r in rows]

    def metric_names(self) -> list[str]:
        rows = self._rows(
            "SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", [self.run_id]
        )
        return [r["name"] for r in rows]

    def metric_series(self, name: str) -> list[tuple[int, float]]:
        """``[(step, value), …]`` ascending by step; a stored NaN reads back as NaN."""
        rows = self._rows(
            "SELECT step, value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step",
            [self.run_id, name],
        )
        return [(int(r["step"]), _float(r["value"])) for r in rows]

    def history(self, names: Iterable[str] | None = None) -> dict[str, list[tuple[int, float]]]:
        """Every series (or those named): the input of :func:`mtrl_local.diagnostics.diagnose`."""
        wanted = self.metric_names() if names is None else list(names)
        return {n: self.metric_series(n) for n in wanted}

    def latest_metrics(self) -> dict[str, float]:
        """Each metric's value at the last step it was logged at."""
        rows = self._rows(
            "SELECT m.name, m.value FROM metrics m WHERE m.run_id = :r AND m.step = "
            "(SELECT max(step) FROM metrics WHERE run_id = :r AND name = m.name)",
            {"r": self.run_id},
        )
        return {r["name"]: _float(r["value"]) for r in rows}

    def trajectories(
        self,
        step: int | None = None,
        filter: TrajectoryFilter | None = None,
        *,
        split: str | None = None,
        label: str | None = None,
        threshold: float = 1.0,
        limit: int | None = None,
        with_messages: bool = False,
    ) -> list[TrajectoryRecord]:
        """Stored trajectories (all steps when ``step`` is None), by step, group, sample.

        ``filter``: ``failures`` (environment failure or ``error``), ``truncated`` (a turn hit
        ``sampling_max_tokens``), ``zero_reward``, ``disagree`` (reward ≥ ``threshold`` but strict
        0, or reward < ``threshold`` but strict 1: the ones to read after a reward change).
        ``messages``/``ground_truth`` are loaded only with ``with_messages`` (they are large);
        :meth:`trajectory` loads them for one row.
        """
        where = ["run_id = :r"]
        params: dict[str, Any] = {"r": self.run_id, "threshold": threshold}
        if step is not None:
            where.append("step = :step")
            params["step"] = int(step)
        if split is not None:
            where.append("split = :split")
            params["split"] = split
        if label is not None:
            where.append("label = :label")
            params["label"] = label
        if filter is not None:
            if filter not in TRAJECTORY_FILTERS:
                known = list(TRAJECTORY_FILTERS)
                raise ValueError(f"unknown trajectory filter {filter!r}; one of {known}")
            where.append(TRAJECTORY_FILTERS[filter])
        columns = "*" if with_messages else LIGHT_COLUMNS
        sql = (
            f"SELECT {columns} FROM trajectories WHERE {' AND '.join(where)} "
            "ORDER BY step, label, split, group_id, sample_index"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [trajectory_record(r) for r in self._rows(sql, params)]

    def trajectory(self, trajectory_id: int) -> TrajectoryRecord | None:
        """One trajectory with its messages and ground truth, or ``None``."""
        rows = self._rows("SELECT * FROM trajectories WHERE id = ?", [int(trajectory_id)])
        return trajectory_record(rows[0]) if rows else None

    def evaluations(
        self, split: str | None = None, label: str | None = None
    ) -> list[EvaluationRecord]:
        where, params = ["run_id = :r"], {"r": self.run_id, "split": split, "label": label}
        if split is not None:
            where.append("split = :split")
        if label is not None:
            where.append("label = :label")
        sql = f"SELECT * FROM evaluations WHERE {' AND '.join(where)} ORDER BY step, split, label"
        return [evaluation_record(r) for r in self._rows(sql, params)]

    def diagnostics(self, step: int | None = None) -> list[DiagnosticRecord]:
        where, params = ["run_id = :r"], {"r": self.run_id, "step": step}
        if step is not None:
            where.append("step = :step")
        sql = f"SELECT * FROM diagnostics WHERE {' AND '.join(where)} ORDER BY step, code"
        return [diagnostic_record(r) for r in self._rows(sql, params)]


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _package_version() -> str:
    return f"mtrl-local {__version__}"
