"""Diagnostics on synthetic metric histories: each symptom fires, healthy runs stay silent."""

from __future__ import annotations

import math

import pytest

from mtrl_local import diagnostics as D
from mtrl_local import metrics as M

STEPS = range(60)


def series(f, steps=STEPS) -> list[tuple[int, float]]:  # type: ignore[no-untyped-def]
    return [(s, float(f(s))) for s in steps]


def wiggle(s: int, amp: float = 0.005) -> float:
    return amp * math.sin(1.7 * s)


def healthy() -> dict[str, list[tuple[int, float]]]:
    """Reward climbing steadily to 0.8, val following, all rates low."""
    return {
        M.REWARD_MEAN: series(lambda s: 0.1 + 0.7 * (1 - math.exp(-s / 25)) + wiggle(s)),
        M.REWARD_VALID_MEAN: series(lambda s: 0.12 + 0.7 * (1 - math.exp(-s / 25))),
        M.VAL_REWARD_MEAN: series(lambda s: 0.1 + 0.6 * (1 - math.exp(-s / 25)), range(0, 60, 10)),
        M.ZERO_ADV_GROUPS: series(lambda s: 0.2),
        M.TRUNCATED_FRAC: series(lambda s: 0.01),
        M.FAILURE_RATE: series(lambda s: 0.0),
        M.TOOL_CALLS_MEAN: series(lambda s: 6.8 - 0.01 * s + wiggle(s)),
    }


def codes(history: dict) -> set[str]:  # type: ignore[type-arg]
    return {f.code for f in D.diagnose(history)}


def test_healthy_run_is_silent() -> None:
    assert codes(healthy()) == set()
    assert D.diagnose({}) == []
    # too short to say anything
    short = {k: v[:5] for k, v in healthy().items()}
    short[M.REWARD_MEAN] = series(lambda s: 0.0, range(5))
    assert codes(short) == set()


def test_reward_flat_from_start() -> None:
    h = healthy()
    h[M.REWARD_MEAN] = series(lambda s: 0.0 + wiggle(s))
    (f,) = [f for f in D.diagnose(h) if f.code == "reward_flat_from_start"]
    assert f.severity == "error" and f.step == 59
    assert "output format" in f.first_change and "baseline" in f.confirm_with
    assert f.evidence["steps"] == 60


def test_all_groups_same_high_and_rising() -> None:
    h = healthy()
    h[M.REWARD_MEAN] = series(lambda s: 0.3 if s < 30 else 0.3 + wiggle(s))
    assert "all_groups_same" not in codes(h)  # zero-adv groups low: not this symptom
    h[M.ZERO_ADV_GROUPS] = series(lambda s: 0.9)
    f = D.check_all_groups_same(h)
    assert f is not None and "group_size 8 → 4" in f.first_change
    assert f.confirm_with == "analysis/zero_adv_groups drops"
    h[M.ZERO_ADV_GROUPS] = series(lambda s: 0.2 + 0.01 * s)  # rising, 0.79 at the end
    assert D.check_all_groups_same(h) is not None
    h[M.REWARD_MEAN] = healthy()[M.REWARD_MEAN]  # reward still rising: groups are fine
    h[M.ZERO_ADV_GROUPS] = series(lambda s: 0.9)
    assert D.check_all_groups_same(h) is None


def test_reward_hacking() -> None:
    h = healthy()
    h[M.REWARD_MEAN] = series(lambda s: 0.2 + 0.01 * s)  # +0.19 over the last 20 steps
    h[M.VAL_REWARD_MEAN] = series(lambda s: 0.3 + wiggle(s, 0.002), range(0, 60, 10))
    f = D.check_reward_hacking(h)
    assert f is not None and f.code == "reward_hacking"
    assert f.evidence["train_change"] == pytest.approx(0.19)
    assert f.evidence["from_step"] == 40
    assert "tighten the reward parser" in f.first_change and "reward audit" in f.confirm_with
    # val rising too: not hacking
    h[M.VAL_REWARD_MEAN] = series(lambda s: 0.2 + 0.01 * s, range(0, 60, 10))
    assert D.check_reward_hacking(h) is None
    # a single val point: can't tell
    h[M.VAL_REWARD_MEAN] = [(50, 0.3)]
    assert D.check_reward_hacking(h) is None


def test_reward_collapse() -> None:
    h = healthy()
    h[M.REWARD_MEAN] = series(lambda s: 0.1 + 0.012 * s if s < 50 else 0.02 + wiggle(s))
    f = D.check_reward_collapse(h)
    assert f is not None and f.severity == "error" and f.evidence["peak_step"] == 49
    assert "max_steps_off_policy = 0" in f.first_change
    assert "reward_collapse" in codes(h)
    # on-policy and nothing clipped (the collapse of a too-large step): lower the rate instead
    on_policy = {**h, M.PERF_STALENESS_MEAN: series(lambda s: 0.0)}
    on_policy[M.TRAIN_CLIP_FRAC] = series(lambda s: 0.0)
    f = D.check_reward_collapse(on_policy)
    assert f is not None and "lower learning_rate" in f.first_change
    on_policy[M.TRAIN_CLIP_FRAC] = series(lambda s: 0.1)  # clipping happened: the usual advice
    f = D.check_reward_collapse(on_policy)
    assert f is not None and "max_steps_off_policy = 0" in f.first_change
    # a dip to half the peak is not a collapse
    h[M.REWARD_MEAN] = series(lambda s: 0.1 + 0.012 * s if s < 50 else 0.35)
    assert D.check_reward_collapse(h) is None


def test_tool_use_collapse() -> None:
    """The measured shortcut: 6.8 tool calls per episode at the start, 1.4 after 60 steps."""
    h = healthy()
    h[M.TOOL_CALLS_MEAN] = series(lambda s: max(6.8 - 0.1 * s, 1.4))
    f = D.check_tool_use_collapse(h)
    assert f is not None and f.severity == "warning"
    assert f.evidence["tool_calls_now"] == pytest.approx(1.4)
    assert "tool_use_collapse" in codes(h)
    h[M.TOOL_CALLS_MEAN] = series(lambda s: max(6.8 - 0.1 * s, 4.0))  # fewer, not collapsed
    assert D.check_tool_use_collapse(h) is None
    h[M.TOOL_CALLS_MEAN] = series(lambda s: 0.5)  # a task without tools says nothing
    assert D.check_tool_use_collapse(h) is None


def test_stall_with_healthy_knobs() -> None:
    h = healthy()
    h[M.REWARD_MEAN] = series(lambda s: min(0.1 + 0.02 * s, 0.5) + wiggle(s))
    h[M.REWARD_VALID_MEAN] = h[M.REWARD_MEAN]
    (f,) = D.diagnose(h)
    assert f.code == "reward_stall" and f.severity == "info"
    assert "64/128" in f.first_change and "50 steps" in f.confirm_with
    # the same plateau with a sick knob is that knob's problem, not capacity
    h[M.TRUNCATED_FRAC] = series(lambda s: 0.2)
    assert codes(h) == {"truncation_high"}
    # a plateau at the ceiling is done, not stalled
    h = healthy()
    h[M.REWARD_MEAN] = series(lambda s: min(0.1 + 0.05 * s, 0.97))
    assert D.check_stall(h) is None


def test_truncation_and_failures() -> None:
    h = healthy()
    h[M.TRUNCATED_FRAC] = series(lambda s: 0.08)
    h[M.FAILURE_RATE] = series(lambda s: 0.02 if s > 50 else 0.0)
    found = {f.code: f for f in D.diagnose(h)}
    assert set(found) == {"truncation_high", "failure_rate_high"}
    assert found["truncation_high"].first_change == "raise sampling_max_tokens"
    assert found["truncation_high"].confirm_with == "rollout/truncated_frac"
    assert "environment bug" in found["failure_rate_high"].first_change
    assert D.diagnose(h)[0].code == "failure_rate_high"  # errors first
    h[M.TRUNCATED_FRAC] = series(lambda s: 0.05)  # at the limit: fine
    h[M.FAILURE_RATE] = series(lambda s: 0.01)
    assert codes(h) == set()


def test_valid_mean_below_mean_and_stalled() -> None:
    h = healthy()
    h[M.REWARD_MEAN] = series(lambda s: 0.6 + wiggle(s))
    h[M.REWARD_VALID_MEAN] = series(lambda s: 0.4)
    h[M.REWARD_MEAN][0] = (0, 0.55)  # not flat from the start
    f = D.check_valid_mean_low(h)
    assert f is not None and f.evidence["gap"] == pytest.approx(-0.2, abs=0.01)
    assert "denser reward" in f.first_change
    h[M.REWARD_VALID_MEAN] = series(lambda s: 0.58)
    assert D.check_valid_mean_low(h) is None


def test_finding_is_json_ready_and_storable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mtrl_local.store import RunStore

    h = healthy()
    h[M.TRUNCATED_FRAC] = series(lambda s: 0.3)
    findings = D.diagnose(h)
    with RunStore.create(tmp_path, "r", "t", {}) as store:
        store.add_findings(findings)
        (row,) = store.diagnostics()
    assert row.code == "truncation_high" and row.evidence == findings[0].to_json()["evidence"]
