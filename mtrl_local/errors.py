"""User-facing errors: one line naming the file and field, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in something the user gave us (a task name, a file, a config value).

    The CLI prints ``mtrl: error: <message>`` and exits with code 2. The message names the file
    and the line or field, so the user can fix it without reading a traceback.
    """

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """A library's exception as one line (transformers' messages run over several)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
