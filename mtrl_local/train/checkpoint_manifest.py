"""A checkpoint's manifest: every file's size and sha256, written last.

The rename of a finished temporary directory makes a checkpoint appear all at once, but only the
manifest shows, on resume, that what is on disk is still what was written: a machine that lost
power before the page cache reached the disk, a file truncated or replaced since, or a directory
someone half-copied all fail :func:`check_manifest`, which says what is wrong in a few words.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """Record every file under ``directory`` (call it once all of them are written)."""
    files = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(directory)
    }
    text = json.dumps({"format": FORMAT, "files": files}, indent=1)
    (directory / MANIFEST).write_text(text + "\n")


def check_manifest(directory: Path) -> str | None:
    """``None`` when every file the manifest lists is there as written; else what is wrong."""
    path = directory / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST} (a save that did not finish, or a checkpoint of an older format)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
            raise ValueError(f"not a format-{FORMAT} manifest")
        entries = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in files.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})"
    for name, (size, digest) in entries.items():
        problem = _check_file(directory, name, size, digest)
        if problem is not None:
            return problem
    return None


def _check_file(directory: Path, name: str, size: int, digest: str) -> str | None:
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        return f"{MANIFEST} names a file outside the checkpoint: {name}"
    if not path.is_file():
        return f"{name} is missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{name} has {actual} bytes, the manifest says {size}"
    if _sha256(path) != digest:
        return f"{name} does not match its sha256 in the manifest"
    return None


__all__ = ["MANIFEST", "check_manifest", "write_manifest"]
