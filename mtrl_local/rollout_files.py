"""Rollout files: JSONL, one episode per line (what evaluations write and audits read).

Required per line: ``messages`` (a list of ``{"role", "content"}`` objects) and ``ground_truth``
(an object). Optional: ``task``, ``case_id``, ``split``, ``reward``, ``strict``, counters, and any
extra keys (kept as they are). Reading validates every line and names the file, line and field of
the first problem; writing validates first, then appends whole lines and fsyncs
(:mod:`mtrl_local.jsonl`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from mtrl_local.errors import UserError
from mtrl_local.jsonl import read_jsonl, write_jsonl

ROLES = ("system", "user", "assistant", "tool")


def check_rollout(obj: Any) -> str | None:
    """Why ``obj`` is not a usable rollout record (``"field 'x' …"``), or ``None``."""
    if not isinstance(obj, dict):
        return "expected a JSON object"
    if "messages" not in obj:
        return "field 'messages' is missing"
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"field 'messages[{i}]' must be an object"
        if m.get("role") not in ROLES:
            return f"field 'messages[{i}].role' must be one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"field 'messages[{i}].content' must be a string"
    if "ground_truth" not in obj:
        return "field 'ground_truth' is missing"
    if not isinstance(obj["ground_truth"], dict) or not obj["ground_truth"]:
        return "field 'ground_truth' must be a non-empty object"
    for key in ("task", "case_id"):
        if key in obj and not isinstance(obj[key], str):
            return f"field '{key}' must be a string"
    return None


def iter_rollout_file(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Validated records, each with ``_line``; ``"<file>:<line>: …"`` on the first bad one."""
    for lineno, obj in read_jsonl(path):
        why = check_rollout(obj)
        if why:
            raise UserError(f"{path}:{lineno}: {why}")
        obj.setdefault("_line", lineno)
        yield obj


def read_rollout_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a rollout file (validated). An empty file is an error too."""
    rows = list(iter_rollout_file(path))
    if not rows:
        raise UserError(f"{path}: no rollouts in file")
    return rows


def write_rollout_file(
    path: str | os.PathLike[str], rows: Iterable[dict[str, Any]], append: bool = False
) -> int:
    """Write records as JSONL (validated first); returns how many were written."""
    items = []
    for i, row in enumerate(rows):
        why = check_rollout(row)
        if why:
            raise ValueError(f"rollout {i}: {why}")
        items.append({k: v for k, v in row.items() if k != "_line"})
    return write_jsonl(path, items, append=append)
