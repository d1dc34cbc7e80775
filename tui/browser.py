"""The trajectory browser: a step's rollouts, filtered, and one opened turn by turn.

A widget of its own because it has its own state (step, filter, open trajectory) and its own
reads of the store, done in worker threads through the ``read`` function the app gives it (which
holds the app's store lock), so the UI never waits on SQLite. What it shows is formatted by
:mod:`tui.trajectories`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import DataTable, Input, Static

from mtrl_local.store import RunStore
from mtrl_local.store_records import TrajectoryRecord
from tui import trajectories as T
from tui.data import Snapshot, load_trajectories, load_trajectory

#: ``read(fn)``: ``fn(store)`` in the calling (worker) thread under the app's store lock, or
#: ``None`` when there is no readable store.
Reader = Callable[[Callable[[RunStore], Any]], Any]
#: At or above this width the list and the open trajectory are side by side (see app.tcss).
XWIDE = 150
FILTER_HINT = "filter: fail | trunc | zero | dis | all, and/or words"


class TrajectoriesRead(Message):
    def __init__(self, request: tuple[Any, ...], records: list[TrajectoryRecord] | None) -> None:
        super().__init__()
        self.request = request
        self.records = records


class TrajectoryRead(Message):
    def __init__(self, record: TrajectoryRecord | None, trajectory_id: int) -> None:
        super().__init__()
        self.record = record
        self.trajectory_id = trajectory_id


class TrajectoryBrowser(Vertical):
    """List → open → read. Keys are bound on the app, which calls the methods here."""

    def __init__(self, read: Reader, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._read = read
        self.snapshot: Snapshot | None = None
        self.step: int | None = None  # None: follow the latest step
        self.all_steps = False
        self.filter: str | None = None
        self.text = ""
        self._filter_from_input = False
        self.records: list[TrajectoryRecord] = []
        self._request: tuple[Any, ...] | None = None
        self._shown: list[tuple[str, ...]] | None = None
        self.open_id: int | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="traj-bar")
        yield Input(
            placeholder="filter: fail | trunc | zero | dis | all, and/or words", id="traj-filter"
        )
        with Horizontal(id="traj-body"):
            yield DataTable(id="traj-list", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="traj-detail"):
                yield Static(
                    Text("select a trajectory and press enter", style="dim"), id="traj-text"
                )

    def on_mount(self) -> None:
        self.query_one("#traj-list", DataTable).add_columns(*T.COLUMNS)
        self.query_one("#traj-filter", Input).display = False
        self._render_bar()

    # -- what is listed ----------------------------------------------------------------------------
    def set_snapshot(self, snapshot: Snapshot) -> None:
        """The store changed: re-read the listing (the step followed may have moved)."""
        self.snapshot = snapshot
        self.refresh_list()

    def current_step(self) -> int | None:
        if self.step is not None:
            return self.step
        return self.snapshot.last_step if self.snapshot else None

    def refresh_list(self, force: bool = False) -> None:
        """Ask a worker for the listing, unless that exact question was answered already."""
        s = self.snapshot
        if s is None or not s.steps:
            self._show([])
            return
        step = None if self.all_steps else self.current_step()
        request = (step, self.filter, s.run.updated_at)
        if request == self._request and not force:
            self._render_bar()
            return
        self._request = request
        self._render_bar()
        self._load_list(request)

    @work(thread=True, group="trajectories")
    def _load_list(self, request: tuple[Any, ...]) -> None:
        step, filter_, _ = request
        records = self._read(lambda store: load_trajectories(store, step, filter_))
        self.post_message(TrajectoriesRead(request, records))

    def on_trajectories_read(self, message: TrajectoriesRead) -> None:
        if not self.app.is_running:
            return  # a read that finished while the app shuts down
        if message.request != self._request or message.records is None:
            return  # an answer to a question no longer asked, or no store right now
        self._show(message.records)

    def shown_records(self) -> list[TrajectoryRecord]:
        if not self.text:
            return self.records
        return [t for t in self.records if T.text_match(t, self.text)]

    def _show(self, records: list[TrajectoryRecord]) -> None:
        self.records = records
        visible = self.shown_records()
        task = self.snapshot.run.task if self.snapshot else ""
        rows = [T.list_row(t, task) for t in visible]
        if rows != self._shown:
            table = self.query_one("#traj-list", DataTable)
            keep = None
            if table.row_count and table.cursor_row < table.row_count:
                keep = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            table.clear()
            for t, row in zip(visible, rows, strict=True):
                style = "bold yellow" if T.disagrees(t) else "red" if "F" in row[-1] else ""
                table.add_row(*(Text(c, style=style) for c in row), key=str(t.id))
            if keep is not None and keep in {str(t.id) for t in visible}:
                table.move_cursor(row=table.get_row_index(keep))
            self._shown = rows
        self._render_bar()

    def _render_bar(self) -> None:
        s = self.snapshot
        bar = Text()
        if s is None or not s.steps:
            bar.append("no trajectories yet", style="dim")
        else:
            if self.all_steps:
                bar.append("all steps", style="bold")
            else:
                bar.append(f"step {self.current_step()}", style="bold")
                where = " (latest)" if self.step is None else f" of {s.steps[0]}–{s.steps[-1]}"
                bar.append(where, style="dim")
            bar.append(" · filter ", style="dim")
            bar.append(T.FILTER_LABELS[self.filter], style="bold yellow" if self.filter else "bold")
            if self.text:
                bar.append(f" · text “{self.text}”", style="bold")
            bar.append(f" · {len(self.shown_records())} shown", style="dim")
            if self.app.size.width >= XWIDE:
                hint = "   [ ] step · l latest · a all · f filter · / search · enter open"
                bar.append(hint, style="dim")
        self.query_one("#traj-bar", Static).update(bar)

    # -- one trajectory ----------------------------------------------------------------------------
    @on(DataTable.RowSelected, "#traj-list")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.open_trajectory(int(event.row_key.value))

    def open_trajectory(self, trajectory_id: int) -> None:
        """Load one trajectory (worker) and show it turn by turn."""
        self.open_id = trajectory_id
        self.query_one("#traj-text", Static).update(Text(f"loading #{trajectory_id} …"))
        self.query_one("#traj-body").add_class("-open")
        self._load_one(trajectory_id)

    @work(thread=True, group="trajectory")
    def _load_one(self, trajectory_id: int) -> None:
        record = self._read(lambda store: load_trajectory(store, trajectory_id))
        self.post_message(TrajectoryRead(record, trajectory_id))

    def on_trajectory_read(self, message: TrajectoryRead) -> None:
        if not self.app.is_running:
            return  # a read that finished while the app shuts down
        if message.trajectory_id != self.open_id:
            return
        text = self.query_one("#traj-text", Static)
        if message.record is None:
            text.update(Text(f"trajectory #{message.trajectory_id} not found", style="red"))
        else:
            text.update(T.trajectory_view(message.record))
        detail = self.query_one("#traj-detail", VerticalScroll)
        detail.scroll_home(animate=False)
        detail.focus()

    def close_trajectory(self) -> None:
        self.open_id = None
        self.query_one("#traj-body").remove_class("-open")
        self.query_one("#traj-list", DataTable).focus()

    def focus_target(self) -> Widget:
        """Where keys go when the tab is shown: the open trajectory, else the list."""
        return self.query_one("#traj-detail" if self.open_id is not None else "#traj-list")

    # -- filters and steps (called by the app's key bindings) -------------------------------------
    def open_filter(self) -> None:
        box = self.query_one("#traj-filter", Input)
        box.display = True
        box.focus()

    @on(Input.Changed, "#traj-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        chosen, text, named = T.parse_filter_query(event.value)
        if named or self._filter_from_input:  # the box owns the filter only if it named one
            self.filter = chosen
            self._filter_from_input = named
        self.text = text
        self.refresh_list()
        self._show(self.records)

    @on(Input.Submitted, "#traj-filter")
    def _filter_submitted(self) -> None:
        self.query_one("#traj-list", DataTable).focus()

    def cycle_filter(self) -> None:
        i = T.FILTERS.index(self.filter)
        self.filter = T.FILTERS[(i + 1) % len(T.FILTERS)]
        self._filter_from_input = False
        self.refresh_list()

    def move_step(self, delta: int) -> None:
        s = self.snapshot
        if s is None or not s.steps:
            return
        current = self.current_step()
        i = s.steps.index(current) if current in s.steps else len(s.steps) - 1
        i = max(0, min(len(s.steps) - 1, i + delta))
        # Back at the last step: follow it again, so new steps show up as they arrive.
        self.step = None if i == len(s.steps) - 1 else s.steps[i]
        self.all_steps = False
        self.refresh_list()

    def follow_latest(self) -> None:
        self.step, self.all_steps = None, False
        self.refresh_list()

    def toggle_all_steps(self) -> None:
        self.all_steps = not self.all_steps
        self.refresh_list()

    def escape(self) -> None:
        """Leave the filter box (hidden if empty), else close the open trajectory."""
        box = self.query_one("#traj-filter", Input)
        if box.has_focus:
            if not box.value:
                box.display = False
            self.query_one("#traj-list", DataTable).focus()
        elif self.open_id is not None:
            self.close_trajectory()
