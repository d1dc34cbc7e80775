"""The ``mtrl`` command line: where names become objects and the library does the work.

``mtrl tasks`` lists the registered tasks, ``validate`` checks them (splits, reference TSR, turn
budget), ``audit`` runs the pytest-driven reward audits, ``export`` writes cases or expert
episodes as JSONL, ``eval`` evaluates a model (beside its base) with the strict scorer,
``baseline`` puts the base model through that evaluation and ``train`` runs baseline → RL →
final evaluation; ``model import`` imports a GGUF file or a Hugging Face directory, and ``sft``
warm-starts a model from demonstrations. Other packages add commands (the dashboard adds
``dash``). A user mistake (unknown task, malformed file, missing model) prints one line naming
the file and field and exits with code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rich.console import Console

from mtrl_local.cli import suite_commands
from mtrl_local.cli.inputs import resolve_inputs
from mtrl_local.cli.parser import build_parser
from mtrl_local.errors import UserError


def _run(args: argparse.Namespace, console: Console) -> int:
    if hasattr(args, "handler"):  # `mtrl model`, `mtrl sft` and plugin commands set their own
        return int(args.handler(args, console))
    if args.command in suite_commands.COMMANDS:
        return suite_commands.COMMANDS[args.command](args, console)
    inputs = resolve_inputs(args)  # every name checked before the model libraries load
    # eval, baseline and train load torch and transformers, which takes seconds: imported only
    # when one of them runs, so `mtrl tasks`, `--help` and the one-line errors stay fast.
    from mtrl_local.cli import model_commands

    return model_commands.COMMANDS[args.command](args, inputs, console)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mtrl``; returns the exit code."""
    console = Console()
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(levelname)s %(message)s",
        )
        return _run(args, console)
    except UserError as exc:
        print(f"mtrl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mtrl: interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
