"""The curves view: which series go on which plot, drawn with plotext (real axes, not sparklines).

``CURVES`` is the whole specification; :func:`draw` puts one of them on a plotext figure. Series
are read by metric name from the history, NaN and missing points skipped (a val metric is logged
every few steps only: its points are joined across the gaps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mtrl_local import metrics as M
from tui.health import finite


@dataclass(frozen=True)
class Curve:
    """One plot: its id (``#plot-<id>``), title, ``(label, metric, colour)`` lines, y range."""

    id: str
    title: str
    lines: tuple[tuple[str, str, str], ...]
    #: Fixed y range for shares (0–1); ``None`` lets plotext fit the data.
    ylim: tuple[float, float] | None = None
    #: A limit drawn as a red horizontal line (the 5 % truncation rule of docs/design.md,
    #: "Diagnostics").
    limit: float | None = None


CURVES: tuple[Curve, ...] = (
    Curve(
        "reward",
        "reward: train vs val",
        (
            ("train mean", M.REWARD_MEAN, "cyan"),
            ("train valid_mean", M.REWARD_VALID_MEAN, "blue"),
            ("val mean", M.VAL_REWARD_MEAN, "magenta"),
        ),
    ),
    Curve(
        "zero",
        "zero reward · zero-adv",
        (
            ("zero_frac", M.REWARD_ZERO_FRAC, "orange"),
            ("zero_adv_groups", M.ZERO_ADV_GROUPS, "red"),
        ),
        ylim=(0.0, 1.0),
    ),
    Curve(
        "trunc",
        "truncated · failures",
        (("truncated", M.TRUNCATED_FRAC, "yellow"), ("failures", M.FAILURE_RATE, "red")),
        limit=0.05,
    ),
    Curve(
        "completion",
        "completion · val pass@1",
        (
            ("completion", M.COMPLETION_RATE, "green"),
            ("val pass@1", M.VAL_REWARD_PASS_K_1, "magenta"),
        ),
        ylim=(0.0, 1.0),
    ),
)


def draw(plt: Any, curve: Curve, history: Mapping[str, Sequence[tuple[int, float]]]) -> int:
    """Draw ``curve`` on the plotext figure ``plt`` (cleared first); returns the lines drawn."""
    plt.clear_figure()
    drawn, top = 0, 0.0
    for label, metric, color in curve.lines:
        points = finite(history.get(metric))
        if not points:
            continue
        xs = [s for s, _ in points]
        ys = [v for _, v in points]
        top = max(top, *ys)
        plt.plot(xs, ys, label=label, color=color, marker="braille")
        drawn += 1
    if curve.limit is not None and drawn:
        plt.hline(curve.limit, "red")
        plt.ylim(0.0, max(curve.limit * 2, top * 1.1))
    elif curve.ylim is not None:
        plt.ylim(*curve.ylim)
    plt.title(curve.title if drawn else f"{curve.title} (no data yet)")
    plt.xlabel("step")
    return drawn
