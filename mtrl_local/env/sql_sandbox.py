"""The sandbox around the agent's SQL in :class:`~mtrl_local.env.SQLiteEnvironment`.

:meth:`SQLSandbox.arm` is called once the environment's own setup has filled the database. From
then on every statement on the connection is:

- **read-only** — ``PRAGMA query_only`` makes SQLite itself refuse CREATE, INSERT, UPDATE, DELETE,
  DROP, ALTER, ANALYZE and REINDEX ("attempt to write a readonly database");
- **confined** — an authorizer refuses ATTACH and DETACH (and VACUUM INTO, which SQLite
  authorises as an ATTACH), so no other database file is read or created; transactions,
  virtual tables, every PRAGMA but schema introspection (:data:`ALLOWED_PRAGMAS`) and the risky
  functions of :data:`DENIED_FUNCTIONS` (extension loading, file access, ``fts3_tokenizer``, which
  leaks a pointer) are refused too;
- **kept in memory** — ``temp_store = MEMORY``: sorts and temporary tables never touch the disk.

Statements run through :meth:`SQLSandbox.run` are also **bounded**: a work limit in SQLite VM
instructions, a time limit and a limit on how much the process's resident memory may grow (all
checked by the progress handler), the largest string or blob (``SQLITE_LIMIT_LENGTH``, Python
3.11+), and printf/format widths and precisions (one ``printf('%.*c', 1e9, 'x')`` loops for seconds
inside a single VM instruction, where no progress handler runs). Statements the environment runs
on the connection itself keep the rules but not the budgets; the tool timeout still interrupts
them. ``random()`` and ``randomblob()`` are seeded, so the same query on the same case and seed
gives the same text.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from mtrl_local.env.calls import ToolError

try:
    import resource
except ImportError:  # Windows: no resource module, no memory check
    resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: Schema-introspection pragmas the agent may run (``PRAGMA table_info(t)``, ``pragma_table_info``).
ALLOWED_PRAGMAS = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
    }
)
#: Functions refused even when the environment registered them (e.g. for its own setup).
DENIED_FUNCTIONS = frozenset(
    {
        "load_extension",
        "fts3_tokenizer",
        "fts5",
        "readfile",
        "writefile",
        "edit",
        "lsdir",
        "zipfile",
        "sqlar_compress",
        "sqlar_uncompress",
    }
)
#: The progress handler runs every this many VM instructions.
PROGRESS_EVERY = 1000

#: Writes left to ``query_only`` (SQLite's own, clearer "attempt to write a readonly database").
_WRITES = frozenset(
    {
        sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_UPDATE,
        sqlite3.SQLITE_DELETE,
        sqlite3.SQLITE_ALTER_TABLE,
        sqlite3.SQLITE_ANALYZE,
        sqlite3.SQLITE_REINDEX,
        *range(sqlite3.SQLITE_CREATE_INDEX, sqlite3.SQLITE_CREATE_VIEW + 1),
        *range(sqlite3.SQLITE_DROP_INDEX, sqlite3.SQLITE_DROP_VIEW + 1),
    }
)
_READS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
)
_OTHER_FILES = "reading or writing other database files is not allowed"
_REFUSED = {
    sqlite3.SQLITE_ATTACH: _OTHER_FILES,
    sqlite3.SQLITE_DETACH: _OTHER_FILES,
    sqlite3.SQLITE_TRANSACTION: "transactions are not allowed",
    sqlite3.SQLITE_SAVEPOINT: "transactions are not allowed",
    sqlite3.SQLITE_CREATE_VTABLE: "virtual tables are not allowed",
    sqlite3.SQLITE_DROP_VTABLE: "virtual tables are not allowed",
}
_PRINTF_SPEC = re.compile(r"%[-+ 0#!,]*(\*|\d*)(?:\.(\*|\d*))?l{0,2}(.?)", re.DOTALL)
_NUMBER_PREFIX = re.compile(r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: The clock of the time limit (a module attribute so that tests can replace it).
clock = time.monotonic
_statm: tuple[int, int | None] | None = None
_statm_lock = threading.Lock()


@dataclass(frozen=True)
class SQLLimits:
    """What one statement of the agent's may cost, and what it may touch."""

    step_limit: int = 20_000_000
    time_limit_s: float = 10.0
    memory_limit_bytes: int = 256 * 2**20
    value_limit_bytes: int = 100_000
    allowed_pragmas: frozenset[str] = ALLOWED_PRAGMAS
    denied_functions: frozenset[str] = DENIED_FUNCTIONS


class _Refused(Exception):
    """Raised inside a sandbox SQL function; the statement's error then carries its message."""


def _statm_fd() -> int | None:
    """A descriptor of this process's ``/proc/self/statm`` (re-opened after a fork), or None."""
    global _statm
    pid = os.getpid()
    if _statm is None or _statm[0] != pid:
        with _statm_lock:
            if _statm is None or _statm[0] != pid:
                try:
                    _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY))
                except (OSError, AttributeError):
                    _statm = (pid, None)
    return _statm[1]


def _peak_rss() -> int:
    if resource is None:
        return 0
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def resident_bytes() -> int:
    """The process's resident memory (Linux); elsewhere its peak, or 0 where neither is known.

    Read at every progress-handler call, so Linux reads reuse one descriptor (``pread``: ~2 µs).
    """
    fd = _statm_fd()
    if fd is not None:
        try:
            return int(os.pread(fd, 128, 0).split()[1]) * _PAGE_SIZE
        except (OSError, ValueError, IndexError):
            pass
    return _peak_rss()


def json_cell(value: Any) -> Any:
    """A SQLite value as JSON: a BLOB becomes its hex literal (``x'00ff'``)."""
    if isinstance(value, bytes):
        return f"x'{value.hex()}'"
    return value


def _as_number(value: Any) -> float:
    """``value`` as SQLite reads a number from it: text by its numeric prefix, NULL as 0."""
    if isinstance(value, int | float):
        return value
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        match = _NUMBER_PREFIX.match(value)
        return float(match.group()) if match else 0.0
    return 0.0


def _magnitude(value: Any) -> float:
    """``abs`` of :func:`_as_number`."""
    return abs(_as_number(value))


def printf_too_wide(fmt: str, args: Sequence[Any], limit: int) -> bool:
    """Whether a SQLite printf format asks for a width or precision above ``limit``."""
    next_arg = 0
    for spec in _PRINTF_SPEC.finditer(fmt):
        width, precision, kind = spec.groups()
        if kind == "%":
            continue
        for part in (width, precision):
            if part == "*":
                size = _magnitude(args[next_arg]) if next_arg < len(args) else 0.0
                next_arg += 1
            else:
                size = float(part) if part else 0.0
            if size > limit:
                return True
        next_arg += 1
    return False


class SQLSandbox:
    """The authorizer, progress handler, limits and seeded functions of one connection."""

    def __init__(self, db: sqlite3.Connection, limits: SQLLimits, seed: int) -> None:
        self.db = db
        self.limits = limits
        self._rng = random.Random(seed)
        self._armed = False
        self._in_statement = False
        self._steps = 0
        self._deadline = math.inf
        self._memory_at_start = 0
        self._stopped: str | None = None
        self._refusal: str | None = None
        self._helper: sqlite3.Connection | None = None

    # -- arming -----------------------------------------------------------------------------
    def arm(self) -> None:
        """Commit the setup's writes and restrict every later statement on the connection."""
        db = self.db
        db.commit()
        db.isolation_level = None  # no implicit BEGIN: transactions are refused once armed
        db.execute("PRAGMA temp_store = MEMORY")
        if hasattr(db, "setlimit"):
            db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.limits.value_limit_bytes)
        else:
            logger.warning("Python < 3.11: no SQLITE_LIMIT_LENGTH, strings may grow to 1 GB")
        db.create_function("random", 0, self._random)
        db.create_function("randomblob", 1, self._randomblob)
        db.create_function("printf", -1, self._printf, deterministic=True)
        db.create_function("format", -1, self._printf, deterministic=True)
        db.set_authorizer(self._authorize)
        db.set_progress_handler(self._on_progress, PROGRESS_EVERY)
        db.execute("PRAGMA query_only = ON")
        self._armed = True

    @contextmanager
    def unrestricted(self) -> Iterator[sqlite3.Connection]:
        """The connection without the sandbox, for the environment's own statements (autocommit).

        Never run the agent's text in here.
        """
        self._armed = False
        self.db.execute("PRAGMA query_only = OFF")
        try:
            yield self.db
        finally:
            self.db.execute("PRAGMA query_only = ON")
            self._armed = True

    def close(self) -> None:
        """Close the helper connection that formats printf (the main one is the owner's)."""
        if self._helper is not None:
            self._helper.close()
            self._helper = None

    # -- running the agent's statements -------------------------------------------------------
    def run(
        self, sql: str, params: Sequence[Any], max_rows: int
    ) -> tuple[list[str], list[list[Any]], bool]:
        """One statement within the limits: (columns, at most ``max_rows`` rows, more rows?).

        Errors become a :class:`ToolError` ``SQL error: …`` naming the limit or rule that stopped
        the statement, else SQLite's own message.
        """
        self._begin()
        cursor: sqlite3.Cursor | None = None
        try:
            cursor = self.db.execute(sql, tuple(params))
            rows = cursor.fetchmany(max_rows + 1)
            columns = [d[0] for d in cursor.description or []]
        except sqlite3.Error as exc:
            raise ToolError(f"SQL error: {self._explain(exc)}") from None
        finally:
            self._in_statement = False
            if cursor is not None:
                cursor.close()  # free the statement (and its sorter) now, not at GC
        cells = [[json_cell(v) for v in row] for row in rows[:max_rows]]
        return columns, cells, len(rows) > max_rows

    def _begin(self) -> None:
        self._steps = 0
        self._stopped = None
        self._refusal = None
        self._deadline = clock() + self.limits.time_limit_s
        self._memory_at_start = resident_bytes()
        self._in_statement = True

    def _explain(self, exc: sqlite3.Error) -> str:
        if self._stopped is not None:
            return f"query stopped, it exceeded the {self._stopped}"
        if self._refusal is not None:
            return self._refusal
        return str(exc)

    # -- the callbacks SQLite calls -------------------------------------------------------------
    def _authorize(self, action: int, arg1: str | None, arg2: str | None, *_: str | None) -> int:
        if not self._armed or action in _READS or action in _WRITES:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION:
            if (arg2 or "").lower() not in self.limits.denied_functions:
                return sqlite3.SQLITE_OK
            return self._deny(f"function {arg2} is not allowed")
        if action == sqlite3.SQLITE_PRAGMA:
            if (arg1 or "").lower() in self.limits.allowed_pragmas:
                return sqlite3.SQLITE_OK
            return self._deny(f"PRAGMA {arg1} is not allowed")
        return self._deny(_REFUSED.get(action, "this statement is not allowed"))

    def _deny(self, reason: str) -> int:
        if self._refusal is None:
            self._refusal = f"not authorized ({reason})"
        return sqlite3.SQLITE_DENY

    def _on_progress(self) -> int:
        if not (self._armed and self._in_statement):
            return 0
        self._steps += PROGRESS_EVERY
        if self._steps > self.limits.step_limit:
            return self._stop("work limit")
        if clock() > self._deadline:
            return self._stop("time limit")
        if resident_bytes() - self._memory_at_start > self.limits.memory_limit_bytes:
            return self._stop("memory limit")
        return 0

    def _stop(self, limit: str) -> int:
        self._stopped = limit
        return 1

    def _refuse(self, message: str) -> NoReturn:
        self._refusal = message
        raise _Refused(message)

    # -- SQL functions ----------------------------------------------------------------------------
    def _random(self) -> int:
        return self._rng.getrandbits(64) - 2**63

    def _randomblob(self, n: Any) -> bytes:
        size = _as_number(n)
        if size > self.limits.value_limit_bytes:
            self._refuse("string or blob too big")
        return self._rng.randbytes(max(1, int(size)))

    def _printf(self, *values: Any) -> Any:
        """SQLite's own printf, after refusing widths and precisions above the value limit."""
        if not values:
            return None
        fmt, args = values[0], values[1:]
        text = fmt.decode("utf-8", "replace") if isinstance(fmt, bytes) else str(fmt)
        limit = self.limits.value_limit_bytes
        if fmt is not None and printf_too_wide(text, args, limit):
            self._refuse(f"printf width or precision above {limit}")
        marks = ", ".join(["?"] * len(values))
        try:
            return self._helper_db().execute(f"SELECT printf({marks})", values).fetchone()[0]
        except sqlite3.Error as exc:
            self._refuse(str(exc))

    def _helper_db(self) -> sqlite3.Connection:
        """A private connection whose built-in printf does the formatting (same SQLite)."""
        if self._helper is None:
            self._helper = sqlite3.connect(":memory:", check_same_thread=False)
            if hasattr(self._helper, "setlimit"):
                self._helper.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.limits.value_limit_bytes)
        return self._helper
