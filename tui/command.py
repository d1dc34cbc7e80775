"""``mtrl dash``: the dashboard's subcommand, registered with ``mtrl`` as a plugin.

The entry point (group ``mtrl_local.commands`` in ``pyproject.toml``) is :func:`register`; the
library's CLI knows nothing of the dashboard.
"""

from __future__ import annotations

import argparse

from rich.console import Console


def run_dash(args: argparse.Namespace, console: Console) -> int:
    # Imported here, not at the top: `mtrl` registers this command while it builds its parser
    # for every command, and the app (Textual, the run store) takes ~2 s to import.
    from tui.app import Dashboard
    from tui.data import resolve_run_dir

    # Checked here so a missing run or another schema version is one line, before the app starts.
    run_dir = resolve_run_dir(args.run, root=args.runs)
    Dashboard(run_dir, poll_s=args.interval).run()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dash`` to ``mtrl``."""
    p = sub.add_parser("dash", help="the terminal dashboard over a run store (live or finished)")
    p.add_argument("run", nargs="?", default=None, help="run directory (default: newest in --runs)")
    p.add_argument("--runs", default="runs", help="where to look for the newest run")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between reads")
    p.set_defaults(handler=run_dash)
