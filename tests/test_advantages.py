"""Advantage estimators (docs/design.md, "Advantages") against values worked out by hand in the
comments."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrl_local.advantages import (
    ADVANTAGES,
    compute_advantages,
    get_advantage_fn,
    group_based,
    group_based_per_turn,
    group_by,
    grpo_passk,
    rloo,
    token_advantages,
)
from mtrl_local.errors import UserError
from mtrl_local.trajectory import Trajectory, TurnSpan


def close(actual: torch.Tensor, expected: float | list[float], tol: float = 1e-5) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float32), atol=tol, rtol=0
    )


rewards_st = st.lists(st.floats(-10, 10, allow_subnormal=False), min_size=1, max_size=8)


# -- group_based ----------------------------------------------------------------------------------


def test_group_based_uses_population_std() -> None:
    # [1, 0, 0, 1]: mean 0.5; population std sqrt(4·0.25/4) = 0.5 (the sample std would be
    # sqrt(1/3) = 0.57735 and give ±0.866). A = ±0.5 / (0.5 + 1e-6) = ±0.999998.
    close(group_based([1.0, 0.0, 0.0, 1.0]), [0.999998, -0.999998, -0.999998, 0.999998], 1e-6)


def test_group_based_scale_none_is_dr_grpo() -> None:
    close(group_based([1.0, 0.0, 0.0, 1.0], scale_rewards="none"), [0.5, -0.5, -0.5, 0.5])
    # [3, 1]: mean 2, population std 1 → [1/(1+1e-6), −1/(1+1e-6)].
    close(group_based([3.0, 1.0]), [0.999999, -0.999999], 1e-6)


def test_group_based_all_equal_is_exact_zero() -> None:
    # 0.1 is not exact in binary: the mean could differ from each reward by one ulp, which the
    # formula would divide by 1e-6. Equal rewards must give exact zeros.
    assert torch.equal(group_based([0.1, 0.1, 0.1]), torch.zeros(3))
    assert torch.equal(group_based([0.7]), torch.zeros(1))


def test_group_based_rejects_unknown_scaling() -> None:
    with pytest.raises(ValueError, match="scale_rewards"):
        group_based([1.0, 0.0], scale_rewards="batch")  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(rewards_st, st.floats(-10, 10, allow_subnormal=False))
def test_group_based_invariant_to_a_constant_shift(rewards: list[float], c: float) -> None:
    shifted = group_based([r + c for r in rewards])
    torch.testing.assert_close(shifted, group_based(rewards), atol=1e-4, rtol=0)


# -- rloo ------------------------------------------------------------------------------------------


def test_rloo_by_hand() -> None:
    # [1, 2, 3]: 1 − (2+3)/2 = −1.5; 2 − (1+3)/2 = 0; 3 − (1+2)/2 = 1.5.
    close(rloo([1.0, 2.0, 3.0]), [-1.5, 0.0, 1.5])
    # [1, 0, 0, 1]: 1 − 1/3 = 0.6667, 0 − 2/3 = −0.6667.
    close(rloo([1.0, 0.0, 0.0, 1.0]), [2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_rloo_single_sample_is_zero() -> None:
    assert torch.equal(rloo([5.0]), torch.zeros(1))


@settings(max_examples=50, deadline=None)
@given(rewards_st)
def test_rloo_sums_to_zero(rewards: list[float]) -> None:
    assert abs(float(rloo(rewards).double().sum())) < 1e-4


# -- grpo_passk ------------------------------------------------------------------------------------


def test_grpo_passk_by_hand() -> None:
    # n = 4, k = 2, threshold 0.8 → successes [1, 0, 0, 0], c = 1.
    # ρ = 1 − C(3,2)/C(4,2) = 1 − 3/6 = 0.5; σ = sqrt(0.5·0.5) = 0.5.
    # A_pos = (1 − 0.5)/(0.5 + 1e-6) = 0.999998.
    # A_neg = (1 − 0.5 − C(2,1)/C(3,1))/(0.5 + 1e-6) = (0.5 − 2/3)/0.500001 = −0.333333.
    adv = grpo_passk([0.9, 0.2, 0.0, 0.5], k=2, success_threshold=0.8)
    close(adv, [0.999998, -0.333333, -0.333333, -0.333333], 1e-6)


def test_grpo_passk_second_case_by_hand() -> None:
    # n = 4, k = 2, c = 2: ρ = 1 − C(2,2)/C(4,2) = 5/6; σ = sqrt(5/36) = 0.372678.
    # A_pos = (1/6)/0.372679 = 0.447213;
    # A_neg = (1/6 − C(1,1)/C(3,1))/σ = (−1/6)/0.372679 = −0.447213.
    adv = grpo_passk([1.0, 1.0, 0.0, 0.0], k=2)
    close(adv, [0.447213, 0.447213, -0.447213, -0.447213], 1e-5)


def test_grpo_passk_without_variance_is_zero() -> None:
    assert torch.equal(grpo_passk([0.0, 0.3, 0.5], k=2), torch.zeros(3))  # c = 0
    assert torch.equal(grpo_passk([1.0, 1.0, 2.0], k=2), torch.zeros(3))  # c = n


def test_grpo_passk_large_k_uses_zero_binomials() -> None:
    # n = 4, k = 3, c = 2: C(n−c, k) = C(2,3) = 0 → ρ = 1 → σ = 0 → zeros.
    assert torch.equal(grpo_passk([1.0, 1.0, 0.0, 0.0], k=3), torch.zeros(4))
    # n = 4, k = 3, c = 1: ρ = 1 − C(3,3)/C(4,3) = 0.75, σ = 0.433013;
    # A_pos = 0.25/σ = 0.577349; A_neg = (0.25 − C(2,2)/C(3,2))/σ = (0.25 − 1/3)/σ = −0.192450.
    close(grpo_passk([1.0, 0.0, 0.0, 0.0], k=3), [0.577349, -0.192450, -0.192450, -0.192450])


def test_grpo_passk_rejects_k_out_of_range() -> None:
    with pytest.raises(ValueError, match="k"):
        grpo_passk([1.0, 0.0], k=3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=10), st.data())
def test_grpo_passk_properties(successes: list[bool], data: st.DataObject) -> None:
    rewards = [float(s) for s in successes]
    # k = 1 is GRPO on binary rewards (σ = sqrt(ρ(1−ρ)) is the population std).
    torch.testing.assert_close(grpo_passk(rewards, k=1), group_based(rewards), atol=1e-5, rtol=0)
    # Any k: the group's advantages sum to zero.
    k = data.draw(st.integers(1, len(rewards)))
    assert abs(float(grpo_passk(rewards, k=k).double().sum())) < 1e-4


# -- group_based_per_turn --------------------------------------------------------------------------


def test_group_based_per_turn_by_hand() -> None:
    # a: r = [0.5, 1.0]        → return-to-go [1.5, 1.0]
    # b: r = [0.0, 1.0, −0.5]  → return-to-go [0.5, 0.5, −0.5]
    # totals G_{·,0} = [1.5, 0.5]: mean 1.0, population std 0.5 → divide by 0.500001.
    # a: [(1.5−1)/0.500001, (1.0−1)/0.500001] = [0.999998, 0]
    # b: [(0.5−1), (0.5−1), (−0.5−1)]/0.500001 = [−0.999998, −0.999998, −2.999994]
    a, b = group_based_per_turn([[0.5, 1.0], [0.0, 1.0, -0.5]])
    close(a, [0.999998, 0.0], 1e-6)
    close(b, [-0.999998, -0.999998, -2.999994], 1e-6)


def test_group_based_per_turn_equal_totals_are_zero() -> None:
    # Totals both 1.0: no between-trajectory signal (the formula would give (0 − 1)/1e-6 = −1e6).
    a, b = group_based_per_turn([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(a, torch.zeros(2)) and torch.equal(b, torch.zeros(2))


def test_equal_totals_up_to_rounding_are_equal() -> None:
    # 0.1 + 0.2 + 0.3 = 0.6000000000000001 but 0.3 + 0.2 + 0.1 = 0.6 in float64: the totals are
    # one ulp apart, std ≈ 5.6e-17, and without a tolerance the return-to-go differences
    # (0.3 − 0.6, 0.5 − 0.6, …) were divided by ~1e-6: advantages down to −5·10⁵.
    a, b = group_based_per_turn([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    assert torch.equal(a, torch.zeros(3)) and torch.equal(b, torch.zeros(3))
    # Summed for a scalar estimator, the same group is a zero-advantage group (no gradient, and
    # what analysis/zero_adv_groups and dynamic sampling count).
    result = compute_advantages([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]], [[0, 1]], "group_based")
    assert result.zero_groups == [0]
    assert all(torch.equal(x, torch.zeros(())) for x in result.advantages)
    # A real difference, however small, still counts (1e-6 > 1e-9): mean 0.6000005, std 5e-7,
    # A = ±5e-7/(5e-7 + 1e-6) = ±0.333333.
    close(group_based([0.6, 0.6 + 1e-6]), [-0.333333, 0.333333])


def test_group_based_per_turn_needs_a_reward_per_trajectory() -> None:
    with pytest.raises(ValueError):
        group_based_per_turn([[1.0], []])


# -- registry, grouping, batch --------------------------------------------------------------------


def test_registry_and_unknown_name() -> None:
    assert set(ADVANTAGES) == {"group_based", "rloo", "grpo_passk", "group_based_per_turn"}
    assert get_advantage_fn("rloo") is rloo
    with pytest.raises(UserError, match="known: group_based, group_based_per_turn, grpo_passk"):
        get_advantage_fn("gae")


def _traj(group_id: str) -> Trajectory:
    return Trajectory(task="t", case_id="c", split="train", ground_truth={}, group_id=group_id)


def test_group_by_trajectories_and_ids() -> None:
    assert group_by(["x", "y", "x", "z", "y"]) == [[0, 2], [1, 4], [3]]
    assert group_by([_traj("p"), _traj("q"), _traj("p")]) == [[0, 2], [1]]


def test_compute_advantages_counts_zero_groups() -> None:
    # Interleaved groups x = [1, 0] → [±1/(0.5+1e-6)·0.5] = [±0.999998]; y = [1, 1] → zeros.
    ids = ["x", "y", "x", "y"]
    res = compute_advantages([1.0, 1.0, 0.0, 1.0], group_by(ids), "group_based")
    close(torch.stack(res.advantages), [0.999998, 0.0, -0.999998, 0.0], 1e-6)
    assert all(a.shape == () for a in res.advantages)
    assert res.zero_groups == [1]  # group y (the second group by first appearance)


def test_compute_advantages_passes_kwargs_and_sums_per_turn_rewards() -> None:
    # A per-turn reward counts as its total for a scalar estimator: [0.5, 0.5] → 1.0.
    res = compute_advantages([[0.5, 0.5], 0.0], [[0, 1]], "group_based", scale_rewards="none")
    close(torch.stack(res.advantages), [0.5, -0.5])
    res = compute_advantages([1.0, 0.0, 0.0, 0.0], [[0, 1, 2, 3]], "grpo_passk", k=2)
    close(torch.stack(res.advantages), [0.999998, -0.333333, -0.333333, -0.333333], 1e-6)


def test_compute_advantages_per_turn_mixed_with_scalar() -> None:
    # Per-turn [0.5, 1.0] (rtg [1.5, 1.0]) beside scalar 0.5 (rtg 0.5 on every turn):
    # totals [1.5, 0.5] → mean 1, std 0.5: a = [0.999998, 0], b = −0.999998 (shape ()).
    res = compute_advantages([[0.5, 1.0], 0.5], [[0, 1]], "group_based_per_turn")
    a, b = res.advantages
    close(a, [0.999998, 0.0], 1e-6)
    assert b.shape == ()
    close(b, -0.999998, 1e-6)
    assert res.zero_groups == []


def test_compute_advantages_needs_full_cover() -> None:
    with pytest.raises(ValueError, match="cover"):
        compute_advantages([1.0, 0.0, 1.0], [[0, 1]])


# -- token_advantages -----------------------------------------------------------------------------


TURNS = [TurnSpan(2, 4, "stop"), TurnSpan(6, 7, "stop")]


def test_token_advantages_scalar_and_per_turn() -> None:
    # Prompt 0:2, turn 0 at 2:4, tool result 4:6, turn 1 at 6:7, padding 7:8.
    close(token_advantages(0.5, TURNS, 8), [0, 0, 0.5, 0.5, 0, 0, 0.5, 0])
    close(token_advantages(torch.tensor(-1.0), TURNS, 8), [0, 0, -1, -1, 0, 0, -1, 0])
    close(token_advantages(torch.tensor([1.0, -2.0]), TURNS, 8), [0, 0, 1, 1, 0, 0, -2, 0])
    close(token_advantages([3.0, 4.0], TURNS, 7), [0, 0, 3, 3, 0, 0, 4])


def test_token_advantages_checks_shapes() -> None:
    with pytest.raises(ValueError, match="per-turn"):
        token_advantages([1.0, 2.0, 3.0], TURNS, 8)
    with pytest.raises(ValueError, match="outside"):
        token_advantages(1.0, TURNS, 6)
