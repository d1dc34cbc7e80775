"""Reusable bases for the three environment patterns (docs/design.md, "Environments").

- :class:`FixtureEnvironment` — read-only tools whose responses are recorded and replayed, keyed by
  the call's arguments; a call nobody recorded gets a deterministic error string.
- :class:`SandboxEnvironment` — a seeded, stateful sandbox: everything created during the episode is
  registered and torn down at the end, so nothing leaks into the next rollout.
- :class:`SQLiteEnvironment` — genuine execution: a fresh in-memory SQLite database per episode,
  the agent's SQL sandboxed (:mod:`mtrl_local.env.sql_sandbox`).
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from mtrl_local.env.base import Environment
from mtrl_local.env.calls import ToolError
from mtrl_local.env.sql_sandbox import ALLOWED_PRAGMAS, DENIED_FUNCTIONS, SQLLimits, SQLSandbox


def canonical_key(tool: str, arguments: Mapping[str, Any]) -> str:
    """A stable key for (tool, arguments): argument order and whitespace do not matter."""
    return tool + ":" + json.dumps(dict(arguments), sort_keys=True, separators=(",", ":"))


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from any parts, identical across processes, machines and Python versions.

    (``hash()`` of a string is salted per process; this is not.)
    """
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def stable_id(prefix: str, *parts: Any, digits: int = 5) -> str:
    """A deterministic id such as ``INC-48213`` derived from ``parts``."""
    return f"{prefix}-{stable_seed(*parts) % 10**digits:0{digits}d}"


class FixtureEnvironment(Environment):
    """Read-only tools replayed from recorded responses keyed by their arguments.

    ``setup`` fills :attr:`fixtures` through :meth:`record`. A key recorded with several responses
    (e.g. a flaky sensor read) returns them in order on repeated calls, then repeats the last one:
    same arguments + same seed + same call history → same result.
    """

    def __init__(
        self, max_tool_output_chars: int | None = None, tool_timeout_s: float | None = None
    ) -> None:
        super().__init__(max_tool_output_chars, tool_timeout_s)
        self.fixtures: dict[str, list[Any]] = {}
        self._calls: dict[str, int] = {}

    def record(self, tool: str, arguments: Mapping[str, Any], *responses: Any) -> None:
        """Record the response(s) that ``tool(**arguments)`` returns."""
        if not responses:
            raise ValueError("record() needs at least one response")
        self.fixtures[canonical_key(tool, arguments)] = list(responses)

    def replay(self, tool: str, **arguments: Any) -> Any:
        """The recorded response for this call; a :class:`ToolError` when none was recorded."""
        key = canonical_key(tool, arguments)
        responses = self.fixtures.get(key)
        if responses is None:
            shown = ", ".join(f"{k}={v!r}" for k, v in sorted(arguments.items()))
            raise ToolError(f"no record found for {tool}({shown})")
        n = self._calls.get(key, 0)
        self._calls[key] = n + 1
        return responses[min(n, len(responses) - 1)]

    def teardown(self) -> None:
        self.fixtures = {}
        self._calls = {}


class SandboxEnvironment(Environment):
    """A seeded, stateful sandbox whose resources are registered and torn down.

    ``self.rng`` is seeded from (case id, seed) in :meth:`reset`. Anything a tool creates (a
    session, a ticket, a temp file) is registered with :meth:`register` and released in reverse
    order at :meth:`close`. :meth:`live_resources` counts what is alive across all sandboxes in
    the process — tests use it to prove nothing leaks.
    """

    _live: ClassVar[int] = 0
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self, max_tool_output_chars: int | None = None, tool_timeout_s: float | None = None
    ) -> None:
        super().__init__(max_tool_output_chars, tool_timeout_s)
        self.rng = random.Random(0)
        self.resources: dict[str, dict[str, Any]] = {}
        self._finalizers: list[tuple[str, str, Callable[[Any], None] | None]] = []

    def reset(self, case: Any, seed: int = 0) -> list[dict[str, Any]]:
        self.rng = random.Random(stable_seed(getattr(case, "case_id", case), seed))
        return super().reset(case, seed)

    def register(
        self, kind: str, key: str, obj: Any, finalizer: Callable[[Any], None] | None = None
    ) -> Any:
        """Keep ``obj`` as resource ``kind``/``key`` until the episode ends; returns ``obj``."""
        bucket = self.resources.setdefault(kind, {})
        if key in bucket:
            raise ToolError(f"{kind} {key} already exists")
        bucket[key] = obj
        self._finalizers.append((kind, key, finalizer))
        with SandboxEnvironment._lock:
            SandboxEnvironment._live += 1
        return obj

    def lookup(self, kind: str, key: str) -> Any:
        """A registered resource, or a :class:`ToolError` naming what was not found."""
        try:
            return self.resources[kind][key]
        except KeyError:
            raise ToolError(f"unknown {kind} '{key}'") from None

    def teardown(self) -> None:
        # Reverse order: later resources may depend on earlier ones (ticket → session).
        errors: list[BaseException] = []
        while self._finalizers:
            kind, key, finalizer = self._finalizers.pop()
            obj = self.resources.get(kind, {}).pop(key, None)
            with SandboxEnvironment._lock:
                SandboxEnvironment._live -= 1
            if finalizer is not None:
                try:
                    finalizer(obj)
                except Exception as exc:  # keep releasing the rest
                    errors.append(exc)
        self.resources = {}
        if errors:
            raise errors[0]

    @classmethod
    def live_resources(cls) -> int:
        """Resources registered and not yet torn down, over every sandbox in this process."""
        return SandboxEnvironment._live


class SQLiteEnvironment(Environment):
    """Genuine execution against a private in-memory SQLite database per episode.

    Subclasses implement :meth:`populate` (schema + rows for the case). Once it has run, the
    connection is sandboxed (:mod:`mtrl_local.env.sql_sandbox`): read-only, no other database file,
    no transactions, only schema-introspection pragmas, no risky functions, scratch space in
    memory. :meth:`query` runs the agent's SQL within the limits below and returns at most
    ``max_rows`` rows; run the agent's text only through it. The environment's own writes (a tool
    that books something) go through :meth:`unrestricted`. A query still running at the tool
    timeout is interrupted (:meth:`interrupt_tools`).
    """

    max_rows: int = 50
    #: SQLite VM instructions one query may execute.
    sql_step_limit: int = 20_000_000
    #: Seconds one query may run (checked between VM instructions, like the work limit).
    sql_time_limit_s: float = 10.0
    #: How much one query may grow the process's resident memory.
    sql_memory_limit_bytes: int = 256 * 2**20
    #: The largest string or blob a query may build (SQLITE_LIMIT_LENGTH; printf widths too).
    sql_value_limit_bytes: int = 100_000
    allowed_pragmas: ClassVar[frozenset[str]] = ALLOWED_PRAGMAS
    denied_functions: ClassVar[frozenset[str]] = DENIED_FUNCTIONS

    _open_dbs: ClassVar[int] = 0
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self, max_tool_output_chars: int | None = None, tool_timeout_s: float | None = None
    ) -> None:
        super().__init__(max_tool_output_chars, tool_timeout_s)
        self.db: sqlite3.Connection | None = None
        self.sandbox: SQLSandbox | None = None

    def setup(self, case: Any, seed: int) -> None:
        self.db = sqlite3.connect(":memory:", check_same_thread=False)
        with SQLiteEnvironment._lock:
            SQLiteEnvironment._open_dbs += 1
        self.populate(self.db, case, seed)
        # Same query + same case + same seed → same text, even for random() and randomblob().
        rng_seed = stable_seed(getattr(case, "case_id", case), seed, "sql-random")
        self.sandbox = SQLSandbox(self.db, self.sql_limits(), rng_seed)
        self.sandbox.arm()

    def sql_limits(self) -> SQLLimits:
        """The sandbox's limits, from this environment's ``sql_*`` attributes."""
        return SQLLimits(
            step_limit=self.sql_step_limit,
            time_limit_s=self.sql_time_limit_s,
            memory_limit_bytes=self.sql_memory_limit_bytes,
            value_limit_bytes=self.sql_value_limit_bytes,
            allowed_pragmas=self.allowed_pragmas,
            denied_functions=self.denied_functions,
        )

    def populate(self, db: sqlite3.Connection, case: Any, seed: int) -> None:
        """Create tables and insert the case's rows (override); the sandbox is armed after it."""
        raise NotImplementedError

    def query(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any]:
        """Run one statement in the sandbox; returns ``{"columns": [...], "rows": [...]}``.

        BLOBs come back as hex literals (``x'00ff'``); a ``note`` says when rows were cut.
        """
        if self.sandbox is None:
            raise ToolError("database is closed")
        columns, rows, more = self.sandbox.run(sql, params, self.max_rows)
        result: dict[str, Any] = {"columns": columns, "rows": rows}
        if more:
            result["note"] = f"only the first {self.max_rows} rows are shown"
        return result

    @contextmanager
    def unrestricted(self) -> Iterator[sqlite3.Connection]:
        """The connection without the sandbox, for the environment's own (trusted) statements."""
        if self.sandbox is None:
            raise ToolError("database is closed")
        with self.sandbox.unrestricted() as db:
            yield db

    def interrupt_tools(self) -> None:
        """Interrupt the query of a tool call that overran the tool timeout."""
        if self.db is not None:
            self.db.interrupt()

    def teardown(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None
        if self.db is not None:
            self.db.close()
            self.db = None
            with SQLiteEnvironment._lock:
                SQLiteEnvironment._open_dbs -= 1

    @classmethod
    def open_databases(cls) -> int:
        """Per-episode databases not yet closed, over the whole process."""
        return SQLiteEnvironment._open_dbs
