"""Hostile content in the run store and the dashboard: what a model, an agent or a disk can put
there is stored as it is, read back as it was, and shown literally, never as markup or a crash."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
from rich.console import Console

from mtrl_local.cli import main as cli_main
from mtrl_local.errors import UserError
from mtrl_local.run_dir import STORE_FILENAME
from mtrl_local.store import RunStore
from mtrl_local.trajectory import Trajectory, TurnSpan
from tui.health import health_rows, health_table, sparkline
from tui.trajectories import list_row, trajectory_view

#: Model or agent text that a renderer could mistake for instructions.
HOSTILE_TEXT = {
    "rich markup": "[bold red]pass[/] and [/nonexistent] [link=file:///etc/passwd]x[/link]",
    "ansi escapes": "\x1b[2J\x1b[31mred\x1b[0m \x1b]0;title\x07",
    "nul and controls": "a\x00b\x07c\x08d\re",
    "lone surrogate": "half a pair: \ud800 here",
    "a megabyte on one line": "A" * 1_000_000,
    "unbalanced tags": "<tool_call>" * 20_000 + "<final_response>{" * 20_000,
    "right-to-left override": "\u202epass\u202c",
}


def store_with(tmp_path: Path, content: str, reward: float | list[float] = 1.0) -> RunStore:
    store = RunStore.create(tmp_path, "adv", "aircraft_inspection", {"learning_rate": 1e-5})
    traj = Trajectory(
        task="aircraft_inspection",
        case_id="case-1",
        split="train",
        ground_truth={"aircraft_ready": True},
        input_ids=[1, 2, 3],
        loss_mask=[0, 1, 1],
        turns=[TurnSpan(start=1, end=3, finish_reason="stop")],
        messages=[
            {"role": "system", "content": content},
            {"role": "user", "content": content},
            {"role": "assistant", "content": content},
            {"role": "tool", "content": content},
        ],
        reward=reward,
        strict=0.0,
        group_id="g0",
        done_reason="no_action",
    )
    assert store.add_trajectories(0, [traj]) == 1
    return store


def render(renderable: object, width: int = 100) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize("name", sorted(HOSTILE_TEXT))
def test_hostile_text_is_stored_and_read_back(tmp_path: Path, name: str) -> None:
    content = HOSTILE_TEXT[name]
    store = store_with(tmp_path, content)
    [row] = store.trajectories()
    record = store.trajectory(row.id)
    store.close()
    assert record is not None
    stored = {m["content"] for m in record.messages}
    expected = content.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    assert stored == {content} or stored == {expected}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEXT))
def test_hostile_text_renders_literally(tmp_path: Path, name: str) -> None:
    store = store_with(tmp_path, HOSTILE_TEXT[name])
    [row] = store.trajectories()
    record = store.trajectory(row.id)
    store.close()
    assert record is not None
    text = render(trajectory_view(record))
    render(list_row(row))
    if name == "rich markup":
        assert "[/nonexistent]" in text and "[bold red]pass[/]" in text
    if name == "ansi escapes":
        assert "\x1b" not in text


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_are_kept_and_shown(tmp_path: Path, value: float) -> None:
    store = RunStore.create(tmp_path, "adv", "aircraft_inspection", {})
    for step in range(5):
        store.log_metrics(step, {"train/loss": value, "rollout/reward/mean": 0.1 * step})
    history = store.history()
    store.close()
    [(_, stored)] = history["train/loss"][-1:]
    assert (math.isnan(stored) and math.isnan(value)) or stored == value
    render(health_table(health_rows(history, {})))
    assert len(sparkline(history["train/loss"])) <= 16


@pytest.mark.parametrize(
    "reward", [math.nan, math.inf, [0.5, math.nan]], ids=["nan", "inf", "per-turn-nan"]
)
def test_a_non_finite_reward_does_not_break_the_browser(tmp_path: Path, reward: object) -> None:
    store = store_with(tmp_path, "text", reward=reward)  # type: ignore[arg-type]
    [row] = store.trajectories()
    record = store.trajectory(row.id)
    store.close()
    assert record is not None
    render(trajectory_view(record))
    render(list_row(row))


# -------------------------------------------------------------------- files that are not stores


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage " * 1000,
        b"SQLite format 3\x00" + b"\x00" * 84,
    ],
    ids=["empty", "garbage", "header-only"],
)
def test_mtrl_dash_on_a_file_that_is_not_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    (tmp_path / STORE_FILENAME).write_bytes(content)
    assert cli_main(["dash", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mtrl: error: "), err
    assert str(tmp_path / STORE_FILENAME) in err
    assert (tmp_path / STORE_FILENAME).read_bytes() == content


def test_mtrl_dash_on_a_truncated_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_with(tmp_path, "text").close()
    path = tmp_path / STORE_FILENAME
    path.write_bytes(path.read_bytes()[:1500])
    assert cli_main(["dash", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err, err


def test_mtrl_dash_on_a_sqlite_file_of_another_program(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(tmp_path / STORE_FILENAME) as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
    assert cli_main(["dash", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an mtrl-local run store" in err, err


def test_a_store_is_never_created_twice(tmp_path: Path) -> None:
    store_with(tmp_path, "first").close()
    with pytest.raises(UserError, match="already exists"):
        RunStore.create(tmp_path, "again", "aircraft_inspection", {})
    with RunStore.open(tmp_path, readonly=True) as store:
        record = store.trajectory(store.trajectories()[0].id)
    assert record is not None and record.messages[0]["content"] == "first"


def test_a_readonly_store_refuses_writes(tmp_path: Path) -> None:
    store_with(tmp_path, "text").close()
    with RunStore.open(tmp_path, readonly=True) as store, pytest.raises(Exception):  # noqa: B017
        store.log_metrics(1, {"x": 1.0})
    with RunStore.open(tmp_path, readonly=True) as store:
        assert store.metric_names() == []
