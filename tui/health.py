"""The health panel: each watched metric's latest value, trend and judgement (no Textual here).

Plain functions, so the panel's content is testable without a terminal and the app only places
widgets. Colours are judgements: every threshold a row is coloured against is written in its judge
below (and listed in ``HEALTH``), with the rule of docs/design.md ("Metrics", "Diagnostics") it
comes from; trends use the same fitted "change" as :mod:`mtrl_local.diagnostics`, so an arrow here
and a finding there agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from mtrl_local import metrics as M
from mtrl_local.diagnostics import change
from tui.data import Snapshot

Series = Sequence[tuple[int, float]]
History = Mapping[str, Series]
Status = Literal["ok", "warn", "bad", "none"]

#: Rich style of each status (green healthy, yellow look at it, red act on it, dim no data).
STATUS_STYLE: dict[Status, str] = {
    "ok": "green",
    "warn": "yellow",
    "bad": "bold red",
    "none": "dim",
}
#: Points a trend is fitted over (the diagnostics' default window).
WINDOW = 20
_SPARK = "▁▂▃▄▅▆▇█"


# -- series helpers --------------------------------------------------------------------------------
def finite(series: Series | None) -> list[tuple[int, float]]:
    """The points with a finite value (NaN is stored for a NaN loss; plots and fits skip it)."""
    return [(s, v) for s, v in series or () if v is not None and math.isfinite(v)]


def recent_mean(points: Series, n: int = 3) -> float | None:
    """Mean of the last ``n`` points: a rate is judged on a few steps, not one noisy one (the
    diagnostics' "recent value"), so the judgement says "3-step mean"."""
    tail = [v for _, v in points[-n:]]
    return sum(tail) / len(tail) if tail else None


def sparkline(points: Series, width: int = 16) -> str:
    """The last ``width`` values as block characters, scaled between their min and max."""
    values = [v for _, v in points[-width:]]
    shown = [v for v in values if v is not None and math.isfinite(v)]
    if not shown:
        return "·" * len(values)
    lo, hi = min(shown), max(shown)

    def block(v: float) -> str:  # a NaN or infinite point is a gap, not a crash
        if v is None or not math.isfinite(v):
            return "·"
        return (
            _SPARK[3]
            if hi - lo < 1e-12
            else _SPARK[round((v - lo) / (hi - lo) * (len(_SPARK) - 1))]
        )

    return "".join(block(v) for v in values)


def fmt_value(value: float | None, kind: str = "float") -> str:
    """``kind``: ``frac`` (a percentage), ``int``, ``float`` (3 decimals), ``rate`` (k/s)."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if kind == "frac":
        return f"{value:.1%}"
    if kind == "int":
        return str(round(value))
    if kind == "rate":
        return f"{value / 1000:.1f}k" if abs(value) >= 1000 else f"{value:.0f}"
    return f"{value:.3f}"


def ago(seconds: float) -> str:
    """``4s``, ``3m``, ``2h``: the age of the store's last write."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


# -- the health panel ------------------------------------------------------------------------------
Judge = Callable[[list[tuple[int, float]], History, Mapping[str, Any]], tuple[Status, str]]


def _judge_reward(points: list[tuple[int, float]], history: History, cfg: Mapping[str, Any]):
    if len(points) >= 4:
        peak_i = max(range(len(points)), key=lambda i: points[i][1])
        peak = points[peak_i][1]
        now = recent_mean(points) or 0.0
        if peak >= 0.1 and len(points) - 1 - peak_i >= 3 and now <= 0.2 * peak:
            return "bad", f"collapsed from {peak:.2f}: max_steps_off_policy=0 / PPO"
    tail = points[-WINDOW:]
    c = change(tail)
    if len(tail) >= WINDOW // 2 and abs(c) <= 0.02:
        return "warn", "flat over the window"
    if c <= -0.1:
        return "warn", "falling"
    return "ok", "rising" if c > 0.02 else ""


def _judge_valid_mean(points: list[tuple[int, float]], history: History, cfg: Mapping[str, Any]):
    valid = dict(points)
    reward = [(s, v) for s, v in finite(history.get(M.REWARD_MEAN)) if s in valid][-WINDOW:]
    if not reward:
        return "ok", ""
    gap = sum(valid[s] - v for s, v in reward) / len(reward)
    if gap < -0.05:
        return "warn", f"{-gap:.2f} below reward/mean: denser reward"
    return "ok", ""


def _at_most(limit: float, level: Status, why: str) -> Judge:
    def judge(points: list[tuple[int, float]], history: History, cfg: Mapping[str, Any]):
        value = recent_mean(points)
        if value is not None and value > limit + 1e-9:
            return level, f"3-step mean {value:.1%} > {limit:.0%}: {why}"
        return "ok", f"3-step mean ≤ {limit:.0%}"

    return judge


def _judge_zero_frac(points: list[tuple[int, float]], history: History, cfg: Mapping[str, Any]):
    value = recent_mean(points) or 0.0
    if value >= 0.9:
        return "bad", f"3-step mean {value:.0%} ≥ 90 %: nothing to learn from"
    if value >= 0.5:
        return "warn", f"3-step mean {value:.0%} ≥ 50 % score exactly 0"
    return "ok", "3-step mean < 50 %"


def _judge_zero_adv(points: list[tuple[int, float]], history: History, cfg: Mapping[str, Any]):
    tail = points[-WINDOW:]
    mean, c, last = sum(v for _, v in tail) / len(tail), change(tail), tail[-1][1]
    if mean >= 0.75:
        return "bad", "≥ 75 % of groups carry no gradient: group_size 8 → 4"
    if c >= 0.10 and last >= 0.5:
        return "warn", f"rising ({c:+.2f}): group_size 8 → 4"
    if last >= 0.5:
        return "warn", "≥ 50 % of groups carry no gradient"
    if c >= 0.10:
        return "warn", f"rising ({c:+.2f})"
    return "ok", ""


def _judge_completion(points: list[tuple[int, float]], history: History, cfg: Mapping[str, Any]):
    value = recent_mean(points) or 0.0
    if value < 0.5:
        return "bad", f"3-step mean {value:.0%} < 50 %: turn budget or format"
    if value < 0.8:
        return "warn", f"3-step mean {value:.0%} < 80 %"
    return "ok", f"3-step mean {value:.0%} ≥ 80 %"


def _judge_turns(points: list[tuple[int, float]], history: History, cfg: Mapping[str, Any]):
    hit = recent_mean(finite(history.get(M.TURNS_MAX_TURNS_FRAC)))
    if hit is not None and hit > 0.05:
        return "warn", f"{hit:.0%} hit max_turns"
    max_turns = cfg.get("max_turns")
    value = recent_mean(points) or 0.0
    if isinstance(max_turns, int) and max_turns > 0 and value >= 0.9 * max_turns:
        return "warn", f"near max_turns {max_turns}"
    return "ok", f"max_turns {max_turns}" if isinstance(max_turns, int) else ""


def _judge_val_reward(points: list[tuple[int, float]], history: History, cfg: Mapping[str, Any]):
    train = finite(history.get(M.REWARD_MEAN))[-WINDOW:]
    if len(train) >= WINDOW // 2 and len(points) >= 2:
        start = train[0][0]
        val = [p for p in points if p[0] <= start][-1:] + [p for p in points if p[0] > start]
        if len(val) >= 2 and change(train) >= 0.10 and change(val) <= 0.02:
            return "bad", "train rises, val flat: reward hacking?"
    return "ok", ""


def _judge_pass1(points: list[tuple[int, float]], history: History, cfg: Mapping[str, Any]):
    if points[-1][1] == 0.0:
        return "warn", "0: nothing succeeds on val"
    return "ok", ""


@dataclass(frozen=True)
class HealthMetric:
    name: str
    label: str
    kind: str
    judge: Judge


#: The rows of the health panel, in the order a person reads a run (docs/design.md, "Metrics" and
#: "Diagnostics").
HEALTH: tuple[HealthMetric, ...] = (
    HealthMetric(M.REWARD_MEAN, "reward (train)", "float", _judge_reward),
    HealthMetric(M.REWARD_VALID_MEAN, "reward valid_mean", "float", _judge_valid_mean),
    HealthMetric(M.VAL_REWARD_MEAN, "reward (val)", "float", _judge_val_reward),
    HealthMetric(M.VAL_REWARD_PASS_K_1, "val pass@1", "frac", _judge_pass1),
    HealthMetric(M.REWARD_ZERO_FRAC, "zero-reward share", "frac", _judge_zero_frac),
    HealthMetric(M.ZERO_ADV_GROUPS, "zero-adv groups", "frac", _judge_zero_adv),
    HealthMetric(
        M.TRUNCATED_FRAC,
        "truncated",
        "frac",
        _at_most(0.05, "warn", "raise sampling_max_tokens"),
    ),
    HealthMetric(M.COMPLETION_RATE, "completion", "frac", _judge_completion),
    HealthMetric(M.FAILURE_RATE, "env failures", "frac", _at_most(0.01, "bad", "environment bug")),
    HealthMetric(M.TURNS_MEAN, "turns / episode", "float", _judge_turns),
)


@dataclass(frozen=True)
class HealthRow:
    metric: str
    label: str
    value: float | None
    #: Fitted change over the last :data:`WINDOW` points (``None``: fewer than 2).
    change: float | None
    spark: str
    status: Status
    note: str
    kind: str


def health_rows(history: History, config: Mapping[str, Any] | None = None) -> list[HealthRow]:
    """One row per :data:`HEALTH` metric: latest value, trend, and its judgement."""
    rows = []
    for h in HEALTH:
        raw = list(history.get(h.name) or ())
        points = finite(raw)
        if not points:
            value = raw[-1][1] if raw else None  # a NaN is shown as NaN, not as "no data"
            rows.append(HealthRow(h.name, h.label, value, None, "", "none", "no data", h.kind))
            continue
        status, note = h.judge(points, history, config or {})
        tail = points[-WINDOW:]
        rows.append(
            HealthRow(
                h.name,
                h.label,
                raw[-1][1],
                change(tail) if len(tail) >= 2 else None,
                sparkline(points),
                status,
                note,
                h.kind,
            )
        )
    return rows


def health_table(rows: Sequence[HealthRow], wide: bool = True) -> Table:
    """The health panel as a rich Table (the metric name column only when there is room)."""
    table = Table(box=None, pad_edge=False, expand=True, header_style="bold")
    table.add_column("", width=1, no_wrap=True)
    table.add_column("metric", no_wrap=True)
    if wide:
        table.add_column("name", style="dim", no_wrap=True)
    table.add_column("latest", justify="right", no_wrap=True)
    table.add_column("trend", no_wrap=True)
    table.add_column("Δ20", justify="right", no_wrap=True)
    table.add_column("judgement", overflow="ellipsis", no_wrap=True, ratio=1)
    for r in rows:
        style = STATUS_STYLE[r.status]
        dot = {"ok": "●", "warn": "▲", "bad": "✖", "none": "·"}[r.status]
        delta = "" if r.change is None else f"{r.change:+.2f}"
        cells: list[RenderableType] = [Text(dot, style=style), Text(r.label, style=style)]
        if wide:
            cells.append(r.metric)
        cells += [
            Text(fmt_value(r.value, r.kind), style=style),
            Text(r.spark, style="cyan"),
            delta,
            Text(r.note, style=style if r.status != "ok" else "dim"),
        ]
        table.add_row(*cells)
    return table


def _seconds(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.1f}s" if value < 10 else f"{value:.0f}s"


def vitals(snapshot: Snapshot) -> Text:
    """The run's pulse: step, policy version, staleness, speed (status is on the top line)."""
    run, latest = snapshot.run, snapshot.latest
    max_steps = run.config.get("max_steps")
    step = "—" if snapshot.last_step is None else str(snapshot.last_step)
    if isinstance(max_steps, int) and snapshot.last_step is not None:
        step += f"/{max_steps}"
    off_policy = (run.config.get("async_config") or {}).get("max_steps_off_policy")
    staleness = fmt_value(latest.get(M.PERF_STALENESS_MEAN))
    if off_policy is not None:
        staleness += f" (max {off_policy})"
    status_style = {"running": "green", "finished": "cyan", "failed": "bold red"}.get(
        run.status, "yellow"
    )
    pv = "—" if snapshot.policy_version is None else str(snapshot.policy_version)
    parts: list[tuple[str, str]] = [
        ("step ", "dim"),
        (step, "bold"),
        ("  policy v", "dim"),
        (pv, "bold"),
        ("  staleness ", "dim"),
        (staleness, "bold"),
        ("  step ", "dim"),
        (_seconds(latest.get(M.PERF_STEP_S)), "bold"),
        ("  tok/s ", "dim"),
        (fmt_value(latest.get(M.PERF_ROLLOUT_TOKENS_PER_S), "rate"), "bold"),
        (" gen · ", "dim"),
        (fmt_value(latest.get(M.PERF_TRAIN_TOKENS_PER_S), "rate"), "bold"),
        (" train", "dim"),
    ]
    text = Text.assemble(*parts)
    if run.message:
        text.append(f"\n{run.message}", style=status_style)
    return text
