"""What the dashboard reads from a run store, and how it finds the store (no Textual here).

Every function here does blocking SQLite I/O, so the app calls them from worker threads only.
They read through :class:`~mtrl_local.store.RunStore`'s public readers, opened read-only: the
dashboard can never write to a run, and a trainer writing the same file is never blocked (WAL).

A store that cannot be read (not there yet, half-created, another schema version) is reported as
a :class:`~mtrl_local.errors.UserError` with a one-line message the app shows on screen; the
dashboard keeps polling, so a store that appears later is picked up.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from mtrl_local.diagnostics import Finding, diagnose
from mtrl_local.errors import UserError
from mtrl_local.run_dir import STORE_FILENAME
from mtrl_local.store import RunStore
from mtrl_local.store_records import (
    DiagnosticRecord,
    EvaluationRecord,
    RunInfo,
    TrajectoryFilter,
    TrajectoryRecord,
)

#: Where ``mtrl dash`` without an argument looks for runs.
DEFAULT_RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class Snapshot:
    """Everything but the trajectories, read in one go after the store changed."""

    run: RunInfo
    #: Every step with metrics or trajectories, ascending.
    steps: list[int]
    #: Every metric series ``{name: [(step, value), …]}`` (NaN kept).
    history: dict[str, list[tuple[int, float]]]
    #: Each metric's last value.
    latest: dict[str, float]
    diagnostics: list[DiagnosticRecord]
    evaluations: list[EvaluationRecord]
    #: Highest policy version among the last step's training rollouts (``None``: none stored).
    policy_version: int | None
    #: ``diagnose(history)`` with the default thresholds: what holds now, even for a trainer
    #: that stores no findings (computed here, off the UI thread).
    findings: list[Finding] = field(default_factory=list)
    #: When the snapshot was read (Unix seconds): the heartbeat age is ``loaded_at − updated_at``.
    loaded_at: float = field(default_factory=time.time)

    @property
    def last_step(self) -> int | None:
        return self.steps[-1] if self.steps else None


def find_latest_run(root: str | Path = DEFAULT_RUNS_ROOT) -> Path | None:
    """The run directory under ``root`` whose store was written last, or ``None``.

    Looks at ``root`` itself and its direct children; "written last" is the newest modification
    time of ``run.sqlite`` or its WAL file (a live run writes the WAL, not the main file).
    """
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [root / STORE_FILENAME, *root.glob(f"*/{STORE_FILENAME}")]

    def written(path: Path) -> float:
        wal = path.with_name(path.name + "-wal")
        return max(p.stat().st_mtime for p in (path, wal) if p.exists())

    stores = [p for p in candidates if p.is_file()]
    return max(stores, key=written).parent if stores else None


def resolve_run_dir(run: str | Path | None, root: str | Path = DEFAULT_RUNS_ROOT) -> Path:
    """The run directory ``mtrl dash`` opens, or a :class:`UserError` saying why there is none.

    ``run`` given: it must be a directory holding a readable store of this schema version.
    ``run`` omitted: the newest run under ``root``. Checked before the app starts, so a typo is
    one line and exit code 2, not a full-screen app with nothing in it.
    """
    if run is None:
        found = find_latest_run(root)
        if found is None:
            raise UserError(
                f"no run under {root}/ (no {root}/<name>/{STORE_FILENAME}): "
                "pass a run directory, e.g. mtrl dash runs/<name>"
            )
        run_dir = found
    else:
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise UserError(f"{run_dir}: no such run directory")
    open_store(run_dir).close()  # refuses a missing store or another schema version, in one line
    return run_dir


def open_store(run_dir: str | Path) -> RunStore:
    """The run's store, read-only; :class:`UserError` (one line) if it cannot be read as one."""
    try:
        return RunStore.open(run_dir, readonly=True)
    except sqlite3.Error as exc:
        # A file being created, or not SQLite at all: say so instead of a traceback.
        path = Path(run_dir) / STORE_FILENAME
        raise UserError(f"{path}: cannot read the run store ({exc})") from None


def load_snapshot(store: RunStore, run: RunInfo | None = None) -> Snapshot:
    """Read the run, its metric history, diagnostics and evaluations (one call per reader)."""
    run = run or store.run()
    steps = store.steps()
    history = store.history()
    latest = store.latest_metrics()
    version = latest.get("perf/policy_version")  # the trainer logs it; else read the rollouts
    policy_version = None if version is None or version != version else int(version)
    if policy_version is None and steps:
        rollouts = store.trajectories(step=steps[-1], label="")
        if rollouts:
            policy_version = max(t.policy_version for t in rollouts)
    return Snapshot(
        run=run,
        steps=steps,
        history=history,
        latest=latest,
        diagnostics=store.diagnostics(),
        evaluations=store.evaluations(),
        policy_version=policy_version,
        findings=diagnose(history),
    )


def load_trajectories(
    store: RunStore,
    step: int | None,
    filter: TrajectoryFilter | None,
    limit: int = 2000,
) -> list[TrajectoryRecord]:
    """The listing of one step (every step when ``step`` is None), without messages.

    ``limit`` keeps the table responsive on a long run viewed across all steps.
    """
    return store.trajectories(step=step, filter=filter, limit=limit)


def load_trajectory(store: RunStore, trajectory_id: int) -> TrajectoryRecord | None:
    """One trajectory with its messages and ground truth."""
    return store.trajectory(trajectory_id)
