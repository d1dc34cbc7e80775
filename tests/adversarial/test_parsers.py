"""Adversarial model output: the action parsers return a result for any text, in linear time.

A model can write anything: a tag repeated until the token budget runs out, numbers no machine
type holds, JSON nested a hundred thousand levels deep, lone surrogates, null bytes. Each case
asserts the exact result of :mod:`mtrl_local.env.actions` (a :class:`ParsedCall` with ``error``
set, or ``None`` for an unreadable final answer) and that nothing raises.

The size cases parse 200,000 repetitions of an unclosed tag (2–4 MB). A parser that searches for
a closing tag from every opening one does ~N²/2 steps there (100,000 repetitions took 624 s); a
linear one takes milliseconds. :func:`deadline` turns the quadratic case into a failure after a
minute instead of an hour-long hang; ``tests/bench/test_bench_parsers.py`` measures the ratio.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from mtrl_local.env.actions import (
    FINAL_CLOSE,
    FINAL_OPEN,
    FINAL_RE,
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_CALL_RE,
    ParsedCall,
    extract_final_response,
    parse_answer,
    parse_tool_calls,
)

REPEATS = 200_000
#: Generous: the linear parsers take well under a second here, the quadratic ones an hour.
DEADLINE_S = 60

NOT_JSON = "tool call is not valid JSON"
TOO_DEEP = f"tool call is nested deeper than {MAX_JSON_DEPTH} levels"
LONG_INT = f"tool call has an integer longer than {MAX_INT_DIGITS} digits"
NON_FINITE = "tool call has NaN or Infinity (not JSON)"
OUT_OF_RANGE = "tool call has a number out of floating-point range"
SURROGATE = "tool call has a lone surrogate (not valid Unicode)"
UNTERMINATED = "unterminated tool_call block"


@contextmanager
def deadline(seconds: int = DEADLINE_S) -> Iterator[None]:
    """Fail the test (instead of hanging) if the block runs longer than ``seconds``."""

    def expire(signum: int, frame: Any) -> None:
        pytest.fail(f"parsing did not finish within {seconds} s: not linear in its input")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def call(body: str) -> str:
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


def final(body: str) -> str:
    return f"{FINAL_OPEN}{body}{FINAL_CLOSE}"


def args_body(arguments: str) -> str:
    """A tool call's JSON with ``arguments`` spliced in as raw JSON text."""
    return '{"name": "lookup", "arguments": ' + arguments + "}"


# -- linear time --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "unit",
    [TOOL_CALL_OPEN, TOOL_CALL_OPEN + '{"name": "a"', FINAL_OPEN + TOOL_CALL_OPEN],
    ids=["bare-open", "open-with-json", "final-then-call"],
)
def test_unclosed_tool_call_repeated(unit: str) -> None:
    text = unit * REPEATS
    with deadline():
        calls = parse_tool_calls(text)
    assert calls == [ParsedCall(None, None, UNTERMINATED, text)]


@pytest.mark.parametrize(
    "unit",
    [FINAL_OPEN, FINAL_OPEN + '{"a": 1}', TOOL_CALL_OPEN + FINAL_OPEN],
    ids=["bare-open", "open-with-json", "call-then-final"],
)
def test_unclosed_final_response_repeated(unit: str) -> None:
    with deadline():
        assert extract_final_response(unit * REPEATS) is None


def test_tool_call_re_substitution_is_linear_and_keeps_unclosed_text() -> None:
    text = "prose " + TOOL_CALL_OPEN * REPEATS
    with deadline():
        assert TOOL_CALL_RE.sub(lambda m: m.group(0), text) == text
        # An opening tag that never closes matches to the end, with no block text (group 1).
        assert [m.group(1) for m in FINAL_RE.finditer(FINAL_OPEN * REPEATS)] == [None]


def test_many_closed_blocks_are_all_parsed() -> None:
    text = call(args_body("{}")) * 20_000 + TOOL_CALL_OPEN * REPEATS
    with deadline():
        calls = parse_tool_calls(text)
    assert len(calls) == 20_001
    assert calls[0] == ParsedCall("lookup", {}, None, args_body("{}"))
    assert calls[-1].error == UNTERMINATED


def test_final_after_many_unclosed_opens_is_one_bad_block() -> None:
    # The first opening tag starts the block; the rest of the tags are inside it: not JSON.
    with deadline():
        assert extract_final_response(FINAL_OPEN * REPEATS + final('{"a": 1}')) is None


# -- numbers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ('{"n": ' + "7" * 5000 + "}", LONG_INT),
        ('{"n": -' + "7" * 5000 + "}", LONG_INT),
        ('{"n": [1, ' + "9" * (MAX_INT_DIGITS + 1) + "]}", LONG_INT),
        ('{"n": NaN}', NON_FINITE),
        ('{"n": Infinity}', NON_FINITE),
        ('{"n": -Infinity}', NON_FINITE),
        ('{"n": 1e400}', OUT_OF_RANGE),
        ('{"n": -1.5e999}', OUT_OF_RANGE),
    ],
    ids=["5000-digits", "negative", "in-list", "nan", "inf", "-inf", "1e400", "-1.5e999"],
)
def test_unrepresentable_number_in_arguments_is_a_malformed_call(
    arguments: str, error: str
) -> None:
    raw = args_body(arguments)
    assert parse_tool_calls(call(raw)) == [ParsedCall(None, None, error, raw)]


@pytest.mark.parametrize(
    "value",
    ["7" * 5000, "-" + "7" * 5000, "NaN", "Infinity", "-Infinity", "1e400", '["x", 1e999]'],
)
def test_unrepresentable_number_in_final_answer_is_no_answer(value: str) -> None:
    text = final('{"a": ' + value + "}")
    assert extract_final_response(text) is None
    assert parse_answer([{"role": "assistant", "content": text}]) is None


def test_numbers_at_the_limits_are_kept() -> None:
    digits = "9" * MAX_INT_DIGITS
    raw = args_body('{"n": ' + digits + ', "tiny": 1e-400, "big": 1.7e308}')
    (parsed,) = parse_tool_calls(call(raw))
    assert parsed == ParsedCall(
        "lookup", {"n": int(digits), "tiny": 0.0, "big": 1.7e308}, None, raw
    )


def test_unrepresentable_number_in_string_arguments_keeps_the_string() -> None:
    # Arguments sent as a JSON-encoded string are decoded when they can be; else they stay a
    # string, which the tool refuses ("arguments … must be a JSON object").
    inner = '{"n": ' + "7" * 5000 + "}"
    raw = json.dumps({"name": "lookup", "arguments": inner})
    assert parse_tool_calls(call(raw)) == [ParsedCall("lookup", inner, None, raw)]


# -- nesting ------------------------------------------------------------------------------------
def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 100_000])
def test_deeply_nested_arguments_are_a_malformed_call(depth: int) -> None:
    # ``arguments`` sits one level inside the call object.
    raw = args_body(nested(depth))
    assert parse_tool_calls(call(raw)) == [ParsedCall(None, None, TOO_DEEP, raw)]


def test_unclosed_deep_nesting_is_a_malformed_call() -> None:
    raw = args_body("[" * 100_000)
    assert parse_tool_calls(call(raw)) == [ParsedCall(None, None, TOO_DEEP, raw)]


def test_nesting_up_to_the_limit_is_kept() -> None:
    raw = args_body(nested(MAX_JSON_DEPTH - 1))
    (parsed,) = parse_tool_calls(call(raw))
    assert parsed == ParsedCall("lookup", json.loads(nested(MAX_JSON_DEPTH - 1)), None, raw)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = '\\"' + "[{" * 5_000
    raw = args_body(json.dumps({"s": text}))
    assert parse_tool_calls(call(raw)) == [ParsedCall("lookup", {"s": text}, None, raw)]


def test_deeply_nested_string_arguments_keep_the_string() -> None:
    inner = "[" * 100_000
    raw = json.dumps({"name": "lookup", "arguments": inner})
    assert parse_tool_calls(call(raw)) == [ParsedCall("lookup", inner, None, raw)]


@pytest.mark.parametrize("body", ['{"a": ' + nested(100_000) + "}", '{"a": ' + "{" * 100_000])
def test_deeply_nested_final_answer_is_no_answer(body: str) -> None:
    assert extract_final_response(final(body)) is None


# -- unicode and control characters -------------------------------------------------------------
@pytest.mark.parametrize(
    "arguments",
    ['{"s": "\\ud800"}', '{"s": "a\\udfffb"}', '{"\\ud83d": 1}', '{"s": "\ud800"}'],
    ids=["escaped-high", "escaped-low", "in-key", "raw-surrogate"],
)
def test_lone_surrogate_is_a_malformed_call(arguments: str) -> None:
    raw = args_body(arguments)
    assert parse_tool_calls(call(raw)) == [ParsedCall(None, None, SURROGATE, raw)]


def test_lone_surrogate_in_final_answer_is_no_answer() -> None:
    assert extract_final_response(final('{"a": "\\udc00"}')) is None


def test_surrogate_pair_is_one_character() -> None:
    assert extract_final_response(final('{"a": "\\ud83d\\ude00"}')) == {"a": "\U0001f600"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            call(args_body('{"s": "a\x00b"}')),
            [ParsedCall(None, None, NOT_JSON, args_body('{"s": "a\x00b"}'))],
        ),
        (
            call(args_body('{"s": "a\\u0000b"}')),
            [ParsedCall("lookup", {"s": "a\x00b"}, None, args_body('{"s": "a\\u0000b"}'))],
        ),
        ("\x00" * 1000, []),
        (
            "\x00" + call(args_body("{}")) + "\x00",
            [ParsedCall("lookup", {}, None, args_body("{}"))],
        ),
    ],
    ids=["raw-null-in-string", "escaped-null", "only-nulls", "nulls-around"],
)
def test_null_bytes(text: str, expected: list[ParsedCall]) -> None:
    assert parse_tool_calls(text) == expected


# -- empty and oddly nested output ----------------------------------------------------------------
@pytest.mark.parametrize("text", ["", " ", "\n\n", "no tags at all"])
def test_empty_or_tagless_output(text: str) -> None:
    assert parse_tool_calls(text) == []
    assert extract_final_response(text) is None


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "user", "content": final('{"a": 1}')}], [{"role": "assistant", "content": ""}]],
)
def test_no_answer_without_assistant_text(messages: list[dict[str, Any]]) -> None:
    assert parse_answer(messages) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            call(call('{"name": "a"}')),
            [ParsedCall(None, None, NOT_JSON, TOOL_CALL_OPEN + '{"name": "a"}')],
        ),
        (call(""), [ParsedCall(None, None, NOT_JSON, "")]),
        (call(" [1] "), [ParsedCall(None, None, "tool call must be a JSON object", "[1]")]),
        (call('{"name": 7}'), [ParsedCall(None, None, "tool call has no 'name'", '{"name": 7}')]),
        (
            call('{"name": "a"} trailing'),
            [ParsedCall(None, None, NOT_JSON, '{"name": "a"} trailing')],
        ),
        (
            TOOL_CALL_CLOSE + TOOL_CALL_OPEN + '{"name": "a"}',
            [
                ParsedCall(
                    None, None, UNTERMINATED, TOOL_CALL_CLOSE + TOOL_CALL_OPEN + '{"name": "a"}'
                )
            ],
        ),
        (
            call('{"name": "a"}') + " then " + TOOL_CALL_OPEN,
            [
                ParsedCall("a", {}, None, '{"name": "a"}'),
                ParsedCall(None, None, UNTERMINATED, " then " + TOOL_CALL_OPEN),
            ],
        ),
    ],
    ids=[
        "call-in-call",
        "empty",
        "array",
        "name-not-string",
        "trailing",
        "close-first",
        "valid-then-open",
    ],
)
def test_oddly_formed_tool_calls(text: str, expected: list[ParsedCall]) -> None:
    assert parse_tool_calls(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (final(final('{"a": 1}')), None),
        (final('{"a": 1}') + FINAL_OPEN + '{"a": 2}', {"a": 1}),
        (final('{"a": 1}') + final('{"a": 2}'), {"a": 2}),
        (final("[1]"), None),
        (final('"' + "x" * 1_000_000 + '"'), None),
        (final('{"a": "' + "x" * 1_000_000 + '"}'), {"a": "x" * 1_000_000}),
    ],
    ids=[
        "final-in-final",
        "unclosed-after-valid",
        "last-wins",
        "array",
        "huge-string",
        "huge-value",
    ],
)
def test_oddly_formed_final_answers(text: str, expected: dict[str, Any] | None) -> None:
    assert extract_final_response(text) == expected
