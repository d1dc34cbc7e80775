"""JSON Lines files: the one reader and writer every JSONL file of the toolkit goes through.

Reading names the file and line of the first problem (a :class:`UserError`, one line); writing
validates nothing (callers check their records first), writes whole lines and fsyncs, so a crash
never leaves half a record that hides the ones before it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mtrl_local.errors import UserError


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-empty line; ``"<file>:<line>: …"`` on a bad one."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def write_jsonl(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], append: bool = False
) -> int:
    """Write ``rows`` one JSON object per line (parents created, fsynced); returns how many."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n
