"""The trajectory browser's content: listing rows, the text filter, and one trajectory turn by turn.

Plain functions over :class:`~mtrl_local.store_records.TrajectoryRecord` (no Textual here). The
final answer is read with the strict scorer's own parser and field comparison
(``mtrl_local.env.actions.parse_answer``, ``mtrl_local.scoring.field_matches``), so a ✓ here
means exactly what the evaluation credits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from mtrl_local.env.actions import TOOL_CALL_RE, parse_answer, parse_tool_calls
from mtrl_local.scoring import field_matches, normalize
from mtrl_local.store_records import TrajectoryRecord
from rewards.examples import lenient_parse

#: The store's filters, in the order ``f`` cycles through them (``None`` = all).
FILTERS: tuple[str | None, ...] = (None, "failures", "truncated", "zero_reward", "disagree")
FILTER_LABELS = {
    None: "all",
    "failures": "failures",
    "truncated": "truncated",
    "zero_reward": "zero reward",
    "disagree": "reward ≠ strict",
}
#: Longest tool result shown in full; longer ones are cut with a note.
MAX_TOOL_CHARS = 800
COLUMNS = ("id", "step", "run", "case", "g:s", "reward", "strict", "turns", "end", "flags")


def disagrees(t: TrajectoryRecord, threshold: float = 1.0) -> bool:
    """Reward and strict score disagree (the store's ``disagree`` filter, row by row)."""
    if t.reward is None or t.strict is None:
        return False
    return (t.reward >= threshold and t.strict == 0) or (t.reward < threshold and t.strict >= 1)


def flags(t: TrajectoryRecord) -> str:
    """One letter per condition worth a look: Failed, Truncated, ≠ reward/strict, 0 reward."""
    out = ""
    if t.failed or t.done_reason == "error":
        out += "F"
    if t.truncated:
        out += "T"
    if disagrees(t):
        out += "≠"
    if t.reward == 0:
        out += "0"
    return out


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def short_case(case_id: str, task: str = "") -> str:
    """``aircraft_inspection-089`` → ``089`` when the run's task prefixes every case id."""
    prefix = f"{task}-"
    return case_id[len(prefix) :] if task and case_id.startswith(prefix) else case_id


def list_row(t: TrajectoryRecord, task: str = "") -> tuple[str, ...]:
    """The listing's cells for one trajectory (see :data:`COLUMNS`)."""
    who = t.label or "train"
    if t.split and t.split not in ("train", who):
        who += f"/{t.split}"
    return (
        str(t.id),
        str(t.step),
        who,
        short_case(t.case_id, task),
        f"{short_case(t.group_id, task)}:{t.sample_index}",
        _num(t.reward),
        _num(t.strict),
        str(t.n_turns),
        t.done_reason or "—",
        flags(t),
    )


def text_match(t: TrajectoryRecord, query: str) -> bool:
    """Every word of ``query`` appears in the row's case, group, end reason, run or flags."""
    hay = " ".join((*list_row(t), t.case_id)).lower()
    return all(word in hay for word in query.lower().split())


def parse_filter_query(query: str) -> tuple[str | None, str, bool]:
    """``/`` input → ``(store filter, remaining text, filter named)``.

    A word that starts a store filter's name (``dis``, ``trunc``, ``fail``, ``zero``; ``all``
    clears it) selects that filter; the other words filter the rows by text.
    """
    chosen: str | None = None
    named = False
    rest = []
    for word in query.split():
        w = word.lower()
        hit = [f for f in FILTERS if f is not None and f.startswith(w)] if len(w) >= 3 else []
        if w in ("all", "*"):
            chosen, named = None, True
        elif len(hit) == 1:
            chosen, named = hit[0], True
        elif w in ("≠", "disagree"):
            chosen, named = "disagree", True
        else:
            rest.append(word)
    return chosen, " ".join(rest), named


# -- one trajectory --------------------------------------------------------------------------------
def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f" … (+{len(text) - limit} chars)"


#: Control characters other than newline and tab: shown escaped, so model or tool text can
#: neither move the cursor, clear the screen nor retitle the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe to draw: control characters escaped (``\\x1b``), lone surrogates replaced.

    Rich ``Text`` never reads markup, so ``[bold]`` in model output is already shown as typed;
    what is left to neutralise is what a terminal would act on, and what cannot be encoded.
    """
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text.encode("utf-8", "replace").decode("utf-8")


def _model_text(content: str) -> str:
    """The model's prose with the closed tool-call blocks taken out (they are shown parsed)."""
    return TOOL_CALL_RE.sub(lambda m: "" if m.group(1) is not None else m.group(0), content).strip()


def _turn_header(t: TrajectoryRecord, k: int) -> Text:
    reason = t.finish_reasons[k] if k < len(t.finish_reasons) else "?"
    tokens = t.turn_tokens[k] if k < len(t.turn_tokens) else None
    head = Text.assemble(("── turn ", "bold"), (str(k + 1), "bold"), (" ", ""))
    head.append(f"finish={reason}", style="red" if reason in ("length", "error") else "dim")
    if tokens is not None:
        head.append(f" · {tokens} tok", style="dim")
    if t.per_turn_rewards is not None and k < len(t.per_turn_rewards):
        head.append(f" · reward {t.per_turn_rewards[k]:+.3f}", style="cyan")
    return head


#: The lenient reader backtracks over unclosed tags and braces; the dashboard lets it read the
#: final turn's last characters only, so no model output can stall the display.
LENIENT_TAIL_CHARS = 4_000


def answer_table(
    messages: Sequence[dict[str, Any]], ground_truth: dict[str, Any]
) -> RenderableType:
    """The final answer, each ground-truth field marked ✓/✗ by the strict scorer's comparison.

    With no ``<final_response>`` block the strict scorer reads nothing (every field ✗); if the
    model wrote its answer some other way (another tag, bare JSON) it is shown too, labelled as
    not read: that is the usual story behind "reward high, strict 0".
    """
    answer = parse_answer(messages)
    parts: list[RenderableType] = []
    shown = answer
    if answer is None:
        parts.append(
            Text("no <final_response> block: the strict scorer reads no answer", style="bold red")
        )
        shown = lenient_parse(messages, tail_chars=LENIENT_TAIL_CHARS)  # display only
        if shown is not None:
            parts.append(
                Text("an answer written another way (not read by the strict scorer):", style="dim")
            )
    matches = field_matches(answer, ground_truth)
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("", no_wrap=True)
    table.add_column("field", no_wrap=True)
    table.add_column("answer", overflow="fold")
    table.add_column("expected", overflow="fold")
    table.add_column("", style="dim")
    for key, expected in ground_truth.items():
        ok = matches.get(key, False)
        value = "—" if shown is None or key not in shown else printable(normalize(shown[key]))
        mark = Text("✓", style="bold green") if ok else Text("✗", style="bold red")
        unread = not ok and answer is None and value == normalize(expected)
        style = "green" if ok else "yellow" if unread else "red"
        note = "right value, not read" if unread else ""
        table.add_row(mark, key, Text(value, style=style), normalize(expected), note)
    extra = {k: v for k, v in (shown or {}).items() if k not in ground_truth}
    for key, value in extra.items():
        table.add_row(
            Text("?", style="yellow"),
            printable(key),
            printable(normalize(value)),
            "",
            "not a field",
        )
    n_ok = sum(matches.values())
    all_ok = bool(matches) and all(matches.values())
    parts.append(
        Text.assemble(
            ("final answer ", "bold"),
            (f"{n_ok}/{len(ground_truth)} fields right", "green" if all_ok else "red"),
        )
    )
    parts.append(table)
    return Group(*parts)


def trajectory_view(t: TrajectoryRecord) -> RenderableType:
    """The whole episode: header, each model turn (text, tool calls, results), final answer."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="dim", no_wrap=True)
    head.add_column()
    head.add_row(
        "trajectory",
        Text.assemble(
            (f"#{t.id} ", "bold"),
            (t.case_id, "bold"),
            f"  step {t.step} · {t.label or 'train'}/{t.split} · group {t.group_id}:"
            f"{t.sample_index} · policy v{t.policy_version} · seed {t.seed}",
        ),
    )
    score = Text.assemble(
        ("reward ", "dim"),
        (_num(t.reward), "bold cyan"),
        ("  strict ", "dim"),
        (_num(t.strict), "bold green" if t.strict else "bold red"),
    )
    if disagrees(t):
        score.append("  ≠ reward and strict disagree", style="bold yellow")
    head.add_row("score", score)
    end = f"{t.done_reason or '—'} · {t.n_turns} turns · {t.tool_calls} tool calls"
    end += f" · {t.tool_errors} errors" if t.tool_errors else ""
    end += " · FAILED (environment)" if t.failed else ""
    end += " · TRUNCATED" if t.truncated else ""
    head.add_row("end", end)
    if t.metrics:
        head.add_row("metrics", " · ".join(f"{k}={v:.3g}" for k, v in t.metrics.items()))
    counters = {k: v for k, v in (t.counters or {}).items() if v}
    if counters:
        head.add_row("counters", " · ".join(f"{k}={v}" for k, v in counters.items()))
    parts: list[RenderableType] = [head, Text("")]
    turn = 0
    for m in t.messages or []:
        role = m.get("role")
        raw = str(m.get("content") or "")
        content = printable(raw)
        if role == "system":
            # The SOP is the same in every episode: its first line says which one it is.
            first = content.strip().splitlines()[0] if content.strip() else ""
            parts.append(Text(f"system: {first} ({len(content)} chars)", style="dim"))
        elif role == "user":
            parts.append(Text.assemble(("user: ", "bold magenta"), content))
        elif role == "assistant":
            parts.append(_turn_header(t, turn))
            turn += 1
            prose = _model_text(content)
            if prose:
                parts.append(Text.assemble(("model: ", "bold blue"), prose))
            for call in parse_tool_calls(raw):
                if call.error is not None:
                    why = printable(call.error)
                    parts.append(Text(f"tool call (malformed): {why}", style="red"))
                    continue
                args = printable(json.dumps(call.arguments, ensure_ascii=False))
                parts.append(
                    Text.assemble(
                        ("call ", "bold yellow"), (printable(str(call.name)), "yellow"), f" {args}"
                    )
                )
        elif role == "tool":
            style = "red" if content.startswith("error: ") else "green"
            parts.append(
                Text.assemble(
                    (f"  ↳ {printable(str(m.get('name', 'tool')))}: ", style),
                    (_short(content, MAX_TOOL_CHARS), "default"),
                )
            )
        else:
            parts.append(Text(f"{role}: {_short(content, MAX_TOOL_CHARS)}", style="dim"))
    if t.messages is None:
        parts.append(Text("(messages not loaded)", style="dim"))
    parts.append(Text(""))
    if t.ground_truth is not None:
        parts.append(answer_table(t.messages or [], t.ground_truth))
    return Group(*parts)
