"""The diagnostics and evaluation views: findings with their first change, base vs tuned tables.

Plain functions over the store's records (no Textual here), so what each view says is testable
without a terminal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from mtrl_local.diagnostics import Finding
from mtrl_local.store_records import DiagnosticRecord, EvaluationRecord
from tui.health import fmt_value

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


# -- diagnostics -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActiveFinding:
    """A finding that holds now, with the step it first fired at (from the stored history)."""

    code: str
    severity: str
    fired_at: int
    step: int
    message: str
    evidence: dict[str, Any]
    first_change: str
    confirm_with: str
    #: ``stored`` (the trainer recorded it at the last step), ``live`` (the dashboard's own
    #: :func:`~mtrl_local.diagnostics.diagnose` on the history), or both.
    source: str


def active_findings(
    live_findings: Sequence[Finding], stored: Sequence[DiagnosticRecord], last_step: int | None
) -> tuple[list[ActiveFinding], list[DiagnosticRecord]]:
    """``(active, earlier)``: the findings that hold now, and stored ones that no longer do.

    Active = ``live_findings`` (the dashboard's own ``diagnose(history)``, so a run whose
    trainer records no findings still gets them) plus whatever the trainer stored at the last
    step. "Fired at" is the first step the trainer stored that code, or the live finding's step.
    """
    by_code: dict[str, list[DiagnosticRecord]] = {}
    for d in stored:
        by_code.setdefault(d.code, []).append(d)
    live: dict[str, Finding] = {f.code: f for f in live_findings}
    active: list[ActiveFinding] = []
    codes = list(live) + [
        c for c, ds in by_code.items() if c not in live and ds[-1].step == last_step
    ]
    for code in codes:
        records = by_code.get(code, [])
        last = records[-1] if records and records[-1].step == last_step else None
        f = live.get(code)
        sources = [s for s, ok in (("stored", last is not None), ("live", f is not None)) if ok]
        if last is not None:
            active.append(
                ActiveFinding(
                    code,
                    last.severity,
                    records[0].step,
                    last.step,
                    last.message,
                    last.evidence,
                    last.first_change or "",
                    last.confirm_with or "",
                    " + ".join(sources),
                )
            )
        elif f is not None:
            fired = records[0].step if records else f.step
            active.append(
                ActiveFinding(
                    code,
                    f.severity,
                    fired,
                    f.step,
                    f.message,
                    f.evidence,
                    f.first_change,
                    f.confirm_with,
                    "live",
                )
            )
    order = {"error": 0, "warning": 1, "info": 2}
    active.sort(key=lambda a: (order.get(a.severity, 3), a.fired_at))
    codes_active = {a.code for a in active}
    earlier = [ds[-1] for c, ds in by_code.items() if c not in codes_active]
    return active, earlier


def fmt_evidence(evidence: Mapping[str, Any]) -> str:
    """``truncated_frac=0.083 · steps=20``: numbers short enough to read at a glance."""
    parts = []
    for k, v in evidence.items():
        if isinstance(v, float):
            v = f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        parts.append(f"{k}={v}")
    return " · ".join(parts)


def diagnostics_view(
    active: Sequence[ActiveFinding],
    earlier: Sequence[DiagnosticRecord],
    stored_count: dict[str, int] | None = None,
) -> RenderableType:
    """The diagnostics tab: each active finding as a block, then the ones that stopped firing."""
    if not active and not earlier:
        return Text("No findings: every diagnostic check is quiet.", style="green")
    blocks: list[RenderableType] = []
    if active:
        blocks.append(Text(f"Active findings ({len(active)})", style="bold"))
    for a in active:
        style = SEVERITY_STYLE.get(a.severity, "")
        head = Text.assemble(
            (f"{a.severity.upper():7} ", style),
            (a.code, "bold"),
            (f"  fired at step {a.fired_at}", ""),
            (f" · still at {a.step}" if a.step != a.fired_at else "", "dim"),
            (f"  [{a.source}]", "dim"),
        )
        body = Table.grid(padding=(0, 1))
        body.add_column(style="dim", no_wrap=True, width=12)
        body.add_column(ratio=1)
        body.add_row("what", a.message)
        body.add_row("evidence", fmt_evidence(a.evidence) or "—")
        body.add_row("first change", Text(a.first_change or "—", style="bold"))
        body.add_row("confirm with", a.confirm_with or "—")
        blocks += [head, body, Text("")]
    if earlier:
        blocks.append(Text("No longer firing (stored by the trainer)", style="bold dim"))
        for d in earlier:
            blocks.append(
                Text.assemble(
                    (f"  {d.code}", "dim bold"),
                    (f" last at step {d.step}: {d.message}", "dim"),
                )
            )
    return Group(*blocks)


def finding_lines(active: Sequence[ActiveFinding], limit: int = 6) -> RenderableType:
    """A short list for the health tab's side panel: severity, code, first change."""
    if not active:
        return Text("No active findings.", style="green")
    lines: list[RenderableType] = [Text("Active findings", style="bold")]
    for a in active[:limit]:
        lines.append(
            Text.assemble(
                ("● ", SEVERITY_STYLE.get(a.severity, "")),
                (a.code, "bold"),
                (f" (step {a.fired_at})", "dim"),
            )
        )
        lines.append(Text(f"  → {a.first_change}", style="dim"))
    if len(active) > limit:
        lines.append(Text(f"… {len(active) - limit} more (tab 3)", style="dim"))
    return Group(*lines)


# -- evaluation ------------------------------------------------------------------------------------
#: Rows of the evaluation table: (label, ``summarize()`` key, kind). ``{n}`` is samples per case.
EVAL_ROWS: tuple[tuple[str, str, str], ...] = (
    ("TSR (strict)", "tsr", "frac"),
    ("pass@1 (strict)", "pass_at_1", "frac"),
    ("pass@{n} (strict)", "pass_at_{n}", "frac"),
    ("reward pass@1", "reward_pass_at_1", "frac"),
    ("reward mean", "reward_mean", "float"),
    ("completion", "completion_rate", "frac"),
    ("field accuracy", "field_acc", "frac"),
    ("turns mean", "turns_mean", "float"),
    ("truncated", "truncated_frac", "frac"),
    ("env failures", "failure_rate", "frac"),
    ("reward ≠ strict", "reward_strict_disagree_frac", "frac"),
    ("cases × samples", "n_trajectories", "int"),
)
_LABEL_ORDER = {"base": 0, "reference": 1, "model": 2, "tuned": 3}


def _summaries(record: EvaluationRecord) -> list[tuple[str, dict[str, Any]]]:
    """``[(label, summary)]`` of one stored report.

    A report is either one model's ``evaluate.summarize()`` dict, labelled by the store row (what
    the trainer stores), or a whole ``EvalReport.to_json()`` whose ``results`` each carry a label
    and a summary.
    """
    results = record.report.get("results")
    if not isinstance(results, list):
        return [(record.label or "model", record.report)]
    return [
        (str(res.get("label") or record.label), res["summary"])
        for res in results
        if isinstance(res, dict) and isinstance(res.get("summary"), dict)
    ]


def evaluation_columns(records: Sequence[EvaluationRecord]) -> list[tuple[str, dict[str, Any]]]:
    """The columns of one split's table: each model's latest evaluation, base first, tuned last.

    The base model is evaluated once before training (step 0) and the tuned one at the end, so
    "the latest evaluation" is the latest report *per label*, each column named with its step.
    With a single label (the trainer's periodic ``val`` evaluations) the first evaluation is put
    beside the latest, so the table still says what training changed.
    """
    latest: dict[str, tuple[int, dict[str, Any]]] = {}
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r.step):
        for label, summary in _summaries(r):
            latest[label] = (r.step, summary)
            first.setdefault(label, (r.step, summary))
    labels = sorted(latest, key=lambda label: (_LABEL_ORDER.get(label, 2), label))
    columns = [(f"{label}\n@{latest[label][0]}", latest[label][1]) for label in labels]
    if len(labels) == 1 and first[labels[0]][0] != latest[labels[0]][0]:
        step, summary = first[labels[0]]
        columns.insert(0, (f"{labels[0]}\n@{step}", summary))
    return columns


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def evaluation_table(columns: Sequence[tuple[str, Mapping[str, Any]]], title: str) -> Table:
    """Metrics down, models across, and ``Δ`` (last − first) when there are two or more."""
    table = Table(title=title, title_justify="left", expand=False, header_style="bold")
    table.add_column("metric", no_wrap=True, overflow="ellipsis", max_width=30)
    for label, _ in columns:
        table.add_column(label, justify="right", no_wrap=True)
    delta = len(columns) >= 2
    if delta:
        table.add_column("Δ\nlast−first", justify="right", no_wrap=True)
    ns = sorted({int(s.get("n_samples", 1) or 1) for _, s in columns})

    def add(label: str, values: list[float | None], kind: str, style: str = "") -> None:
        cells: list[RenderableType] = [Text(label, style=style)]
        cells += [fmt_value(v, kind) for v in values]
        if delta:
            a, b = values[0], values[-1]
            if a is None or b is None or kind == "int":
                cells.append("—")
            else:
                d = b - a
                cells.append(Text(f"{d:+.3f}", style="green" if d > 0 else "red" if d < 0 else ""))
        table.add_row(*cells)

    fields: list[str] = []
    for _, s in columns:
        by_field = s.get("field_acc_by_field") or {}
        fields += [f for f in by_field if f not in fields]
    for label, key, kind in EVAL_ROWS:
        if "{n}" in key:
            for n in ns:
                if n > 1:
                    add(label.format(n=n), [_num(s.get(key.format(n=n))) for _, s in columns], kind)
            continue
        add(label, [_num(s.get(key)) for _, s in columns], kind)
        if key == "field_acc":
            for name in fields:
                values = [_num((s.get("field_acc_by_field") or {}).get(name)) for _, s in columns]
                add(f"  {name}", values, "frac", "dim")
    return table


def evaluation_view(records: Sequence[EvaluationRecord], task: str = "") -> RenderableType:
    """One table per split (test first: the base-vs-tuned one), each model's latest report."""
    if not records:
        return Text(
            "No evaluation stored yet. The trainer stores the base model's before training and "
            "the tuned model's at the end (RunStore.add_evaluation(step, split, label, report)).",
            style="dim",
        )
    splits = sorted({r.split for r in records}, key=lambda s: (s != "test", s != "val", s))
    parts: list[RenderableType] = []
    for split in splits:
        in_split = [r for r in records if r.split == split]
        steps = sorted({r.step for r in in_split})
        title = f"{split} split" + (f" · {task}" if task else "")
        title += f" · evaluated at steps {', '.join(map(str, steps[-6:]))}"
        parts += [evaluation_table(evaluation_columns(in_split), title), Text("")]
    return Group(*parts)
