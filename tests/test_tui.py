"""The dashboard, driven by Textual's pilot against run stores written by the real writer.

The fixture run is made of real episodes: the scripted (noisy expert) policies of
``aircraft_inspection``, scored by the dense reward, their ``rollout/*`` metrics computed by
``mtrl_local.metrics``, val metrics by ``evaluate.summarize``, findings by ``diagnose`` — plus one
seeded trajectory whose reward is 1.0 under ``rewards.examples:lenient_reward`` while the strict
scorer gives it 0. Assertions are on what is on screen.
"""

from __future__ import annotations

import asyncio
import functools
import io
import sqlite3
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual.widgets import TabbedContent

from mtrl_local.cli import main as cli_main
from mtrl_local.diagnostics import diagnose
from mtrl_local.errors import UserError
from mtrl_local.plugins import load_task
from mtrl_local.run_dir import STORE_FILENAME
from mtrl_local.scoring import scalar
from mtrl_local.store import RunStore
from tui.app import Dashboard
from tui.data import find_latest_run, resolve_run_dir
from tui.demo import TASK, disagreeing_trajectory, write_evaluation, write_step, write_val
from tui.health import health_rows
from tui.screenshots import VIEWS, save_screenshots

STEPS = 30
SEEDED_STEP = 20
POLL_S = 0.2


# -- helpers ---------------------------------------------------------------------------------------
def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest async plugin needed)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


def screen_text(app: Dashboard) -> str:
    """The characters on the app's screen now (what a person would read)."""
    console = Console(
        width=app.size.width,
        height=app.size.height,
        file=io.StringIO(),
        record=True,
        color_system=None,
        legacy_windows=False,
    )
    console.print(
        app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    )
    return console.export_text()


async def wait_for(pilot, check: Callable[[], bool], what: str, timeout: float = 8.0) -> None:
    """Let the app run until ``check()`` holds; fail naming ``what`` and showing the screen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.05)
        if check():
            return
    raise AssertionError(f"timed out waiting for {what}; screen:\n{screen_text(pilot.app)}")


def flat(text: str) -> str:
    """Whitespace runs as one space: a message wrapped over two lines still reads as one."""
    return " ".join(text.split())


async def on_screen(pilot, *needles: str, timeout: float = 8.0) -> str:
    """Wait until every needle is on screen (whitespace-insensitive); return the screen flat."""
    await wait_for(
        pilot,
        lambda: all(flat(n) in flat(screen_text(pilot.app)) for n in needles),
        f"{needles!r} on screen",
        timeout,
    )
    return flat(screen_text(pilot.app))


def new_store(run_dir: Path, steps: int = STEPS) -> RunStore:
    task = load_task(TASK)
    config = {"task": TASK, "max_steps": steps, "max_turns": task.max_turns}
    return RunStore.create(run_dir, "tui-test", TASK, config)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A finished 30-step run; returns ``(run_dir, id of the seeded disagreeing trajectory)``."""
    run_dir = tmp_path_factory.mktemp("run")
    task = load_task(TASK)
    store = new_store(run_dir)
    store.set_status("running")
    for step in range(STEPS):
        write_step(store, task, step, STEPS)  # real episodes → add_trajectories + log_metrics
        if step % 5 == 0 or step == STEPS - 1:
            write_val(store, task, step, STEPS)
        store.add_findings(diagnose(store.history()))
        if step == SEEDED_STEP:
            seeded = disagreeing_trajectory(
                task, task.cases("train")[7], group_id="seeded", policy_version=step
            )
            assert seeded.reward is not None and scalar(seeded.reward) >= 1.0
            assert seeded.strict == 0.0
            store.add_trajectories(step, [seeded])
    write_evaluation(store, task, STEPS - 1)
    store.set_status("finished")
    [seeded_row] = store.trajectories(filter="disagree")
    store.close()
    return run_dir, seeded_row.id


async def loaded(pilot) -> None:
    await wait_for(pilot, lambda: pilot.app.snapshot is not None, "the first snapshot")


# -- views and keys --------------------------------------------------------------------------------
@run_async
async def test_keys_switch_views_in_80x24(run: tuple[Path, int]) -> None:
    app = Dashboard(run[0], poll_s=POLL_S)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        text = await on_screen(pilot, "reward (train)", "truncated", "step 29")
        for label in ("zero-adv groups", "completion", "env failures", "val pass@1"):
            assert label in text
        assert "policy v29" in text and "staleness" in text and "tok/s" in text

        await pilot.press("2")
        text = await on_screen(pilot, "reward: train vs val", "truncated · failures")
        assert "step" in text  # an x axis, not just numbers
        assert app.query_one("#tabs", TabbedContent).active == "curves"

        await pilot.press("3")
        await on_screen(pilot, "truncation_high", "fired at step", "raise sampling_max_tokens")

        await pilot.press("5")
        text = await on_screen(pilot, "TSR (strict)", "base", "tuned", "field accuracy")
        assert "pass@1 (strict)" in text and "completion" in text

        await pilot.press("question_mark")
        await on_screen(pilot, "cycle: all → failures")
        await pilot.press("escape")
        await wait_for(pilot, lambda: "cycle: all" not in screen_text(app), "help closed")

        await pilot.press("1")
        await on_screen(pilot, "reward (train)")
        await pilot.press("q")
        await pilot.pause(0.1)
    assert not app.is_running


@run_async
async def test_health_uses_a_wide_terminal(run: tuple[Path, int]) -> None:
    app = Dashboard(run[0], poll_s=POLL_S)
    async with app.run_test(size=(160, 40)) as pilot:
        await loaded(pilot)
        # Wide: metric names and the active findings beside the table.
        text = await on_screen(pilot, "rollout/truncated_frac", "Active findings")
        assert "→ raise sampling_max_tokens" in text


@run_async
async def test_trajectory_browser_opens_a_trajectory_turn_by_turn(run: tuple[Path, int]) -> None:
    app = Dashboard(run[0], poll_s=POLL_S)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("4")
        await on_screen(pilot, "step 29 (latest)", "8 shown")
        await pilot.press("left_square_bracket")
        await on_screen(pilot, "step 28 of 0–29")
        await pilot.press("enter")
        text = await on_screen(pilot, "── turn 1", "call lookup_aircraft", "↳ lookup_aircraft")
        assert "finish=stop" in text and "reward" in text
        detail = app.query_one("#traj-detail")
        detail.scroll_end(animate=False)
        text = await on_screen(pilot, "final answer", "fields right", "tail_number")
        assert "✓" in text or "✗" in text
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.browser.open_id is None, "the list again")
        assert "s28g0:0" in screen_text(app)

        # ``/`` with words that name no filter: a text match on case, group, end reason.
        await pilot.press("slash", *"s28g1", "enter")
        await on_screen(pilot, "text “s28g1”", "4 shown")
        assert {t.group_id for t in app.browser.shown_records()} == {"s28g1"}


@run_async
async def test_disagreement_filter_finds_the_seeded_trajectory(run: tuple[Path, int]) -> None:
    run_dir, seeded_id = run
    app = Dashboard(run_dir, poll_s=POLL_S)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("slash", "d", "i", "s", "enter")
        await pilot.press("a")  # every step, not only the latest
        text = await on_screen(pilot, "all steps", "filter reward ≠ strict", "1 shown")
        assert [t.id for t in app.browser.records] == [seeded_id]
        assert "seeded:0" in text
        await pilot.press("enter")
        text = await on_screen(pilot, "reward and strict disagree", "reward 1.00", "strict 0.00")
        app.query_one("#traj-detail").scroll_end(animate=False)
        text = await on_screen(pilot, "no <final_response> block", "right value, not read")
        assert "0/7 fields right" in text

        # ``f`` cycles the store filters; after reward ≠ strict comes "all" again.
        await pilot.press("escape", "f")
        await on_screen(pilot, "filter all")
        await pilot.press("f", "f")
        await on_screen(pilot, "filter truncated")
        assert app.browser.records and all(t.truncated for t in app.browser.records)


# -- a live run ------------------------------------------------------------------------------------
@run_async
async def test_a_step_written_while_the_app_runs_shows_up(tmp_path: Path) -> None:
    task = load_task(TASK)
    writer = new_store(tmp_path, steps=6)
    writer.set_status("running")
    for step in range(3):
        write_step(writer, task, step, 6)
    app = Dashboard(tmp_path, poll_s=POLL_S)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await on_screen(pilot, "step 2", "running")
        await pilot.press("4")
        await on_screen(pilot, "step 2 (latest)")

        started = time.monotonic()
        write_step(writer, task, 3, 6)
        await on_screen(pilot, "step 3 (latest)", "s3g0:0", timeout=5.0)
        assert time.monotonic() - started < 3.0  # "new steps appear within ~2 s"
        assert app.snapshot is not None and app.snapshot.last_step == 3
    writer.close()


# -- stores it cannot (yet) show -------------------------------------------------------------------
@run_async
async def test_empty_store_says_so_then_follows_the_first_step(tmp_path: Path) -> None:
    writer = new_store(tmp_path)
    app = Dashboard(tmp_path, poll_s=POLL_S)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await on_screen(pilot, "no steps logged yet")
        for key in "2345":
            await pilot.press(key)
            await pilot.pause(0.05)
        await on_screen(pilot, "No evaluation stored yet")
        write_step(writer, load_task(TASK), 0, 2)
        await on_screen(pilot, "step 0")
    writer.close()


@run_async
async def test_store_mid_write_shows_the_last_commit_without_blocking(tmp_path: Path) -> None:
    writer = new_store(tmp_path)
    write_step(writer, load_task(TASK), 0, 2)
    writer.close()
    # Another writer in the middle of a transaction (a trainer between BEGIN and COMMIT).
    conn = sqlite3.connect(tmp_path / STORE_FILENAME, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "INSERT INTO metrics (run_id, name, step, value, wall_time) "
        "VALUES (1, 'rollout/reward/mean', 7, 0.5, 0)"
    )
    conn.execute("UPDATE runs SET updated_at = updated_at + 1")
    app = Dashboard(tmp_path, poll_s=POLL_S)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        text = await on_screen(pilot, "step 0")
        assert "step 7" not in text and app.problem is None
        conn.execute("COMMIT")
        await on_screen(pilot, "step 7")
    conn.close()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "no meta table"),  # the file exists, the schema is not committed yet
        (b"this is not sqlite" * 100, "not an mtrl-local run store"),
    ],
)
@run_async
async def test_a_store_being_created_or_not_a_store_is_a_message(
    tmp_path: Path, content: bytes, says: str
) -> None:
    (tmp_path / STORE_FILENAME).write_bytes(content)
    app = Dashboard(tmp_path, poll_s=POLL_S)
    async with app.run_test(size=(80, 24)) as pilot:
        text = await on_screen(pilot, says, "waiting for the run store")
        assert "Traceback" not in text
        await pilot.press("4")
        await on_screen(pilot, "no trajectories yet")


@pytest.mark.parametrize("version", ["0", "99"])
@run_async
async def test_another_schema_version_is_a_clear_message(tmp_path: Path, version: str) -> None:
    new_store(tmp_path).close()
    with sqlite3.connect(tmp_path / STORE_FILENAME) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    app = Dashboard(tmp_path, poll_s=POLL_S)
    async with app.run_test(size=(100, 24)) as pilot:
        await on_screen(pilot, f"schema version {version}", "reads 1")
    with pytest.raises(UserError, match=f"schema version {version}"):
        resolve_run_dir(tmp_path)


# -- the CLI ---------------------------------------------------------------------------------------
def test_mtrl_dash_refuses_a_missing_run_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["dash", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such run directory" in err
    assert cli_main(["dash", str(tmp_path)]) == 2
    assert "no run store here" in capsys.readouterr().err
    assert cli_main(["dash", "--runs", str(tmp_path)]) == 2
    assert "no run under" in capsys.readouterr().err


def test_newest_run_is_the_default(tmp_path: Path) -> None:
    new_store(tmp_path / "old").close()
    time.sleep(0.05)
    new_store(tmp_path / "new").close()
    (tmp_path / "eval-x").mkdir()  # an evaluation directory has no store: never picked
    assert find_latest_run(tmp_path) == tmp_path / "new"
    assert resolve_run_dir(None, root=tmp_path) == tmp_path / "new"


# -- judgements ------------------------------------------------------------------------------------
def test_health_colours_follow_the_design_thresholds() -> None:
    steps = range(10)
    rows = {
        r.metric: r
        for r in health_rows(
            {
                "rollout/truncated_frac": [(s, 0.08) for s in steps],
                "rollout/failure_rate": [(s, 0.02) for s in steps],
                "analysis/zero_adv_groups": [(s, 0.3 + 0.05 * s) for s in steps],
                "rollout/completion_rate": [(s, 0.95) for s in steps],
            }
        )
    }
    assert rows["rollout/truncated_frac"].status == "warn"  # > 5 %: raise sampling_max_tokens
    assert rows["rollout/failure_rate"].status == "bad"  # > 1 %: an environment bug
    assert rows["analysis/zero_adv_groups"].status == "warn"  # rising
    assert rows["rollout/completion_rate"].status == "ok"
    assert rows["rollout/reward/mean"].status == "none"


# -- screenshots -----------------------------------------------------------------------------------
def test_screenshots_of_every_view(run: tuple[Path, int], tmp_path: Path) -> None:
    saved = asyncio.run(save_screenshots(run[0], tmp_path, size=(100, 30)))
    assert [p.name for p in saved] == [f"{stem}.svg" for stem, _ in VIEWS]
    trajectory = (tmp_path / "trajectory.svg").read_text()
    assert "<svg" in trajectory and "disagree" in trajectory
