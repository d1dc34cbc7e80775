"""The toolkit reads its own metrics and says what to change first.

The table of findings is in docs/design.md ("Diagnostics").

Each check is a pure function over the metric history, ``{name: [(step, value), …]}`` (what
:meth:`mtrl_local.store.RunStore.history` returns), and returns a :class:`Finding` or ``None``.
:func:`diagnose` runs them all. A check says nothing until it has enough points: a finding must be
worth interrupting someone for, so the thresholds lean towards silence.

Shared definitions (all thresholds are keyword arguments with these defaults):

* *window*: the last ``window`` points of a series (default 20 steps' worth of points).
* *change* of a series over a window: least-squares slope × (last step − first step), i.e. how
  much a straight-line fit rises across the window. A fit, not last − first, so one noisy step
  neither hides nor fakes a trend.
* *flat*: ``|change| ≤ flat_tol`` (default 0.02 reward units).
* *rising*: ``change ≥ rise_min`` (default 0.10).
* *recent value*: the mean of the last ``recent`` points (default 3), for rates like truncation.

Rewards are assumed to be on the dense reward's scale (about −0.1 … 1); pass other tolerances
for rewards on another scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mtrl_local import metrics as M

Series = Sequence[tuple[int, float]]
#: Rates exactly at a limit (a mean of 0.05s is 0.05000000000000001) do not fire.
_EPS = 1e-9
History = Mapping[str, Series]
Severity = Literal["info", "warning", "error"]


@dataclass(frozen=True)
class Finding:
    """A symptom seen in the metrics, the first thing to change, and how to confirm the fix."""

    code: str
    severity: Severity
    #: The step the finding was made at (the last step the check read).
    step: int
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    first_change: str = ""
    confirm_with: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- series helpers --------------------------------------------------------------------------------
def _clean(series: Series | None) -> list[tuple[int, float]]:
    return sorted((int(s), float(v)) for s, v in series or () if v is not None and math.isfinite(v))


def change(points: Sequence[tuple[int, float]]) -> float:
    """Least-squares slope × step span: how much the fitted line rises across ``points``."""
    if len(points) < 2:
        return 0.0
    xs = [float(s) for s, _ in points]
    ys = [v for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope * (xs[-1] - xs[0])


def _mean(points: Sequence[tuple[int, float]]) -> float:
    return sum(v for _, v in points) / len(points)


def _recent(history: History, name: str, recent: int) -> tuple[float, int] | None:
    points = _clean(history.get(name))
    if not points:
        return None
    tail = points[-recent:]
    return _mean(tail), tail[-1][0]


# -- the checks ------------------------------------------------------------------------------------
def check_reward_flat_from_start(
    history: History, *, min_steps: int = 20, flat_tol: float = 0.02
) -> Finding | None:
    """``rollout/reward/mean`` has not moved from its first value in ``min_steps`` points: every
    point is within ``flat_tol`` of the first. Usually the model's output never matches what the
    reward parses, so there is no signal to learn from."""
    points = _clean(history.get(M.REWARD_MEAN))
    if len(points) < min_steps:
        return None
    first = points[0][1]
    spread = max(abs(v - first) for _, v in points)
    if spread > flat_tol:
        return None
    return Finding(
        "reward_flat_from_start",
        "error",
        points[-1][0],
        f"{M.REWARD_MEAN} has stayed at {first:.3f} (±{spread:.3f}) for {len(points)} steps",
        {"first": first, "max_deviation": spread, "steps": len(points)},
        "align the model's output format with the reward",
        "offline reward review on baseline rollouts (reward audit)",
    )


def check_all_groups_same(
    history: History,
    *,
    window: int = 20,
    high: float = 0.75,
    rising_from: float = 0.5,
    rise_min: float = 0.10,
    flat_tol: float = 0.02,
) -> Finding | None:
    """``analysis/zero_adv_groups`` is high (window mean ≥ ``high``) or rising (change ≥
    ``rise_min`` and last value ≥ ``rising_from``) while the training reward is flat: most groups
    give no gradient because all their rollouts score the same."""
    zero = _clean(history.get(M.ZERO_ADV_GROUPS))[-window:]
    reward = _clean(history.get(M.REWARD_MEAN))[-window:]
    if len(zero) < window // 2 or len(reward) < window // 2:
        return None
    mean, rise, last = _mean(zero), change(zero), zero[-1][1]
    high_or_rising = mean >= high or (rise >= rise_min and last >= rising_from)
    if not high_or_rising or abs(change(reward)) > flat_tol:
        return None
    return Finding(
        "all_groups_same",
        "warning",
        zero[-1][0],
        f"{M.ZERO_ADV_GROUPS} is {last:.0%} (window mean {mean:.0%}, change {rise:+.2f}) "
        "while the training reward is flat: most groups carry no gradient",
        {"zero_adv_groups_last": last, "zero_adv_groups_mean": mean, "change": rise},
        "group_size 8 → 4, larger batch (more prompts per step)",
        f"{M.ZERO_ADV_GROUPS} drops",
    )


def check_reward_hacking(
    history: History, *, window: int = 20, rise_min: float = 0.10, flat_tol: float = 0.02
) -> Finding | None:
    """Training reward rising while ``val/reward/mean`` is flat over the same steps.

    Over the last ``window`` points of ``rollout/reward/mean`` the change is ≥ ``rise_min``; over
    the same step range the change of ``val/reward/mean`` is ≤ ``flat_tol`` (flat or falling).
    Validation is logged less often, so its range starts at the last val point at or before the
    window's first step; at least 2 val points are needed. The policy is learning something the
    reward pays for that the held-out evaluation does not: the reward is being gamed.
    """
    train = _clean(history.get(M.REWARD_MEAN))[-window:]
    val_all = _clean(history.get(M.VAL_REWARD_MEAN))
    if len(train) < window // 2 or len(val_all) < 2:
        return None
    start, end = train[0][0], train[-1][0]
    before = [p for p in val_all if p[0] <= start][-1:]
    val = before + [p for p in val_all if start < p[0] <= end]
    if len(val) < 2:
        return None
    train_change, val_change = change(train), change(val)
    if train_change < rise_min or val_change > flat_tol:
        return None
    return Finding(
        "reward_hacking",
        "error",
        end,
        f"training reward rose {train_change:+.2f} over steps {start}–{end} while "
        f"{M.VAL_REWARD_MEAN} changed {val_change:+.2f}",
        {"train_change": train_change, "val_change": val_change, "from_step": start},
        "reward hacking: tighten the reward parser",
        "reward audit on new rollouts (reward high where strict is 0)",
    )


def check_reward_collapse(
    history: History, *, min_peak: float = 0.1, ratio: float = 0.2, recent: int = 3
) -> Finding | None:
    """After a peak of at least ``min_peak``, the mean of the last ``recent`` points fell to at
    most ``ratio`` × peak (and at least ``recent`` points come after the peak). Typical of
    off-policy instability (CISPO around steps 40–80)."""
    points = _clean(history.get(M.REWARD_MEAN))
    if len(points) < recent + 1:
        return None
    peak_i = max(range(len(points)), key=lambda i: points[i][1])
    peak_step, peak = points[peak_i]
    tail = points[-recent:]
    if peak < min_peak or len(points) - 1 - peak_i < recent:
        return None
    now = _mean(tail)
    if now > ratio * peak:
        return None
    evidence: dict[str, Any] = {"peak": peak, "peak_step": peak_step, "recent_mean": now}
    first_change = "max_steps_off_policy = 0; CISPO → PPO with ratio clip (0.8, 1.2)"
    # Already on-policy (staleness 0) and no ratio was ever clipped: neither stale data nor a
    # wide clip moved the policy, the step size did (docs/results.md has such a run).
    staleness = [v for _, v in _clean(history.get(M.PERF_STALENESS_MEAN))]
    clipped = [v for _, v in _clean(history.get(M.TRAIN_CLIP_FRAC))]
    if staleness and clipped and max(staleness) == 0 and max(clipped) <= _EPS:
        evidence |= {"max_staleness": 0.0, "max_clip_frac": max(clipped)}
        first_change = "lower learning_rate (on-policy, nothing clipped: the step size did it)"
    return Finding(
        "reward_collapse",
        "error",
        tail[-1][0],
        f"{M.REWARD_MEAN} collapsed to {now:.3f} after a peak of {peak:.3f} at step {peak_step}",
        evidence,
        first_change,
        "reward stabilises",
    )


def check_stall(
    history: History,
    *,
    window: int = 20,
    flat_tol: float = 0.02,
    progress_min: float = 0.05,
    ceiling: float = 1.0,
    headroom: float = 0.1,
    recent: int = 3,
) -> Finding | None:
    """Reward stalled with every knob healthy: the model has learned (window mean ≥ first value +
    ``progress_min``), the last ``window`` points are flat, the reward is below ``ceiling −
    headroom``, and truncation ≤ 5 %, failures ≤ 1 %, ``analysis/zero_adv_groups`` < 50 %. What is
    left is capacity."""
    points = _clean(history.get(M.REWARD_MEAN))
    tail = points[-window:]
    if len(points) < window + 1:
        return None
    level = _mean(tail)
    if level < points[0][1] + progress_min or abs(change(tail)) > flat_tol:
        return None
    if level >= ceiling - headroom:
        return None
    limits = {M.TRUNCATED_FRAC: 0.05, M.FAILURE_RATE: 0.01, M.ZERO_ADV_GROUPS: 0.5}
    knobs = {}
    for name, limit in limits.items():
        value = _recent(history, name, recent)
        if value is not None and value[0] > limit + _EPS:
            return None
        knobs[name] = None if value is None else value[0]
    return Finding(
        "reward_stall",
        "info",
        tail[-1][0],
        f"{M.REWARD_MEAN} has stalled at {level:.3f} for {len(tail)} steps with healthy "
        "truncation, failures and group variance",
        {"level": level, "change": change(tail), **knobs},
        "more capacity: double LoRA (lora_rank/lora_alpha 32/64 → 64/128); with full "
        "fine-tuning (lora_rank 0), a larger model",
        "a higher reward ceiling within 50 steps",
    )


def check_tool_use_collapse(
    history: History, *, start: int = 5, recent: int = 5, ratio: float = 0.5
) -> Finding | None:
    """Episodes now make at most ``ratio`` × the tool calls they made at the start (means of the
    first ``start`` and last ``recent`` points of ``rollout/tool_calls/mean``, at least
    ``start + recent`` points, and at least 1 call per episode at the start).

    The policy answers before reading what the procedure needs: a shortcut that pays when an
    answer can be guessed from how answers are distributed (on aircraft_inspection 42 % of test
    cases are all-pass). The reward-hacking check does not see it while val rewards the same
    guess; docs/results.md has runs where it fired."""
    points = _clean(history.get(M.TOOL_CALLS_MEAN))
    if len(points) < start + recent:
        return None
    before = _mean(points[:start])
    now = _mean(points[-recent:])
    if before < 1.0 or now > ratio * before:
        return None
    return Finding(
        "tool_use_collapse",
        "warning",
        points[-1][0],
        f"episodes now make {now:.1f} tool calls (first steps: {before:.1f}): the policy "
        "answers without reading the tools",
        {"tool_calls_start": before, "tool_calls_now": now},
        "lower learning_rate or num_iterations; check how often a guessed (majority) answer "
        "scores under the reward and the strict scorer",
        f"{M.TOOL_CALLS_MEAN} back near the reference's; val TSR on episodes that call the tools",
    )


def check_truncation(history: History, *, limit: float = 0.05, recent: int = 3) -> Finding | None:
    """More than ``limit`` (5 %) of rollouts had a turn cut at ``sampling_max_tokens`` (mean of
    the last ``recent`` points): cut turns lose their answer or tool call."""
    value = _recent(history, M.TRUNCATED_FRAC, recent)
    if value is None or value[0] <= limit + _EPS:
        return None
    return Finding(
        "truncation_high",
        "warning",
        value[1],
        f"{value[0]:.1%} of rollouts hit the per-turn token cap (> {limit:.0%})",
        {"truncated_frac": value[0]},
        "raise sampling_max_tokens",
        M.TRUNCATED_FRAC,
    )


def check_failures(history: History, *, limit: float = 0.01, recent: int = 3) -> Finding | None:
    """More than ``limit`` (1 %) of rollouts failed in the environment (mean of the last
    ``recent`` points): an environment bug, not something retries fix."""
    value = _recent(history, M.FAILURE_RATE, recent)
    if value is None or value[0] <= limit + _EPS:
        return None
    return Finding(
        "failure_rate_high",
        "error",
        value[1],
        f"{value[0]:.1%} of rollouts failed in the environment (> {limit:.0%})",
        {"failure_rate": value[0]},
        "fix the environment (read the failed trajectories): an environment bug, not a retry "
        "problem",
        f"{M.FAILURE_RATE} back under 1 %",
    )


def check_valid_mean_low(
    history: History, *, window: int = 20, margin: float = 0.05, flat_tol: float = 0.02
) -> Finding | None:
    """``rollout/reward/valid_mean`` below ``rollout/reward/mean`` by more than ``margin`` on
    average over the last ``window`` common steps, and the reward flat: the groups that still
    carry gradient are the failing ones while the rest score all-equal, which a binary reward
    makes likely. A denser reward gives those groups variance."""
    valid = dict(_clean(history.get(M.REWARD_VALID_MEAN)))
    reward = _clean(history.get(M.REWARD_MEAN))
    common = [(s, v) for s, v in reward if s in valid][-window:]
    if len(common) < window // 2:
        return None
    gap = sum(valid[s] - v for s, v in common) / len(common)
    if gap >= -margin or abs(change(common)) > flat_tol:
        return None
    return Finding(
        "valid_mean_low",
        "warning",
        common[-1][0],
        f"{M.REWARD_VALID_MEAN} is {-gap:.3f} below {M.REWARD_MEAN} and the reward is flat",
        {"gap": gap, "reward_change": change(common)},
        "binary reward collapses group variance: use a denser reward",
        f"{M.ZERO_ADV_GROUPS} drops",
    )


def check_reward_over_strict(
    history: History, *, limit: float = 0.02, recent: int = 3
) -> Finding | None:
    """More than ``limit`` (2 %) of recent rollouts got a success-level reward while the strict
    scorer gave 0 (mean of the last ``recent`` points of ``rollout/reward/over_strict_frac``):
    the reward is more lenient than the evaluation — a reward hack in progress, visible from the
    first step, before any trend could show it."""
    value = _recent(history, M.REWARD_OVER_STRICT_FRAC, recent)
    if value is None or value[0] <= limit + _EPS:
        return None
    return Finding(
        "reward_hacking_audit",
        "error",
        value[1],
        f"{value[0]:.1%} of rollouts are rewarded as successes that the strict scorer rejects",
        {"over_strict_frac": value[0]},
        "reward hacking: tighten the reward parser (make audit ROLLOUTS=… shows the episodes)",
        "reward audit on new rollouts",
    )


CHECKS: tuple[Callable[[History], Finding | None], ...] = (
    check_reward_flat_from_start,
    check_all_groups_same,
    check_reward_hacking,
    check_reward_over_strict,
    check_reward_collapse,
    check_stall,
    check_tool_use_collapse,
    check_truncation,
    check_failures,
    check_valid_mean_low,
)


def diagnose(history: History) -> list[Finding]:
    """Every finding the default checks make on ``history``, most severe first."""
    order = {"error": 0, "warning": 1, "info": 2}
    found = [f for check in CHECKS if (f := check(history)) is not None]
    return sorted(found, key=lambda f: order[f.severity])
