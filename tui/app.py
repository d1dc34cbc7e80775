"""The terminal dashboard: ``mtrl dash [RUN]`` (or ``make dash RUN=…``).

Five views over one run store — health, curves, diagnostics, trajectories, evaluation — that
follow a live run. Why it is built this way:

* **It never blocks on the store.** A timer on the UI thread starts a worker thread that reads the
  store (read-only, WAL: the trainer is never blocked either) and posts the result back as a
  message; the UI only formats. A poll that finds ``runs.updated_at`` unchanged reads nothing
  else, so a finished run costs one tiny query per second.
* **A store it cannot read is a message, not a traceback** — not there yet, half-created,
  another schema version — and polling goes on, so a store that appears is picked up.
* **Content is plain functions** (:mod:`tui.format`, :mod:`tui.trajectories`), testable without
  a terminal; this module only places widgets and routes keys.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Footer, Static, TabbedContent, TabPane
from textual_plotext import PlotextPlot

from mtrl_local.errors import UserError
from mtrl_local.store import RunStore
from mtrl_local.store_records import DiagnosticRecord
from tui import curves, reports
from tui import health as H
from tui.browser import XWIDE, TrajectoryBrowser
from tui.data import Snapshot, load_snapshot, open_store

R = TypeVar("R")

#: Tab ids in key order: ``1`` … ``5`` switch to them.
TABS = ("health", "curves", "diagnostics", "trajectories", "evaluation")
#: At or above this width the health tab shows metric names and the findings beside the table.
WIDE = 120

HELP = """\
[b]mtrl dash[/b] — a run store, live or finished

[b]keys[/b]
  1 … 5   health · curves · diagnostics · trajectories · evaluation
  ?       this help        q  quit        r  re-read the store now
  /       filter trajectories: a filter name (fail, trunc, zero, dis, all)
          and/or words matched against case, group, end reason
  f       cycle: all → failures → truncated → zero reward → reward ≠ strict
  [  ]    previous / next step    l  follow the latest step    a  all steps
  enter   open the selected trajectory          esc  back to the list

[b]views[/b]
  1 health       step, policy version, staleness, speed; each metric's
                 latest value, trend and judgement (green ok · yellow look ·
                 red act on it)
  2 curves       reward train vs val · zero reward & zero-advantage groups ·
                 truncation & failures · completion & val pass@1
  3 diagnostics  findings that hold now: the step they fired at, evidence,
                 the first change to make
  4 trajectories a step's rollouts (flags: F failed, T truncated, ≠ reward
                 and strict disagree, 0 zero reward); enter reads one turn
                 by turn, answer fields ✓/✗ against the ground truth
  5 evaluation   base vs tuned (TSR, pass@k, completion, field accuracy)

[dim]esc / ? / q to close[/dim]"""


# -- messages from the worker threads --------------------------------------------------------------
class StoreRead(Message):
    """A poll's result: a new snapshot, or why the store cannot be read."""

    def __init__(self, snapshot: Snapshot | None, problem: str | None) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.problem = problem


class HelpScreen(ModalScreen[None]):
    """The key and view summary (``?``)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "dismiss", "close"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Static(HELP, id="help-text")


class Dashboard(App[None]):
    """The dashboard over the run store in ``run_dir``; ``poll_s`` between reads of it."""

    CSS_PATH = str(Path(__file__).with_name("app.tcss"))
    TITLE = "mtrl dash"
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [  # type: ignore[misc]
        (0, "-narrow"),
        (WIDE, "-wide"),
        (XWIDE, "-xwide"),
    ]
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(str(i + 1), f"show_tab('{tab}')", tab, show=False) for i, tab in enumerate(TABS)),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("slash", "filter", "filter", key_display="/"),
        Binding("f", "cycle_filter", "cycle filter"),
        Binding("left_square_bracket", "step(-1)", "prev step", key_display="["),
        Binding("right_square_bracket", "step(1)", "next step", key_display="]"),
        Binding("l", "latest", "latest", show=False),
        Binding("a", "all_steps", "all steps", show=False),
        Binding("r", "reload", "reload", show=False),
        Binding("escape", "escape", "back", show=False),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, run_dir: str | Path, poll_s: float = 1.0) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.poll_s = poll_s
        self.snapshot: Snapshot | None = None
        self.problem: str | None = None
        # Touched only by the poll worker, under _io_lock.
        self._store: RunStore | None = None
        self._seen: tuple[float, str] | None = None
        self._io_lock = threading.Lock()
        self._force = False

    # -- layout ------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static(id="statusline")
        yield Static(id="notice")
        with TabbedContent(initial="health", id="tabs"):
            with TabPane("1 Health", id="health"), Horizontal(id="health-body"):
                with VerticalScroll(id="health-main"):
                    yield Static(id="vitals")
                    yield Static(id="health-table")
                with VerticalScroll(id="health-side"):
                    yield Static(id="health-findings")
            with TabPane("2 Curves", id="curves"), Grid(id="curves-grid"):
                for curve in curves.CURVES:
                    yield PlotextPlot(id=f"plot-{curve.id}")
            with TabPane("3 Diagnostics", id="diagnostics"), VerticalScroll():
                yield Static(id="diag")
            with TabPane("4 Trajectories", id="trajectories"):
                yield TrajectoryBrowser(self.with_store, id="browser")
            with TabPane("5 Evaluation", id="evaluation"), VerticalScroll():
                yield Static(id="eval")
        yield Footer()

    @property
    def browser(self) -> TrajectoryBrowser:
        return self.query_one("#browser", TrajectoryBrowser)

    def on_mount(self) -> None:
        self.query_one("#notice", Static).display = False
        self._render_all()
        self._tick()
        self.set_interval(self.poll_s, self._tick)

    def on_unmount(self) -> None:
        with self._io_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # -- polling -----------------------------------------------------------------------------------
    def _tick(self) -> None:
        """Every ``poll_s``: refresh the heartbeat age and start a read of the store."""
        if not self.is_running:
            return  # shutting down: the widgets are being removed
        self._render_status()
        self._poll(self._force)
        self._force = False

    @work(thread=True, group="poll")
    def _poll(self, force: bool) -> None:
        """Read the store if it changed (worker thread). Skips if a read is still running."""
        if not self._io_lock.acquire(blocking=False):
            return
        try:
            self.post_message(self._read(force))
        finally:
            self._io_lock.release()

    def _read(self, force: bool) -> StoreRead:
        if self._store is None:
            try:
                self._store = open_store(self.run_dir)
            except UserError as exc:
                self._seen = None
                return StoreRead(None, str(exc))
        try:
            run = self._store.run()
            seen = (run.updated_at, run.status)
            if seen == self._seen and not force:
                return StoreRead(None, None)
            snapshot = load_snapshot(self._store, run)
            self._seen = seen
            return StoreRead(snapshot, None)
        except (sqlite3.Error, ValueError, KeyError, IndexError) as exc:
            # A store replaced or damaged under us: drop the connection, reopen next poll.
            self._store.close()
            self._store, self._seen = None, None
            return StoreRead(None, f"{self.run_dir}: cannot read the run store ({exc})")

    def with_store(self, fn: Callable[[RunStore], R]) -> R | None:
        """``fn(store)`` in the calling worker thread under the store lock; ``None`` without a
        readable store (the poll reports why)."""
        with self._io_lock:
            if self._store is None:
                return None
            try:
                return fn(self._store)
            except sqlite3.Error:
                return None

    def on_store_read(self, message: StoreRead) -> None:
        if not self.is_running:
            return  # a read that finished while the app shuts down
        if message.problem is not None:
            self.problem = message.problem
            self._render_notice()
            return
        if message.snapshot is None:
            return  # unchanged since the last read
        self.snapshot = message.snapshot
        self.problem = None
        self._render_all()
        self.browser.set_snapshot(message.snapshot)

    # -- rendering ---------------------------------------------------------------------------------
    def _render_notice(self) -> None:
        notice = self.query_one("#notice", Static)
        notice.display = self.problem is not None
        if self.problem is not None:
            notice.update(Text(self.problem, style="bold"))
        self._render_status()

    def _render_status(self) -> None:
        s = self.snapshot
        line = Text("mtrl dash ", style="bold")
        if s is None:
            what = "waiting for the run store" if self.problem else "reading the run store"
            line.append(f"· {self.run_dir.name or self.run_dir} · {what}", style="dim")
        else:
            line.append(f"· {s.run.name} ({s.run.task}) ", style="")
            if s.last_step is None:
                line.append("· no steps logged yet: waiting for the trainer ", style="yellow")
            else:
                line.append(f"· step {s.last_step} ", style="bold")
            style = {"running": "green", "finished": "cyan", "failed": "bold red"}.get(
                s.run.status, "yellow"
            )
            line.append("· ")
            line.append(s.run.status, style=style)
            line.append(f" · written {H.ago(time.time() - s.run.updated_at)} ago", style="dim")
        self.query_one("#statusline", Static).update(line)

    def _render_all(self) -> None:
        self._render_notice()
        self._render_health()
        self._render_curves()
        self._render_diagnostics()
        self._render_evaluation()

    def _wide(self) -> bool:
        return self.size.width >= WIDE

    def on_resize(self) -> None:
        self._render_health()

    def _active(self) -> tuple[list[reports.ActiveFinding], list[DiagnosticRecord]]:
        s = self.snapshot
        if s is None:
            return [], []
        return reports.active_findings(s.findings, s.diagnostics, s.last_step)

    def _render_health(self) -> None:
        s = self.snapshot
        table = self.query_one("#health-table", Static)
        if s is None:
            self.query_one("#vitals", Static).update("")
            table.update(Text("no run store read yet", style="dim"))
            self.query_one("#health-findings", Static).update("")
            return
        self.query_one("#vitals", Static).update(H.vitals(s))
        if not s.steps:
            table.update(
                Text("\nno steps logged yet: the trainer has not written a metric", style="yellow")
            )
        else:
            table.update(H.health_table(H.health_rows(s.history, s.run.config), wide=self._wide()))
        self.query_one("#health-findings", Static).update(reports.finding_lines(self._active()[0]))

    def _render_curves(self) -> None:
        history = self.snapshot.history if self.snapshot else {}
        for curve in curves.CURVES:
            widget = self.query_one(f"#plot-{curve.id}", PlotextPlot)
            curves.draw(widget.plt, curve, history)
            widget.refresh()

    def _render_diagnostics(self) -> None:
        s = self.snapshot
        widget = self.query_one("#diag", Static)
        if s is None:
            widget.update(Text("no run store read yet", style="dim"))
            return
        active, earlier = self._active()
        widget.update(reports.diagnostics_view(active, earlier))

    def _render_evaluation(self) -> None:
        s = self.snapshot
        widget = self.query_one("#eval", Static)
        if s is None:
            widget.update(Text("no run store read yet", style="dim"))
            return
        widget.update(reports.evaluation_view(s.evaluations, s.run.task))

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        # A click on a tab: give the pane's main widget the keys, as the number keys do.
        if event.pane.id and self.focused is not None and event.pane not in self.focused.ancestors:
            self.set_focus(self._focus_target(event.pane.id))

    # -- actions -----------------------------------------------------------------------------------
    def action_show_tab(self, tab: str) -> None:
        # Move focus into the new pane first: focus left on a widget of a hidden pane pulls the
        # tabs back to that pane.
        self.set_focus(self._focus_target(tab))
        self.query_one("#tabs", TabbedContent).active = tab

    def _focus_target(self, tab: str) -> Widget | None:
        """The widget keys should go to on ``tab``: the list, the open trajectory, a scroller."""
        if tab == "trajectories":
            return self.browser.focus_target()
        scrollers = self.query_one(f"#{tab}", TabPane).query(VerticalScroll)
        return scrollers.first() if scrollers else None

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_filter(self) -> None:
        self.action_show_tab("trajectories")
        self.browser.open_filter()

    def action_cycle_filter(self) -> None:
        self.action_show_tab("trajectories")
        self.browser.cycle_filter()

    def action_step(self, delta: int) -> None:
        self.action_show_tab("trajectories")
        self.browser.move_step(delta)

    def action_latest(self) -> None:
        self.action_show_tab("trajectories")
        self.browser.follow_latest()

    def action_all_steps(self) -> None:
        self.action_show_tab("trajectories")
        self.browser.toggle_all_steps()

    def action_reload(self) -> None:
        self._force = True
        self._tick()
        self.browser.refresh_list(force=True)

    def action_escape(self) -> None:
        """Leave the filter box, else close the open trajectory."""
        self.browser.escape()
