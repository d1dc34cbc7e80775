"""The run store: round trips, filters, resume, version checks, a live second process, SIGKILL."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtrl_local.errors import UserError
from mtrl_local.run_dir import STORE_FILENAME
from mtrl_local.store import RunStore
from mtrl_local.store_schema import SCHEMA_VERSION
from mtrl_local.trajectory import Trajectory, TurnSpan

REPO = Path(__file__).resolve().parents[1]


def traj(
    group: str,
    index: int,
    reward: float | list[float] | None = 1.0,
    strict: float | None = 1.0,
    *,
    split: str = "train",
    truncated: bool = False,
    failed: bool = False,
) -> Trajectory:
    return Trajectory(
        task="toy",
        case_id=f"case-{group}",
        split=split,
        ground_truth={"answer": "42"},
        turns=[
            TurnSpan(3, 8, "stop", tool_calls=1),
            TurnSpan(10, 14, "length" if truncated else "stop"),
        ],
        messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        done_reason="error" if failed else "final_answer",
        tool_calls=1,
        failed=failed,
        reward=reward,
        strict=strict,
        group_id=group,
        sample_index=index,
        policy_version=2,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = RunStore.create(tmp_path, "demo", "toy", {"lr": 1e-5, "group_size": 4})
    yield s
    s.close()


def test_round_trip_and_readers(store: RunStore, tmp_path: Path) -> None:
    store.set_status("running")
    store.log_metrics(0, {"rollout/reward/mean": 0.1, "train/loss": float("nan")})
    store.log_metrics(1, {"rollout/reward/mean": 0.3})
    store.log_metrics(1, {"rollout/reward/mean": 0.4})  # a replayed step overwrites
    batch = [
        traj("g0", 0, 1.0, 1.0),
        traj("g0", 1, 1.0, 0.0),  # reward high, strict 0: disagree
        traj("g1", 0, [0.0, 0.0], 0.0, truncated=True),  # zero reward, truncated
        traj("g1", 1, None, None, failed=True),
        traj("g2", 0, 0.2, 1.0),  # reward low, strict 1: disagree
    ]
    assert store.add_trajectories(1, batch) == 5
    store.add_evaluation(1, "test", "base", {"tsr": 0.2})
    store.add_evaluation(1, "test", "tuned", {"tsr": 0.5})
    store.add_diagnostic(1, "truncation_high", "warning", "raise it", {"frac": 0.2}, "raise")

    with RunStore.open(tmp_path, readonly=True) as r:
        info = r.run()
        assert (info.name, info.task, info.status) == ("demo", "toy", "running")
        assert info.config == {"lr": 1e-5, "group_size": 4}
        assert r.steps() == [0, 1]
        assert r.metric_series("rollout/reward/mean") == [(0, 0.1), (1, 0.4)]
        assert math.isnan(r.metric_series("train/loss")[0][1])
        latest = r.latest_metrics()
        assert latest["rollout/reward/mean"] == 0.4 and math.isnan(latest["train/loss"])
        assert set(r.history()) == {"rollout/reward/mean", "train/loss"}

        rows = r.trajectories(1)
        assert [(t.group_id, t.sample_index) for t in rows] == [
            ("g0", 0),
            ("g0", 1),
            ("g1", 0),
            ("g1", 1),
            ("g2", 0),
        ]
        assert rows[0].messages is None  # listings are light
        assert rows[2].per_turn_rewards == [0.0, 0.0] and rows[2].reward == 0.0
        assert rows[2].turn_tokens == [5, 4] and rows[2].finish_reasons == ["stop", "length"]
        assert rows[0].policy_version == 2 and rows[0].completed

        def keys(flt: str) -> list[tuple[str, int]]:
            return [(t.group_id, t.sample_index) for t in r.trajectories(1, flt)]  # type: ignore[arg-type]

        assert keys("failures") == [("g1", 1)]
        assert keys("truncated") == [("g1", 0)]
        assert keys("zero_reward") == [("g1", 0)]
        assert keys("disagree") == [("g0", 1), ("g2", 0)]
        assert [t.group_id for t in r.trajectories(1, "disagree", threshold=0.1)] == ["g0"]
        with pytest.raises(ValueError, match="unknown trajectory filter"):
            r.trajectories(1, "nope")  # type: ignore[arg-type]

        full = r.trajectory(rows[0].id)
        assert full is not None and full.messages is not None
        assert full.ground_truth == {"answer": "42"} and full.messages[1]["content"] == "a"
        assert r.trajectory(10_000) is None

        assert [(e.label, e.report["tsr"]) for e in r.evaluations(split="test")] == [
            ("base", 0.2),
            ("tuned", 0.5),
        ]
        (d,) = r.diagnostics()
        assert (d.code, d.evidence, d.first_change) == ("truncation_high", {"frac": 0.2}, "raise")

        with pytest.raises(RuntimeError, match="read-only"):
            r.log_metrics(2, {"x": 1.0})
        with pytest.raises(sqlite3.OperationalError):  # the connection itself is read-only
            r.db.conn.execute("DELETE FROM metrics")


def test_resume_does_not_duplicate(store: RunStore, tmp_path: Path) -> None:
    batch = [traj("g0", i) for i in range(3)]
    assert store.add_trajectories(4, batch) == 3
    store.add_diagnostic(4, "x", "warning", "m")
    store.close()
    with RunStore.open(tmp_path) as resumed:
        resumed.record_config({"lr": 2e-5}, reason="resume")
        assert resumed.add_trajectories(4, [*batch, traj("g1", 0)]) == 1
        resumed.add_diagnostic(4, "x", "error", "m2")
        # the same keys under an evaluation label or another split are other rows
        assert resumed.add_trajectories(4, batch, label="base") == 3
        assert resumed.add_trajectories(4, [traj("g0", 0, split="val")]) == 1
        assert len(resumed.trajectories(4)) == 8
        assert [(d.severity, d.message) for d in resumed.diagnostics()] == [("error", "m2")]
        assert resumed.run().config == {"lr": 2e-5}
        with pytest.raises(ValueError, match="share"):
            resumed.add_trajectories(5, [traj("", 0), traj("", 0)])
        assert resumed.trajectories(5) == []  # nothing of the refused call was written


def test_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no run store here"):
        RunStore.open(tmp_path / "nowhere")
    RunStore.create(tmp_path / "a", "n", "t", {}).close()
    with pytest.raises(UserError, match="already exists"):
        RunStore.create(tmp_path / "a", "n", "t", {})

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / STORE_FILENAME).write_bytes(b"this is not sqlite at all" * 100)
    for ro in (True, False):
        with pytest.raises(UserError, match="not an mtrl-local run store"):
            RunStore.open(junk, readonly=ro)

    other = tmp_path / "other"
    other.mkdir()
    sqlite3.connect(other / STORE_FILENAME).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(UserError, match="no meta table"):
        RunStore.open(other, readonly=True)

    conn = sqlite3.connect(tmp_path / "a" / STORE_FILENAME)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(UserError) as err:
        RunStore.open(tmp_path / "a", readonly=True)
    assert str(err.value).endswith(
        f"was written by schema version 99, this mtrl-local reads {SCHEMA_VERSION}"
    )


# A writer in another process: one step = 4 trajectories + 2 metrics, two transactions. It prints
# a step's number only after both calls returned, i.e. after they were committed.
WRITER = textwrap.dedent(
    """
    import sys, time
    from mtrl_local.store import RunStore
    from mtrl_local.trajectory import Trajectory, TurnSpan
    run_dir, n_steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    store = RunStore.open(run_dir)
    big = [{"role": "assistant", "content": "x" * 20000}]
    for step in range(n_steps):
        batch = [
            Trajectory("toy", "c", "train", {}, turns=[TurnSpan(0, 5, "stop")], messages=big,
                       reward=float(step), group_id=f"g{step}", sample_index=i)
            for i in range(4)
        ]
        store.add_trajectories(step, batch)
        store.log_metrics(step, {"rollout/reward/mean": float(step), "perf/step_s": 0.1})
        print(step, flush=True)
        time.sleep(pause)
    store.set_status("finished")
    """
)


def spawn_writer(run_dir: Path, n_steps: int, pause: float) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(run_dir), str(n_steps), str(pause)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def check_whole_steps(r: RunStore) -> list[int]:
    """Every step present has all 4 trajectories; returns the steps with trajectories."""
    counts: dict[int, int] = {}
    for t in r.trajectories():
        counts[t.step] = counts.get(t.step, 0) + 1
    assert all(c == 4 for c in counts.values()), counts
    return sorted(counts)


def test_reader_while_another_process_writes(tmp_path: Path) -> None:
    RunStore.create(tmp_path, "live", "toy", {}).close()
    writer = spawn_writer(tmp_path, n_steps=40, pause=0.01)
    reader = RunStore.open(tmp_path, readonly=True)
    seen: list[int] = []
    try:
        while writer.poll() is None:
            steps = check_whole_steps(reader)
            series = reader.metric_series("rollout/reward/mean")
            assert [s for s, _ in series] == list(range(len(series)))  # no gaps, in order
            if steps:
                assert not seen or steps[-1] >= seen[-1]  # never goes back
                seen.append(steps[-1])
            time.sleep(0.005)
        assert writer.wait(timeout=30) == 0
        assert check_whole_steps(reader) == list(range(40))
        assert reader.run().status == "finished"
        assert len(set(seen)) > 1  # the reader really saw the run grow
    finally:
        reader.close()
        if writer.poll() is None:
            writer.kill()


def test_sigkill_leaves_a_consistent_store(tmp_path: Path) -> None:
    RunStore.create(tmp_path, "killed", "toy", {}).close()
    writer = spawn_writer(tmp_path, n_steps=10_000, pause=0.0)
    assert writer.stdout is not None
    committed = -1
    try:
        while committed < 15:
            line = writer.stdout.readline()
            assert line, "writer exited early"
            committed = int(line)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    with RunStore.open(tmp_path, readonly=True) as r:
        steps = check_whole_steps(r)  # no partial step
        assert steps == list(range(len(steps)))
        assert steps[-1] >= committed  # everything reported committed is there
        metric_steps = [s for s, _ in r.metric_series("rollout/reward/mean")]
        assert metric_steps == list(range(len(metric_steps))) and metric_steps[-1] >= committed
        assert r.run().status == "created"
    with RunStore.open(tmp_path) as w:  # and a writer can resume on it
        w.log_metrics(10_001, {"x": 1.0})
