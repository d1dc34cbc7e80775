"""The environment interface: schemas from signatures, checked dispatch, episodes, patterns."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtrl_local.env import (
    Environment,
    Episode,
    FixtureEnvironment,
    SandboxEnvironment,
    SQLiteEnvironment,
    Tool,
    ToolError,
    parse_tool_calls,
    render_tool_call,
    stable_id,
    tool,
)


class Toy(FixtureEnvironment):
    """A small fixture world: a lookup replayed from records, a typed calculator, a broken tool."""

    def setup(self, case: Any, seed: int) -> None:
        self.record("lookup", {"key": "A1"}, {"value": 1}, {"value": 2})
        self.record("lookup", {"key": "BIG"}, "x" * 500)

    def initial_messages(self, case: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": f"case {case}"}]

    @tool
    def lookup(self, key: str) -> Any:
        """Look a key up in the recorded fixtures.

        Args:
            key: the record key, e.g. "A1".
        """
        return self.replay("lookup", key=key)

    @tool
    def add(self, a: int, b: float = 1.0, mode: Literal["exact", "round"] = "exact") -> float:
        """Add two numbers.

        Args:
            a: first addend.
            b: second addend
                (defaults to one).
            mode: rounding mode.
        """
        return a + b if mode == "exact" else round(a + b)

    @tool
    def broken(self) -> str:
        """A tool with a bug."""
        raise KeyError("oops")


def call(name: str, arguments: Any) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_schema_is_derived_from_signature_and_docstring() -> None:
    env = Toy()
    schemas = {s["function"]["name"]: s["function"] for s in env.tool_schemas()}
    assert list(schemas) == ["add", "broken", "lookup"]
    add = schemas["add"]
    assert add["description"] == "Add two numbers."
    assert add["parameters"]["required"] == ["a"]
    props = add["parameters"]["properties"]
    assert props["a"] == {"type": "integer", "description": "first addend."}
    assert props["b"]["type"] == "number"
    assert props["b"]["description"] == "second addend (defaults to one)."
    assert props["mode"]["enum"] == ["exact", "round"]
    assert schemas["broken"]["parameters"] == {"type": "object", "properties": {}, "required": []}


def test_tool_without_docstring_or_hints_is_rejected() -> None:
    def undocumented(x: int) -> int:
        return x

    def untyped(x):  # type: ignore[no-untyped-def]
        """Has a docstring."""
        return x

    with pytest.raises(TypeError, match="docstring"):
        Tool.from_callable(undocumented)
    with pytest.raises(TypeError, match="type hint"):
        Tool.from_callable(untyped)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (call("nope", {}), "error: unknown tool 'nope'"),
        (call("add", [1, 2]), "error: arguments for add must be a JSON object, got array"),
        (call("add", {}), "error: missing argument 'a' for add"),
        (call("add", {"a": 1, "c": 2}), "error: unexpected argument 'c' for add"),
        (call("add", {"a": "1"}), "error: argument 'a' for add must be integer, got string"),
        (call("add", {"a": True}), "error: argument 'a' for add must be integer, got boolean"),
        (call("add", {"a": 1, "mode": "x"}), "error: argument 'mode' for add must be one of"),
        (call("broken", {}), "error: tool broken failed: KeyError: 'oops'"),
        (call("lookup", {"key": "ZZ"}), "error: no record found for lookup(key='ZZ')"),
        ("<tool_call>{not json</tool_call>", "error: tool call is not valid JSON"),
        ("<tool_call>[1]</tool_call>", "error: tool call must be a JSON object"),
        ('<tool_call>{"name": "add", "arguments"', "error: unterminated tool_call block"),
    ],
)
def test_agent_mistakes_become_counted_error_strings(text: str, expected: str) -> None:
    with Episode(Toy(), "c1", max_turns=4) as ep:
        ep.reset()
        result = ep.step(text)
        assert not result.done
        assert len(result.messages) == 1
        assert result.messages[0]["role"] == "tool"
        assert result.messages[0]["content"].startswith(expected)
        assert ep.stats.tool_errors == 1
        assert ep.stats.tool_calls == 1


def test_int_is_accepted_for_number_and_results_are_json() -> None:
    with Episode(Toy(), "c1") as ep:
        ep.reset()
        out = ep.step(call("add", {"a": 2, "b": 3}) + call("add", {"a": 2, "b": 0.5}))
        assert [m["content"] for m in out.messages] == ["5", "2.5"]
        assert ep.stats.tool_errors == 0


def test_fixture_replays_in_order_then_repeats_last() -> None:
    with Episode(Toy(), "c1") as ep:
        ep.reset()
        out = ep.step(call("lookup", {"key": "A1"}) * 3)
        assert [m["content"] for m in out.messages] == [
            '{"value": 1}',
            '{"value": 2}',
            '{"value": 2}',
        ]


def test_long_tool_output_is_truncated_with_marker() -> None:
    with Episode(Toy(max_tool_output_chars=100), "c1") as ep:
        ep.reset()
        out = ep.step(call("lookup", {"key": "BIG"}))
        content = out.messages[0]["content"]
        assert content.startswith("x" * 100)
        assert content.endswith("…[truncated 400 chars]")
        assert ep.stats.truncated_tool_outputs == 1
        assert ep.stats.tool_errors == 0


def test_tool_limits_per_instance_and_their_checks() -> None:
    env = Toy(max_tool_output_chars=10, tool_timeout_s=0)
    assert (env.max_tool_output_chars, env.tool_timeout_s) == (10, 0)
    assert (Toy.max_tool_output_chars, Toy.tool_timeout_s) == (4000, 30.0)
    env.set_limits(tool_timeout_s=2.5)
    assert (env.max_tool_output_chars, env.tool_timeout_s) == (10, 2.5)
    with pytest.raises(ValueError, match="max_tool_output_chars"):
        env.set_limits(max_tool_output_chars=0)
    with pytest.raises(ValueError, match="tool_timeout_s"):
        env.set_limits(tool_timeout_s=float("nan"))


@pytest.mark.parametrize("timeout", [0.0, 30.0])
def test_tools_answer_the_same_inline_and_on_a_worker_thread(timeout: float) -> None:
    with Episode(Toy(tool_timeout_s=timeout), "c1") as ep:
        ep.reset()
        out = ep.step(call("add", {"a": 2, "b": 3}) + call("broken", {}) + call("nope", {}))
        assert [m["content"] for m in out.messages] == [
            "5",
            "error: tool broken failed: KeyError: 'oops'",
            "error: unknown tool 'nope'",
        ]
        assert (ep.stats.tool_errors, ep.stats.tool_timeouts) == (2, 0)


def test_episode_ends_on_final_answer_no_action_and_max_turns() -> None:
    env = Toy()
    with Episode(env, "c1", max_turns=5) as ep:
        ep.reset()
        assert ep.step('<final_response>{"a": 1}</final_response>').done
        assert ep.stats.done_reason == "final_answer"
    assert not env._open
    with Episode(Toy(), "c1", max_turns=5) as ep:
        ep.reset()
        assert ep.step("I think I am done.").done
        assert ep.stats.done_reason == "no_action"
    with Episode(Toy(), "c1", max_turns=2) as ep:
        ep.reset()
        assert not ep.step(call("add", {"a": 1})).done
        assert ep.step(call("add", {"a": 1})).done
        assert ep.stats.done_reason == "max_turns"
        with pytest.raises(RuntimeError):
            ep.step(call("add", {"a": 1}))


class Counting(Environment):
    """Counts setup/teardown to prove close() runs exactly once whatever happens."""

    opened = 0
    closed = 0

    def setup(self, case: Any, seed: int) -> None:
        Counting.opened += 1

    def teardown(self) -> None:
        Counting.closed += 1

    def initial_messages(self, case: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": "go"}]

    @tool
    def ping(self) -> str:
        """Answer pong."""
        return "pong"


def test_close_runs_on_final_answer_max_turns_and_exceptions() -> None:
    Counting.opened = Counting.closed = 0
    with Episode(Counting(), "c") as ep:
        ep.reset()
        ep.step("<final_response>{}</final_response>")
    with Episode(Counting(), "c", max_turns=1) as ep:
        ep.reset()
        ep.step(call("ping", {}))
    with pytest.raises(ZeroDivisionError), Episode(Counting(), "c") as ep:
        ep.reset()
        ep.step(call("ping", {}))
        _ = 1 / 0  # the model/runner failing mid-episode
    assert ep.stats.done_reason == "error"
    assert Counting.opened == 3
    assert Counting.closed == 3


def test_parse_tool_calls_accepts_string_encoded_arguments() -> None:
    text = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    (parsed,) = parse_tool_calls(text)
    assert parsed.error is None
    assert parsed.arguments == {"a": 1}
    assert parse_tool_calls(render_tool_call("add", {"a": 1}))[0].arguments == {"a": 1}


@given(st.dictionaries(st.text(min_size=1, max_size=5), st.integers() | st.text(), max_size=4))
def test_dispatch_never_raises_on_arbitrary_arguments(arguments: dict[str, Any]) -> None:
    env = Toy()
    env.reset("c", 0)
    try:
        for name in ("add", "lookup", "broken", "missing"):
            result = env.call_tool(name, arguments)
            assert isinstance(result.content, str)
    finally:
        env.close()


class Sandbox(SandboxEnvironment):
    def initial_messages(self, case: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": "go"}]

    @tool
    def create(self, name: str) -> str:
        """Create a named resource; returns its handle."""
        handle = f"H-{self.rng.randrange(10**6):06d}"
        self.register("thing", handle, {"name": name})
        return handle

    @tool
    def get(self, handle: str) -> str:
        """Read a resource by handle."""
        return str(self.lookup("thing", handle)["name"])


def test_sandbox_is_seeded_and_torn_down() -> None:
    before = SandboxEnvironment.live_resources()
    handles = []
    for seed in (1, 1, 2):
        env = Sandbox()
        env.reset("case-7", seed)
        handles.append(env.call_tool("create", {"name": "n"}).content)
        assert SandboxEnvironment.live_resources() == before + 1
        env.close()
    assert handles[0] == handles[1] != handles[2]
    assert SandboxEnvironment.live_resources() == before
    env = Sandbox()
    env.reset("case-7", 1)
    # The previous episode's handle does not exist in a new episode.
    assert (
        env.call_tool("get", {"handle": handles[0]}).content
        == f"error: unknown thing '{handles[0]}'"
    )
    env.close()


class Ledger(SQLiteEnvironment):
    def populate(self, db: Any, case: Any, seed: int) -> None:
        db.execute("CREATE TABLE t (k TEXT, v INTEGER)")
        db.executemany("INSERT INTO t VALUES (?, ?)", [("a", 1), ("b", case)])

    def initial_messages(self, case: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": "go"}]

    @tool
    def sql(self, query: str) -> dict[str, Any]:
        """Run a read-only SQL query."""
        return self.query(query)


def test_sqlite_environment_is_private_read_only_and_closed() -> None:
    before = SQLiteEnvironment.open_databases()
    a, b = Ledger(), Ledger()
    a.reset(10, 0)
    b.reset(20, 0)
    assert a.call_tool("sql", {"query": "SELECT v FROM t WHERE k='b'"}).content == (
        '{"columns": ["v"], "rows": [[10]]}'
    )
    assert "[[20]]" in b.call_tool("sql", {"query": "SELECT v FROM t WHERE k='b'"}).content
    for bad in ("DELETE FROM t", "DROP TABLE t", "SELECT 1; DELETE FROM t", "SELEC x"):
        result = a.call_tool("sql", {"query": bad})
        assert result.error, bad
        assert result.content.startswith("error: SQL error:")
    assert "[[2]]" in a.call_tool("sql", {"query": "SELECT count(*) FROM t"}).content
    a.close()
    b.close()
    assert SQLiteEnvironment.open_databases() == before


def test_unknown_tool_errors_never_raise_out_of_closed_env() -> None:
    env = Toy()
    assert env.call_tool("add", {"a": 1}).content == "error: environment is closed"
    with pytest.raises(ToolError):
        raise ToolError("x")


def test_stable_ids_are_identical_across_processes() -> None:
    code = "from mtrl_local.env import stable_id; print(stable_id('INC', 'AC-1', 'crack'))"
    out = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
        ).stdout.strip()
        for env in ({"PYTHONHASHSEED": "1"}, {"PYTHONHASHSEED": "2"})
    }
    assert out == {stable_id("INC", "AC-1", "crack")}
