"""Metric names and rollout metrics on hand-made trajectories (values computed by hand)."""

from __future__ import annotations

import pytest

from mtrl_local import metrics as M
from mtrl_local.advantages import batch_advantages
from mtrl_local.metrics import ALL_METRICS, rollout_metrics
from mtrl_local.trajectory import FinishReason, Trajectory, TurnSpan


def traj(
    group: str,
    reward: float | list[float] | None,
    turns: list[tuple[int, FinishReason]] = ((10, "stop"),),  # type: ignore[assignment]
    done: str = "final_answer",
    calls: int = 0,
    errors: int = 0,
    failed: bool = False,
    index: int = 0,
) -> Trajectory:
    spans, pos = [], 5
    for n, reason in turns:
        spans.append(TurnSpan(pos, pos + n, reason))
        pos += n + 3
    return Trajectory(
        task="t",
        case_id=group,
        split="train",
        ground_truth={},
        turns=spans,
        done_reason=done,
        tool_calls=calls,
        tool_errors=errors,
        failed=failed,
        reward=reward,
        group_id=group,
        sample_index=index,
    )


def test_names_are_the_design_table() -> None:
    assert len(set(ALL_METRICS)) == len(ALL_METRICS) == 31
    for name in (
        "rollout/reward/mean",
        "rollout/reward/std",
        "rollout/reward/zero_frac",
        "rollout/reward/valid_mean",
        "rollout/turns/mean",
        "rollout/turns/max_turns_frac",
        "rollout/tokens/response_mean",
        "rollout/tokens/response_max",
        "rollout/truncated_frac",
        "rollout/completion_rate",
        "rollout/failure_rate",
        "rollout/tool_calls/mean",
        "rollout/tool_errors_frac",
        "analysis/zero_adv_groups",
        "train/loss",
        "train/clip_frac",
        "train/is_ratio_mean",
        "train/kl",
        "train/entropy",
        "train/grad_norm",
        "train/lr",
        "perf/step_s",
        "perf/rollout_tokens_per_s",
        "perf/train_tokens_per_s",
        "perf/staleness_mean",
        "val/reward/mean",
        "val/reward/pass_k_1",
        "val/reward/pass_k_8",
        "val/completion_rate",
        "val/field_acc",
        "val/tsr",
    ):
        assert name in ALL_METRICS


def batch() -> list[Trajectory]:
    # group a: rewards 1, 0 (learns); group b: 0.5, 0.5 (zero advantage); one failure in c.
    return [
        traj("a", 1.0, [(10, "stop"), (20, "stop")], calls=2, errors=1, index=0),
        traj("a", 0.0, [(30, "stop"), (40, "length")], done="max_turns", calls=1, index=1),
        traj("b", [0.25, 0.25], [(6, "stop")], calls=1, index=0),
        traj("b", 0.5, [(4, "stop")], done="no_action", index=1),
        traj("c", None, [], done="error", failed=True),
    ]


def zero_groups(trajs: list[Trajectory], method: str = "group_based", **kw: object) -> set[str]:
    """The estimator's verdict: the groups whose advantages are all zero."""
    return batch_advantages(trajs, method, **kw).zero_group_ids


def test_rollout_metrics_by_hand() -> None:
    m = rollout_metrics(batch(), zero_groups(batch()))
    assert m[M.FAILURE_RATE] == pytest.approx(1 / 5)
    # over the 4 non-failed: rewards 1, 0, 0.5, 0.5
    assert m[M.REWARD_MEAN] == pytest.approx(0.5)
    assert m[M.REWARD_STD] == pytest.approx((0.5 / 4) ** 0.5)
    assert m[M.REWARD_ZERO_FRAC] == pytest.approx(1 / 4)
    assert m[M.ZERO_ADV_GROUPS] == pytest.approx(1 / 2)  # b of {a, b}
    assert m[M.REWARD_VALID_MEAN] == pytest.approx(0.5)  # group a only
    assert m[M.TURNS_MEAN] == pytest.approx(6 / 4)
    assert m[M.TURNS_MAX_TURNS_FRAC] == pytest.approx(1 / 4)
    assert m[M.TOKENS_RESPONSE_MEAN] == pytest.approx((10 + 20 + 30 + 40 + 6 + 4) / 6)
    assert m[M.TOKENS_RESPONSE_MAX] == 40.0
    assert m[M.TRUNCATED_FRAC] == pytest.approx(1 / 4)
    assert m[M.COMPLETION_RATE] == pytest.approx(2 / 4)
    assert m[M.TOOL_CALLS_MEAN] == pytest.approx(4 / 4)
    assert m[M.TOOL_ERRORS_FRAC] == pytest.approx(1 / 4)
    assert set(m) == set(M.ROLLOUT_METRICS)


def test_estimator_groups_override_and_valid_mean() -> None:
    # pass@k-style: the estimator says group a is zero-advantage too -> no valid group left.
    m = rollout_metrics(batch(), zero_adv_groups={"a", "b"}, group_ids={"a", "b", "c"})
    assert m[M.ZERO_ADV_GROUPS] == pytest.approx(2 / 3)
    assert M.REWARD_VALID_MEAN not in m
    # valid_mean below the mean: the zero-adv groups are the all-success ones.
    sat = [traj("s", 1.0, index=i) for i in range(2)] + [
        traj("h", 0.0, index=0),
        traj("h", 0.2, index=1),
    ]
    m = rollout_metrics(sat, zero_groups(sat))
    assert m[M.REWARD_VALID_MEAN] == pytest.approx(0.1)
    assert m[M.REWARD_VALID_MEAN] < m[M.REWARD_MEAN]


def test_edge_cases_absent_not_zero() -> None:
    assert rollout_metrics([], set()) == {}
    only_failed = rollout_metrics([traj("a", None, [], failed=True)], set())
    assert only_failed == {M.FAILURE_RATE: 1.0}
    unscored = rollout_metrics([traj("a", None)], set())
    assert M.REWARD_MEAN not in unscored and M.TOOL_ERRORS_FRAC not in unscored
    assert unscored[M.COMPLETION_RATE] == 1.0


def test_zero_groups_are_the_estimators_verdict() -> None:
    """Group b (rewards 0 and 1) carries gradient under group_based; under grpo_passk with
    threshold 0.5 both groups are all-success or mixed as the estimator sees them."""
    ts = [traj("a", 1.0), traj("a", 1.0, index=1), traj("b", 0.0), traj("b", 1.0, index=1)]
    assert zero_groups(ts) == {"a"}
    # Every sample of b at or above a threshold of 0.0 succeeds: no pass@k signal left in b.
    passk = zero_groups(ts, "grpo_passk", k=1, success_threshold=0.0)
    assert passk == {"a", "b"}
    assert rollout_metrics(ts, passk)[M.ZERO_ADV_GROUPS] == 1.0
