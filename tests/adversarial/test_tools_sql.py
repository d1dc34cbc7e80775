"""Adversarial tools and SQL: nothing a tool or the agent's SQL does takes the rollout down.

Two surfaces. :meth:`Environment.call_tool` runs a tool with a timeout and an output cap: a tool
that blocks, exits, raises a ``BaseException``, returns something JSON cannot encode or floods
becomes an exact ``error: …`` result, and the episode goes on. :class:`SQLiteEnvironment` runs the
agent's SQL in a sandbox: no other database file is read or created, nothing is written, no risky
function or pragma runs, and a query that would run or grow without bound is stopped.

Every blocking tool waits on a :class:`threading.Event` that the test sets when it is done; the
wait has a generous safety bound only so that a broken implementation fails instead of hanging.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mtrl_local.env import (
    Environment,
    Episode,
    SQLiteEnvironment,
    ToolError,
    render_final_response,
    render_tool_call,
    run_episode,
    tool,
)

#: Only a broken implementation ever waits this long: a correct one returns at the tool timeout.
SAFETY_S = 60.0
TIMEOUT_MESSAGE = (
    "error: tool hang did not finish within 0.5 s; the environment is no longer usable"
)
UNUSABLE_MESSAGE = "error: environment is no longer usable: tool hang did not finish"


# -- tools ----------------------------------------------------------------------------------------
class Boom(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt."""


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def _circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _deep() -> list[Any]:
    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    return nested


RAISED: dict[str, Callable[[], BaseException]] = {
    "system_exit": lambda: SystemExit(3),
    "generator_exit": lambda: GeneratorExit("closed"),
    "custom_base": lambda: Boom("stop everything"),
    "keyboard_interrupt": lambda: KeyboardInterrupt("not the user"),
}

RETURNED: dict[str, Callable[[], Any]] = {
    "set": lambda: {1, 2},
    "bytes": lambda: b"\x00\xff",
    "object": object,
    "generator": lambda: (i for i in range(3)),
    "complex": lambda: 1 + 2j,
    "circular": _circular,
    "deep": _deep,
}


class Rogue(Environment):
    """Tools that misbehave in every way a tool can."""

    tool_timeout_s = 0.5

    def __init__(self, tool_timeout_s: float | None = None) -> None:
        super().__init__(tool_timeout_s=tool_timeout_s)
        self.release = threading.Event()
        self.torn_down = threading.Event()

    def initial_messages(self, case: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": "go"}]

    def teardown(self) -> None:
        self.torn_down.set()

    @tool
    def hang(self) -> str:
        """Block until the test releases it."""
        self.release.wait(SAFETY_S)
        return "released"

    @tool
    def echo(self, text: str) -> str:
        """Return the text.

        Args:
            text: anything.
        """
        return text

    @tool
    def leave(self) -> str:
        """Call sys.exit."""
        sys.exit(3)

    @tool
    def throw(self, kind: str) -> str:
        """Raise a BaseException.

        Args:
            kind: which one.
        """
        raise RAISED[kind]()

    @tool
    def give(self, kind: str) -> Any:
        """Return a value JSON cannot encode.

        Args:
            kind: which one.
        """
        return RETURNED[kind]()

    @tool
    def flood(self, how: str) -> str:
        """Return or raise 100 MB of text.

        Args:
            how: return, tool_error or crash.
        """
        text = "x" * 100_000_000
        if how == "tool_error":
            raise ToolError(text)
        if how == "crash":
            raise ValueError(text)
        return text

    @tool
    def garble(self) -> str:
        """Return text with a lone surrogate (not encodable as UTF-8)."""
        return "ok \ud800 done"

    @tool
    def mumble(self) -> str:
        """Raise an exception whose message cannot be printed."""
        raise Unprintable()

    @tool
    def interrupt_me(self) -> str:
        """Send SIGINT to the main thread (a user's Ctrl-C), then block."""
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        self.release.wait(SAFETY_S)
        return "released"


@pytest.fixture
def rogue() -> Iterator[Rogue]:
    """A Rogue with a generous timeout: these cases are about what a tool returns or raises."""
    env = Rogue(tool_timeout_s=SAFETY_S)
    env.reset("case")
    yield env
    env.release.set()
    env.close()


def test_a_blocking_tool_times_out_and_the_episode_goes_on() -> None:
    env = Rogue()
    with Episode(env, "case", max_turns=4) as episode:
        episode.reset()
        step = episode.step(render_tool_call("hang", {}))
        assert step.messages == [{"role": "tool", "name": "hang", "content": TIMEOUT_MESSAGE}]
        assert step.results[0].error and step.results[0].timed_out
        assert Environment.stuck_tool_calls() >= 1
        again = episode.step(render_tool_call("echo", {"text": "hi"}))
        assert again.messages[0]["content"] == UNUSABLE_MESSAGE
        episode.step(render_final_response({"answer": 1}))
        assert episode.stats.tool_timeouts == 1
        assert episode.stats.tool_errors == 2
        assert episode.stats.done_reason == "final_answer"
    # The stuck call still runs on its worker thread: teardown waits for it, then runs there.
    assert not env.torn_down.is_set()
    env.release.set()
    assert env.torn_down.wait(SAFETY_S)


def test_run_episode_finishes_while_a_tool_is_stuck() -> None:
    env = Rogue()
    script = iter([render_tool_call("hang", {}), render_final_response({"answer": 2})])
    episode = run_episode(env, "case", lambda _: next(script), max_turns=4)
    try:
        assert episode.stats.done_reason == "final_answer"
        assert episode.messages[2]["content"] == TIMEOUT_MESSAGE
    finally:
        env.release.set()
    assert env.torn_down.wait(SAFETY_S)


def test_a_stuck_environment_cannot_be_reset_until_its_call_returns() -> None:
    env = Rogue()
    env.reset("first")
    assert env.call_tool("hang", {}).content == TIMEOUT_MESSAGE
    with pytest.raises(RuntimeError, match="still running"):
        env.reset("second")
    env.release.set()
    assert env.torn_down.wait(SAFETY_S)
    env.release.clear()
    env.reset("third")
    env.set_limits(tool_timeout_s=SAFETY_S)
    assert env.call_tool("echo", {"text": "back"}).content == "back"
    env.release.set()
    env.close()


def test_sys_exit_in_a_tool_is_an_error_result(rogue: Rogue) -> None:
    result = rogue.call_tool("leave", {})
    assert result.error
    assert result.content == "error: tool leave failed: SystemExit: 3"
    assert rogue.call_tool("echo", {"text": "still here"}).content == "still here"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("system_exit", "error: tool throw failed: SystemExit: 3"),
        ("generator_exit", "error: tool throw failed: GeneratorExit: closed"),
        ("custom_base", "error: tool throw failed: Boom: stop everything"),
        # Signals reach only the main thread: one raised on the worker is the tool's own doing.
        ("keyboard_interrupt", "error: tool throw failed: KeyboardInterrupt: not the user"),
    ],
)
def test_base_exceptions_from_a_tool_are_error_results(
    rogue: Rogue, kind: str, message: str
) -> None:
    result = rogue.call_tool("throw", {"kind": kind})
    assert (result.error, result.content) == (True, message)


@pytest.mark.parametrize("kind", ["system_exit", "generator_exit", "custom_base"])
def test_base_exceptions_are_error_results_without_a_worker_thread(kind: str) -> None:
    env = Rogue(tool_timeout_s=0)
    env.reset("case")
    try:
        result = env.call_tool("throw", {"kind": kind})
        assert result.error
        assert result.content.startswith("error: tool throw failed: ")
    finally:
        env.close()


def test_keyboard_interrupt_still_stops_a_tool_run_inline() -> None:
    env = Rogue(tool_timeout_s=0)
    env.reset("case")
    try:
        with pytest.raises(KeyboardInterrupt):
            env.call_tool("throw", {"kind": "keyboard_interrupt"})
    finally:
        env.close()


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs POSIX signals")
@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="needs the main thread"
)
def test_the_users_ctrl_c_stops_the_program_while_a_tool_runs() -> None:
    # Python's own Ctrl-C handler, whatever an earlier test or library installed in this process.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    env = Rogue(tool_timeout_s=SAFETY_S)
    env.reset("case")
    try:
        with pytest.raises(KeyboardInterrupt):
            env.call_tool("interrupt_me", {})
    finally:
        signal.signal(signal.SIGINT, previous)
        env.release.set()
        env.close()
    assert env.torn_down.wait(SAFETY_S)


@pytest.mark.parametrize(
    ("kind", "type_name"),
    [
        ("set", "set"),
        ("bytes", "bytes"),
        ("object", "object"),
        ("generator", "generator"),
        ("complex", "complex"),
        ("circular", "list"),
        ("deep", "list"),
    ],
)
def test_a_value_json_cannot_encode_is_an_error_string(
    rogue: Rogue, kind: str, type_name: str
) -> None:
    result = rogue.call_tool("give", {"kind": kind})
    assert result.error
    assert result.content == (
        f"error: tool give returned a value that is not JSON-serialisable ({type_name})"
    )


@pytest.mark.parametrize(
    ("how", "start", "error"),
    [
        ("return", "x" * 4000, False),
        ("tool_error", "error: " + "x" * 3993, True),
        ("crash", "error: tool flood failed: ValueError: " + "x" * 3962, True),
    ],
)
def test_a_flood_is_capped_whether_returned_or_raised(
    rogue: Rogue, how: str, start: str, error: bool
) -> None:
    result = rogue.call_tool("flood", {"how": how})
    assert result.truncated and result.error is error
    assert len(result.content) < 4100
    assert result.content.startswith(start)
    assert result.content.endswith("chars]")


def test_text_that_is_not_valid_unicode_is_made_encodable(rogue: Rogue) -> None:
    result = rogue.call_tool("garble", {})
    assert result.content == "ok ? done"
    result.content.encode("utf-8")


def test_an_exception_that_cannot_be_printed_is_still_reported(rogue: Rogue) -> None:
    result = rogue.call_tool("mumble", {})
    assert result.content == "error: tool mumble failed: Unprintable: <unprintable Unprintable>"


# -- SQL ------------------------------------------------------------------------------------------
class Notes(SQLiteEnvironment):
    """A 40-row table; the agent's SQL goes through :meth:`SQLiteEnvironment.query`."""

    sql_step_limit = 200_000  # small, so the work-limit cases stop in milliseconds

    def __init__(self) -> None:
        super().__init__()
        self.torn_down = threading.Event()

    def populate(self, db: sqlite3.Connection, case: Any, seed: int) -> None:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        db.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"note {i}") for i in range(40)])
        db.execute("CREATE INDEX notes_by_body ON notes (body)")

    def initial_messages(self, case: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": "go"}]

    def teardown(self) -> None:
        super().teardown()
        self.torn_down.set()

    @tool
    def sql(self, query: str) -> dict[str, Any]:
        """Run one read-only SQL statement.

        Args:
            query: the statement.
        """
        return self.query(query)

    @tool
    def add_note(self, body: str) -> str:
        """Store a note (the environment's own write, not the agent's SQL).

        Args:
            body: the note.
        """
        with self.unrestricted() as db:
            db.execute("INSERT INTO notes (body) VALUES (?)", (body,))
        return "stored"


class FileIO(Notes):
    """An environment that registered a file-writing function for its own setup."""

    target: Path | None = None

    def populate(self, db: sqlite3.Connection, case: Any, seed: int) -> None:
        super().populate(db, case, seed)
        db.create_function("writefile", 2, lambda path, data: Path(path).write_text(data))


@pytest.fixture
def notes() -> Iterator[Notes]:
    env = Notes()
    env.reset("case", 0)
    yield env
    env.close()


def _rows(env: Notes, query: str) -> Any:
    result = env.call_tool("sql", {"query": query})
    assert not result.error, result.content
    return json.loads(result.content)["rows"]


def _fingerprint(env: Notes) -> Any:
    return _rows(env, "SELECT COUNT(*), SUM(id), GROUP_CONCAT(body) FROM notes")


def test_attach_cannot_read_another_database_file(notes: Notes, tmp_path: Path) -> None:
    secret = tmp_path / "secret.db"
    other = sqlite3.connect(secret)
    other.execute("CREATE TABLE secrets (v TEXT)")
    other.execute("INSERT INTO secrets VALUES ('hunter2')")
    other.commit()
    other.close()
    attach = notes.call_tool("sql", {"query": f"ATTACH DATABASE '{secret}' AS s"})
    assert attach.content == (
        "error: SQL error: not authorized (reading or writing other database files is not allowed)"
    )
    read = notes.call_tool("sql", {"query": "SELECT v FROM s.secrets"})
    assert read.content == "error: SQL error: no such table: s.secrets"


@pytest.mark.parametrize(
    "statement",
    ["ATTACH DATABASE '{path}' AS fresh", "VACUUM INTO '{path}'"],
)
def test_no_database_file_is_created(notes: Notes, tmp_path: Path, statement: str) -> None:
    path = tmp_path / "created.db"
    result = notes.call_tool("sql", {"query": statement.format(path=path)})
    assert result.content == (
        "error: SQL error: not authorized (reading or writing other database files is not allowed)"
    )
    assert not path.exists()


def test_a_registered_file_function_is_refused_to_the_agent(tmp_path: Path) -> None:
    env = FileIO()
    env.reset("case")
    target = tmp_path / "owned.txt"
    try:
        result = env.call_tool("sql", {"query": f"SELECT writefile('{target}', 'owned')"})
    finally:
        env.close()
    assert result.content == "error: SQL error: not authorized (function writefile is not allowed)"
    assert not target.exists()


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("DETACH DATABASE main", "reading or writing other database files is not allowed"),
        ("PRAGMA journal_mode = OFF", "PRAGMA journal_mode is not allowed"),
        ("PRAGMA query_only = OFF", "PRAGMA query_only is not allowed"),
        ("PRAGMA writable_schema = ON", "PRAGMA writable_schema is not allowed"),
        ("PRAGMA cache_size = 1", "PRAGMA cache_size is not allowed"),
        ("PRAGMA temp_store = FILE", "PRAGMA temp_store is not allowed"),
        ("PRAGMA foreign_keys = ON", "PRAGMA foreign_keys is not allowed"),
        ("SELECT * FROM pragma_journal_mode", "PRAGMA journal_mode is not allowed"),
        ("SELECT load_extension('/tmp/evil.so')", "function load_extension is not allowed"),
        ("SELECT fts3_tokenizer('simple')", "function fts3_tokenizer is not allowed"),
        ("BEGIN", "transactions are not allowed"),
        ("COMMIT", "transactions are not allowed"),
        ("ROLLBACK", "transactions are not allowed"),
        ("SAVEPOINT s", "transactions are not allowed"),
        ("CREATE VIRTUAL TABLE temp.f USING fts5(x)", "virtual tables are not allowed"),
    ],
)
def test_forbidden_sql_is_not_authorized(notes: Notes, query: str, reason: str) -> None:
    before = _fingerprint(notes)
    result = notes.call_tool("sql", {"query": query})
    assert result.error
    assert result.content == f"error: SQL error: not authorized ({reason})"
    assert _fingerprint(notes) == before


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO notes (body) VALUES ('planted')",
        "REPLACE INTO notes VALUES (1, 'planted')",
        "UPDATE notes SET body = 'planted'",
        "DELETE FROM notes",
        "DROP TABLE notes",
        "CREATE TABLE more (x)",
        "CREATE TEMP TABLE scratch (x)",
        "CREATE INDEX by_id ON notes (id)",
        "CREATE TEMP VIEW v AS SELECT 1",
        "ALTER TABLE notes RENAME TO gone",
        "ANALYZE",
        "REINDEX",
    ],
)
def test_writes_are_refused_and_nothing_changes(notes: Notes, statement: str) -> None:
    before = _fingerprint(notes)
    result = notes.call_tool("sql", {"query": statement})
    assert result.content == "error: SQL error: attempt to write a readonly database"
    assert _fingerprint(notes) == before


def test_the_environment_may_write_through_unrestricted(notes: Notes) -> None:
    assert notes.call_tool("add_note", {"body": "mine"}).content == "stored"
    assert _rows(notes, "SELECT body FROM notes WHERE id = 40") == [["mine"]]
    refused = notes.call_tool("sql", {"query": "INSERT INTO notes (body) VALUES ('agent')"})
    assert refused.content == "error: SQL error: attempt to write a readonly database"


TOO_BIG = "error: SQL error: string or blob too big"
RECURSIVE_200 = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 200) "
RECURSIVE_20K = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 20000) "


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT zeroblob(1000000000)", TOO_BIG),
        ("SELECT length(randomblob(1000000000))", TOO_BIG),
        ("SELECT hex(zeroblob(60000))", TOO_BIG),
        ("SELECT length(replace(hex(zeroblob(5000)), '0', hex(zeroblob(5000))))", TOO_BIG),
        (RECURSIVE_200 + "SELECT length(group_concat(hex(zeroblob(500)))) FROM r", TOO_BIG),
        (RECURSIVE_200 + "SELECT length(json_group_array(hex(zeroblob(500)))) FROM r", TOO_BIG),
        (
            "SELECT length(printf('%.*c', 1000000000, 'x'))",
            "error: SQL error: printf width or precision above 100000",
        ),
        (
            "SELECT length(format('%1000000000d', 1))",
            "error: SQL error: printf width or precision above 100000",
        ),
        (
            "SELECT length(printf('%*s', -2000000000, 'x'))",
            "error: SQL error: printf width or precision above 100000",
        ),
    ],
)
def test_one_expensive_call_is_refused(notes: Notes, query: str, message: str) -> None:
    assert notes.call_tool("sql", {"query": query}).content == message
    assert _rows(notes, "SELECT COUNT(*) FROM notes") == [[40]]


@pytest.mark.parametrize(
    "expression",
    [
        "printf('%5.2f|%-4s|%03d|%%', 3.14159, 'ab', 7)",
        "format('%q %Q %w', 'it''s', NULL, 'x\"y')",
        "printf('%*d|%-*d|%.*s', 5, 1, 4, 2, 3, 'abcdef')",
        "printf(x'2564', 5)",
        "printf('%c%c', 'a')",
        "printf(NULL)",
        "printf()",
    ],
)
def test_printf_within_the_limits_is_sqlites_own(notes: Notes, expression: str) -> None:
    reference = sqlite3.connect(":memory:")
    expected = reference.execute(f"SELECT {expression}").fetchone()[0]
    reference.close()
    assert _rows(notes, f"SELECT {expression}") == [[expected]]


WORK_LIMIT = "error: SQL error: query stopped, it exceeded the work limit"


@pytest.mark.parametrize(
    "query",
    [
        # The LIMITs only bound the damage when there is no sandbox at all.
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 10000000)"
        " SELECT COUNT(*) FROM r",
        "SELECT COUNT(*) FROM notes a, notes b, notes c, notes d",
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 10000000)"
        " SELECT x FROM r ORDER BY x DESC LIMIT 1",
    ],
)
def test_runaway_queries_stop_at_the_work_limit(notes: Notes, query: str) -> None:
    assert notes.call_tool("sql", {"query": query}).content == WORK_LIMIT
    # Each query gets a fresh budget: the database still answers.
    assert _rows(notes, "SELECT COUNT(*) FROM notes") == [[40]]


def test_a_query_that_grows_memory_is_stopped(
    notes: Notes, monkeypatch: pytest.MonkeyPatch
) -> None:
    grown = iter(range(0, 10**12, 64 * 2**20))  # 64 MiB more at every check
    monkeypatch.setattr("mtrl_local.env.sql_sandbox.resident_bytes", lambda: next(grown))
    query = "SELECT COUNT(*) FROM notes a, notes b, notes c"
    result = notes.call_tool("sql", {"query": query})
    assert result.content == "error: SQL error: query stopped, it exceeded the memory limit"


def test_a_query_that_runs_too_long_is_stopped(
    notes: Notes, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = iter(range(0, 10**9, 7))  # 7 s later at every look at the clock
    monkeypatch.setattr("mtrl_local.env.sql_sandbox.clock", lambda: float(next(ticks)))
    query = "SELECT COUNT(*) FROM notes a, notes b, notes c"
    result = notes.call_tool("sql", {"query": query})
    assert result.content == "error: SQL error: query stopped, it exceeded the time limit"


def test_scratch_space_stays_in_memory(notes: Notes) -> None:
    with notes.unrestricted() as db:
        assert db.execute("PRAGMA temp_store").fetchone() == (2,)  # MEMORY: no temp files


def test_results_are_capped_and_json_safe(notes: Notes) -> None:
    many = json.loads(notes.call_tool("sql", {"query": RECURSIVE_20K + "SELECT x FROM r"}).content)
    assert len(many["rows"]) == 50 and many["note"] == "only the first 50 rows are shown"
    assert _rows(notes, "SELECT x'00ff', 1.5, NULL") == [["x'00ff'", 1.5, None]]
    garbled = notes.call_tool("sql", {"query": "SELECT CAST(x'ff' AS TEXT)"})
    assert garbled.error and garbled.content.startswith("error: SQL error: Could not decode")
    garbled.content.encode("utf-8")


def test_sql_randomness_is_fixed_by_case_and_seed() -> None:
    query = {"query": "SELECT random(), hex(randomblob(8))"}
    texts = []
    for seed in (3, 3, 4):
        env = Notes()
        env.reset("case", seed)
        texts.append(env.call_tool("sql", query).content)
        env.close()
    assert texts[0] == texts[1] != texts[2]


class SlowNotes(Notes):
    """No work limit to speak of: only the tool timeout can end a runaway query."""

    sql_step_limit = 10**15
    tool_timeout_s = 0.5


def test_a_tool_timeout_interrupts_the_running_query() -> None:
    before = SQLiteEnvironment.open_databases()
    env = SlowNotes()
    env.reset("case")
    query = (
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 100000000)"
        " SELECT COUNT(*) FROM r"
    )
    result = env.call_tool("sql", {"query": query})
    env.close()
    assert result.content == (
        "error: tool sql did not finish within 0.5 s; the environment is no longer usable"
    )
    # The interrupted query ends, so its worker returns and the deferred teardown runs.
    assert env.torn_down.wait(SAFETY_S)
    assert SQLiteEnvironment.open_databases() == before
