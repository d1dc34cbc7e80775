"""Evaluation reports as rich tables (what ``mtrl eval``, ``baseline`` and ``train`` print)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from mtrl_local.evaluate import EvalReport

#: Rows of :func:`format_table`: (row label, summary key, format). ``{n}`` is the sample count.
TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("cases", "n_cases", "int"),
    ("samples per case", "n_samples", "int"),
    ("TSR (strict)", "tsr", "frac"),
    ("pass@1 (strict)", "pass_at_1", "frac"),
    ("pass@{n} (strict)", "pass_at_{n}", "frac"),
    ("reward pass@1", "reward_pass_at_1", "frac"),
    ("reward pass@{n}", "reward_pass_at_{n}", "frac"),
    ("reward mean", "reward_mean", "float"),
    ("completion rate", "completion_rate", "frac"),
    ("field accuracy", "field_acc", "frac"),
    ("turns mean", "turns_mean", "float"),
    ("hit max_turns", "max_turns_frac", "frac"),
    ("tool calls mean", "tool_calls_mean", "float"),
    ("tool-error share", "tool_errors_frac", "frac"),
    ("truncated share", "truncated_frac", "frac"),
    ("env failure share", "failure_rate", "frac"),
    ("1st turn well-formed call", "first_turn_tool_call_frac", "frac"),
    ("reward ≠ strict", "reward_strict_disagree_frac", "frac"),
)


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "int":
        return str(int(value))
    return f"{float(value):.3f}"


def format_table(reports: EvalReport | Sequence[EvalReport], title: str | None = None) -> Table:
    """A rich Table: one row per metric, one column per evaluated model (base before tuned).

    With exactly two columns a ``Δ`` column (second − first) is added. Per-field accuracies
    follow the field-accuracy row. The caller prints it; the library never does.
    """
    reports = [reports] if isinstance(reports, EvalReport) else list(reports)
    columns = [(rep, res) for rep in reports for res in rep.results]
    if not columns:
        raise ValueError("format_table: no results")
    first = reports[0]
    table = Table(title=title or f"evaluation: {first.task} ({first.split} split)")
    table.add_column("metric", no_wrap=True)
    for _, res in columns:
        table.add_column(res.label, justify="right")
    delta = len(columns) == 2
    if delta:
        table.add_column("Δ", justify="right")

    def add(label: str, values: list[Any], kind: str) -> None:
        cells = [_fmt(v, kind) for v in values]
        if delta:
            a, b = values
            cells.append("—" if a is None or b is None or kind == "int" else f"{b - a:+.3f}")
        table.add_row(label, *cells)

    fields: list[str] = []
    for _, res in columns:
        fields += [f for f in res.summary.get("field_acc_by_field", {}) if f not in fields]
    ns = [res.summary["n_samples"] for _, res in columns]
    for row_label, key, kind in TABLE_ROWS:
        if "{n}" in key and all(n == 1 for n in ns):
            continue  # pass@n is pass@1
        values = [res.summary.get(key.format(n=n)) for (_, res), n in zip(columns, ns, strict=True)]
        add(row_label.format(n="n" if len(set(ns)) > 1 else ns[0]), values, kind)
        if key == "tsr":  # per outcome (the task's decision field), most common first
            by_outcome = [res.summary.get("tsr_by_outcome") or {} for _, res in columns]
            outcome = next((r.summary.get("outcome_field") for _, r in columns), None)
            for value in dict.fromkeys(v for b in by_outcome for v in b):
                n = max(b.get(value, {}).get("trajectories", 0) for b in by_outcome)
                label = f"  where {outcome or 'outcome'} = {value} ({n})"
                add(label, [b.get(value, {}).get("tsr") for b in by_outcome], "frac")
        if key == "field_acc":  # the per-field breakdown right under the aggregate
            for name in fields:
                by_field = [res.summary.get("field_acc_by_field", {}) for _, res in columns]
                add(f"  {name}", [f.get(name) for f in by_field], "frac")
    return table
