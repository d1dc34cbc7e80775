"""JSON Lines files: the one reader and writer every JSONL file of the toolkit goes through.

Reading names the file and line of the first problem (a :class:`UserError`, one line); writing
validates nothing (callers check their records first), writes whole lines and fsyncs, so a crash
never leaves half a record that hides the ones before it, and replaces a file only once its new
content is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mtrl_local.errors import UserError


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-empty line; ``"<file>:<line>: …"`` on a bad one
    (not UTF-8, not JSON, nested too deeply, a number too long, not an object)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})") from None
            if not line.strip():
                continue
            obj = parse_json_line(line, f"{path}:{lineno}")
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def read_json(path: str | os.PathLike[str]) -> Any:
    """A whole JSON file (a run's ``config.json``, a report), or one :class:`UserError` line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return parse_json_line(text, str(path))


def parse_json_line(text: str, where: str) -> Any:
    """``json.loads(text)``, with every way it can fail as one :class:`UserError` at ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise UserError(f"{where}: not valid JSON ({exc})") from None


def write_jsonl(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], append: bool = False
) -> int:
    """Write ``rows`` one JSON object per line (parents created, fsynced); returns how many.

    A new file is written beside its target and renamed over it at the end, so a failure half way
    (a row that cannot be made, a full disk) leaves the previous file, or none, never half of one.
    A path that cannot be written is one :class:`UserError` line.
    """
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{path}: is a directory, expected a file path")
    scratch = target if append else target.with_name(f".{target.name}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        n = _write_lines(scratch, rows, "a" if append else "w")
        if not append:
            os.replace(scratch, target)
    except FileExistsError:  # mkdir met a file where a parent directory should be
        raise UserError(f"{path}: cannot be written (a parent is a file)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    finally:
        if not append and scratch.exists():
            scratch.unlink()
    return n


def _write_lines(path: Path, rows: Iterable[Mapping[str, Any]], mode: str) -> int:
    n = 0
    with open(path, mode, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n
