"""A reward function is user code: what it returns is checked once, in ``apply_reward``."""

from __future__ import annotations

from typing import Any

import pytest

from mtrl_local.scoring import RewardError, RewardResult, apply_reward

MESSAGES = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def returning(value: Any) -> Any:
    def reward(messages: Any, ground_truth: Any, **kwargs: Any) -> Any:
        return value

    return reward


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (RewardResult(0.5, {"f1": 1.0}), RewardResult(0.5, {"f1": 1.0})),
        ((1, {"x": 2.0}), RewardResult(1.0, {"x": 2.0})),
        (0.25, RewardResult(0.25, {})),
        (3, RewardResult(3.0, {})),
        (RewardResult([0.1, 0.2], {}), RewardResult([0.1, 0.2], {})),
    ],
)
def test_rewards_of_the_accepted_shapes(value: Any, expected: RewardResult) -> None:
    assert apply_reward(returning(value), MESSAGES, {}) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (RewardResult(float("-inf"), {}), "finite"),
        (RewardResult([0.1, float("nan")], {}), "finite"),
        (True, "returned a bool"),
        ("1.0", "returned a str"),
        (None, "returned a NoneType"),
        ({"reward": 1.0}, "returned a dict"),
        ((1.0, [1.0]), "returned a tuple"),
        (RewardResult("high", {}), "expected a number"),
        (RewardResult([0.1, "x"], {}), "expected a number"),
    ],
)
def test_rewards_that_are_not_rewards(value: Any, fragment: str) -> None:
    with pytest.raises(RewardError, match=fragment) as info:
        apply_reward(returning(value), MESSAGES, {})
    assert "test_reward_results:returning.<locals>.reward" in str(info.value)


def test_a_raising_reward_is_named_with_its_exception() -> None:
    def picky(messages: Any, ground_truth: Any, **kwargs: Any) -> RewardResult:
        return RewardResult(float(ground_truth["missing"]), {})

    with pytest.raises(RewardError) as info:
        apply_reward(picky, MESSAGES, {})
    assert str(info.value).endswith("picky' raised KeyError: 'missing'")
    assert info.value.exit_code == 2
