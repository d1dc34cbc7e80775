"""One writer per run directory: ``run.lock``, held with ``flock`` for as long as a run writes.

Two trainers writing one run directory would interleave their steps in one store and overwrite
each other's checkpoints. The trainer takes this lock before it reads or writes anything in the
run directory, and a second trainer is refused in one line naming the directory and the holder
(pid, host, start time, which the lock file records).

The kernel holds the lock, not the file: ``flock`` is released when its process ends, however it
ends. A lock file whose lock nobody holds is therefore stale — typically left by a SIGKILLed run
— and the next writer takes it over, logging whose it was. Releasing removes the file. Readers
(the dashboard, ``RunStore.open(readonly=True)``) never look at it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from mtrl_local.errors import UserError
from mtrl_local.run_dir import LOCK_FILENAME

logger = logging.getLogger(__name__)


class RunLock:
    """The held lock of one run directory; :meth:`release` it when the run stops writing."""

    def __init__(self, run_dir: Path, handle: IO[str], *, created: list[Path]) -> None:
        self.run_dir, self._handle, self._created = run_dir, handle, created

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILENAME

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take the lock of ``run_dir`` (created if missing), or :class:`UserError` if another
        process holds it."""
        created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = _lock_file(run_dir / LOCK_FILENAME)
        except BlockingIOError:
            holder = _describe(_read_holder(run_dir / LOCK_FILENAME))
            raise UserError(
                f"{run_dir}: in use by {holder}; a run directory takes one writer at a time "
                "(wait for that run to end, or stop it)"
            ) from None
        except OSError as exc:
            raise UserError(f"{run_dir}: cannot be written as a run directory ({exc})") from None
        _report_stale(run_dir, handle)
        _write_holder(handle)
        return cls(run_dir, handle, created=created)

    def release(self) -> None:
        """Remove the lock file and let the lock go (a second call does nothing). Directories
        the lock created are removed too if nothing else was written to them (a run refused
        while it opened leaves nothing behind)."""
        if self._handle.closed:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still held: nobody can take over a file about to vanish
        self._handle.close()
        _remove_if_empty(self._created)


def _lock_file(path: Path) -> IO[str]:
    """``path`` opened and locked; ``BlockingIOError`` if another process holds its lock."""
    while True:
        handle = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise
        if _is_current(handle, path):
            return handle
        handle.close()  # released and removed by its holder after we opened it: take the new one


def _is_current(handle: IO[str], path: Path) -> bool:
    """Whether ``path`` still names the file ``handle`` has open."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), path.stat())
    except FileNotFoundError:
        return False


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        return _parse_holder(path.read_text(encoding="utf-8"))
    except OSError:
        return None


def _parse_holder(text: str) -> dict[str, Any] | None:
    """The holder a lock file records, or ``None`` for a file cut short or not written by us."""
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "another process (its lock file does not say which)"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"


def _report_stale(run_dir: Path, handle: IO[str]) -> None:
    """Log the holder of a lock file nobody held (its process ended without releasing it); the
    caller then overwrites it."""
    handle.seek(0)
    left = handle.read()
    if not left.strip():
        return
    logger.warning(
        "%s: cleared a stale lock of %s: its process ended without releasing it",
        run_dir,
        _describe(_parse_holder(left)),
    )


def _write_holder(handle: IO[str]) -> None:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(holder) + "\n")
    handle.flush()


def _remove_if_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (innermost first) while they are empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


__all__ = ["LOCK_FILENAME", "RunLock"]
