"""The strict scorer (docs/design.md, "Rewards and the strict scorer", exactly), the dense reward
and per-turn rewards."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtrl_local.env.actions import extract_final_response, parse_answer
from mtrl_local.scoring import normalize, scalar, strict_score
from rewards.dense import (
    dense_reward,
    dense_reward_per_turn,
    dense_strict_reward,
    per_turn_rewards,
    strict_reward,
)

TRUTH = {"result": "pass", "ready": True, "count": 3}


def episode(final: str, *earlier: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "Follow the SOP."},
        {"role": "user", "content": "Inspect aircraft AC-1."},
        *earlier,
        {"role": "assistant", "content": final},
    ]


def block(obj: Any) -> str:
    return f"<final_response>{obj if isinstance(obj, str) else json.dumps(obj)}</final_response>"


# -- strict scorer ---------------------------------------------------------------------------------
def test_strict_exact_answer_scores_one():
    assert strict_score(episode(block(TRUTH)), TRUTH) == 1.0


def test_strict_last_block_wins():
    wrong = {**TRUTH, "result": "fail"}
    assert strict_score(episode(block(wrong) + " corrected: " + block(TRUTH)), TRUTH) == 1.0
    assert strict_score(episode(block(TRUTH) + " corrected: " + block(wrong)), TRUTH) == 0.0


def test_strict_reads_only_the_last_assistant_turn():
    earlier = {"role": "assistant", "content": block(TRUTH)}
    assert strict_score(episode("I am done.", earlier), TRUTH) == 0.0


@pytest.mark.parametrize(
    ("value", "expected", "score"),
    [
        (True, True, 1.0),
        ("true", True, 1.0),
        (" true ", True, 1.0),
        (False, "false", 1.0),
        ("True", True, 0.0),  # booleans are compared as the strings true/false
        (1, True, 0.0),
        (False, True, 0.0),
    ],
)
def test_strict_booleans_as_true_false(value, expected, score):
    truth = {"ready": expected}
    assert strict_score(episode(block({"ready": value})), truth) == score


def test_strict_strips_surrounding_whitespace_only():
    assert strict_score(episode(block({**TRUTH, "result": "  pass\n"})), TRUTH) == 1.0
    assert strict_score(episode(block({**TRUTH, "result": "pa ss"})), TRUTH) == 0.0
    assert strict_score(episode(block({**TRUTH, "result": "Pass"})), TRUTH) == 0.0
    assert strict_score(episode(block({**TRUTH, "count": "3"})), TRUTH) == 1.0
    assert strict_score(episode(block({**TRUTH, "count": " 3 "})), TRUTH) == 1.0


@pytest.mark.parametrize("body", ["[1, 2]", '"pass"', "3", "null", "true"])
def test_strict_non_object_json_scores_zero(body):
    assert extract_final_response(block(body)) is None
    assert strict_score(episode(block(body)), TRUTH) == 0.0


def test_strict_bad_json_scores_zero():
    assert strict_score(episode(block(json.dumps(TRUTH)[:-1])), TRUTH) == 0.0
    assert strict_score(episode("<final_response>" + json.dumps(TRUTH)), TRUTH) == 0.0


def test_strict_missing_field_scores_zero_and_extra_fields_do_not_matter():
    partial = {k: v for k, v in TRUTH.items() if k != "count"}
    assert strict_score(episode(block(partial)), TRUTH) == 0.0
    assert strict_score(episode(block({**TRUTH, "notes": "all good"})), TRUTH) == 1.0


@pytest.mark.parametrize(
    "text",
    [
        f"<final_answer>{json.dumps(TRUTH)}</final_answer>",
        f"<answer>{json.dumps(TRUTH)}</answer>",
        json.dumps(TRUTH),
        f"Result: {json.dumps(TRUTH)}",
        f"<FINAL_RESPONSE>{json.dumps(TRUTH)}</FINAL_RESPONSE>",
    ],
)
def test_strict_other_tags_and_bare_json_score_zero(text):
    assert parse_answer(episode(text)) is None
    assert strict_score(episode(text), TRUTH) == 0.0


def test_strict_no_substring_matching():
    truth = {"outcome": "success", "status": "fail"}
    assert strict_score(episode(block({"outcome": "unsuccessful", "status": "fail"})), truth) == 0
    assert strict_score(episode(block({"outcome": "success", "status": "failure"})), truth) == 0


def test_strict_ignores_tool_results():
    tool = {"role": "tool", "name": "lookup", "content": json.dumps(TRUTH)}
    partial = {k: v for k, v in TRUTH.items() if k != "ready"}
    assert strict_score(episode(block(partial), tool), TRUTH) == 0.0


def test_normalize():
    assert normalize(True) == "true"
    assert normalize(None) == "null"
    assert normalize(2.5) == "2.5"
    assert normalize({"b": 1, "a": [1]}) == '{"a":[1],"b":1}'


# -- dense reward ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("final", "reward", "completion", "field_acc", "strict"),
    [
        (block(TRUTH), 1.0, 1.0, 1.0, 1.0),
        (block({**TRUTH, "result": "fail"}), 2 / 3, 1.0, 2 / 3, 0.0),
        (block({"result": "pass"}), 1 / 3, 1.0, 1 / 3, 0.0),
        (block({}), 0.0, 1.0, 0.0, 0.0),
        (block({"result": "x", "ready": False, "count": 4}), 0.0, 1.0, 0.0, 0.0),
        ("I could not finish.", -0.1, 0.0, 0.0, 0.0),
        (block("[1]"), -0.1, 0.0, 0.0, 0.0),
        (block(json.dumps(TRUTH)[:-1]), -0.1, 0.0, 0.0, 0.0),
        (f"<final_answer>{json.dumps(TRUTH)}</final_answer>", -0.1, 0.0, 0.0, 0.0),
    ],
)
def test_dense_reward_values(final, reward, completion, field_acc, strict):
    result = dense_reward(episode(final), TRUTH)
    assert result.reward == pytest.approx(reward)
    assert result.metrics == pytest.approx(
        {"completion": completion, "field_acc": field_acc, "strict": strict}
    )


def test_dense_format_coef():
    assert dense_reward(episode("no answer"), TRUTH, format_coef=0.25).reward == -0.25
    assert dense_reward(episode(block(TRUTH)), TRUTH, format_coef=0.25).reward == 1.0


def test_dense_strict_metric_agrees_with_strict_scorer():
    for final in (block(TRUTH), block({**TRUTH, "count": 4}), "none", block("[]")):
        msgs = episode(final)
        assert dense_reward(msgs, TRUTH).metrics["strict"] == strict_score(msgs, TRUTH)


@pytest.mark.parametrize(
    ("final", "reward"),
    [
        (block(TRUTH), 1.0),  # all right: 0.5 + 0.5
        (block({**TRUTH, "result": "fail"}), 0.5 * 2 / 3),  # 2 of 3 fields, not strict
        (block({}), 0.0),
        ("I could not finish.", -0.1),  # the format term, as in dense_reward
    ],
)
def test_dense_strict_reward_pays_half_for_the_whole_answer(final, reward):
    result = dense_strict_reward(episode(final), TRUTH)
    assert result.reward == pytest.approx(reward)
    assert result.metrics == dense_reward(episode(final), TRUTH).metrics
    assert dense_strict_reward(episode(final), TRUTH, strict_weight=0.0).reward == pytest.approx(
        dense_reward(episode(final), TRUTH).reward
    )
    with pytest.raises(ValueError, match="strict_weight"):
        dense_strict_reward(episode(final), TRUTH, strict_weight=1.5)


def test_dense_strict_reward_prefers_a_coherent_answer_to_per_field_majorities():
    """Two answers, same number of right fields: only the wholly right one earns the bonus."""
    wrong_one = dense_strict_reward(episode(block({**TRUTH, "ready": False})), TRUTH).reward
    assert dense_strict_reward(episode(block(TRUTH)), TRUTH).reward - wrong_one > 0.5


@pytest.mark.parametrize(
    ("final", "reward"),
    [
        (block(TRUTH), 1.0),
        (block({**TRUTH, "result": "fail"}), 0.0),  # 2 of 3 fields right earns nothing
        (block({}), 0.0),
        ("I could not finish.", -0.1),  # no answer: the format term
    ],
)
def test_strict_reward_is_the_strict_score_plus_the_format_term(final, reward):
    result = strict_reward(episode(final), TRUTH)
    assert result.reward == pytest.approx(reward)
    assert result.metrics["strict"] == strict_score(episode(final), TRUTH)


# -- per-turn rewards ------------------------------------------------------------------------------
def test_per_turn_rewards_final_reward_on_last_turn_and_tool_errors_on_their_turn():
    msgs = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "call a"},
        {"role": "tool", "content": "error: no record found"},
        {"role": "tool", "content": "error: bad argument"},
        {"role": "assistant", "content": "call b"},
        {"role": "tool", "content": '{"ok": true}'},
        {"role": "assistant", "content": "done"},
    ]
    assert per_turn_rewards(msgs, 0.8) == [0.0, 0.0, 0.8]
    assert per_turn_rewards(msgs, 0.8, tool_error_penalty=0.1) == pytest.approx([-0.2, 0.0, 0.8])
    assert per_turn_rewards([{"role": "user", "content": "x"}], 1.0) == []


def test_dense_reward_per_turn_sums_to_dense_minus_tool_errors():
    error = {"role": "tool", "content": "error: unknown tool 'x'"}
    msgs = episode(block(TRUTH), {"role": "assistant", "content": "call x"}, error)
    result = dense_reward_per_turn(msgs, TRUTH, tool_error_penalty=0.02)
    assert result.reward == pytest.approx([-0.02, 1.0])
    assert scalar(result.reward) == pytest.approx(0.98)
    assert result.metrics["strict"] == 1.0
    # No assistant turn at all: a one-element list, never an empty one.
    assert dense_reward_per_turn([{"role": "user", "content": "x"}], TRUTH).reward == [-0.1]


# -- property: dense reward is monotone in the number of correct fields ----------------------------
values = st.one_of(st.booleans(), st.integers(-5, 5), st.text(min_size=1, max_size=6))


@given(
    truth=st.dictionaries(st.text(min_size=1, max_size=5), values, min_size=1, max_size=6),
    data=st.data(),
)
def test_dense_reward_monotone_in_correct_fields(truth, data):
    keys = list(truth)
    order = data.draw(st.permutations(keys))
    wrong = {k: "\x00wrong" for k in keys}
    answer = dict(wrong)
    prev = dense_reward(episode(block(answer)), truth).reward
    assert prev == 0.0
    for n, key in enumerate(order, 1):
        answer[key] = truth[key]
        reward = dense_reward(episode(block(answer)), truth).reward
        assert reward > prev
        assert reward == pytest.approx(n / len(keys))
        prev = reward
    assert prev == pytest.approx(1.0)
