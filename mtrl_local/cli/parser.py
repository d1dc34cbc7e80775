"""The ``mtrl`` argument parser: every core command's options, and the plugins' commands.

Building it loads no model library, so ``mtrl --help`` and the one-line errors stay fast.
"""

from __future__ import annotations

import argparse

from mtrl_local.chat_formats import CHAT_FORMAT_NAMES
from mtrl_local.cli import model_group, sft_command
from mtrl_local.cli.values import OneLineParser, integer, number
from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.errors import UserError
from mtrl_local.plugins import command_plugins

DESCRIPTION = "Multi-turn RL for tool-using LLM agents, with a strict evaluation harness."
SPLITS = ("train", "val", "test")


def config_fields_help() -> str:
    """Every config field and its description, for ``mtrl train --help``."""
    lines = ["config fields (KEY=VALUE overrides; nested: async_config.max_steps_off_policy=1):"]
    for name, info in MultiTurnRLConfig.model_fields.items():
        text = " ".join((info.description or "").split())
        first = text.split(". ")[0].rstrip(".")
        lines.append(f"  {name}: {first}")
    return "\n".join(lines)


def _add_suite_commands(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("tasks", help="list the registered tasks")

    p = sub.add_parser("validate", help="check a task: splits, reference TSR, turn budget")
    p.add_argument("task", nargs="?", help="task name")
    p.add_argument("--all", action="store_true", help="every registered task")
    p.add_argument("--cases", help="validate a cases JSONL file instead of the generated cases")

    p = sub.add_parser("export", help="write cases or expert episodes as JSONL")
    p.add_argument("what", choices=("cases", "reference", "noisy"))
    p.add_argument("task")
    p.add_argument("--split", choices=SPLITS, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-rate", type=number(0.0, 1.0), default=0.08)

    p = sub.add_parser("audit", help="run the pytest-driven reward audits")
    p.add_argument("--task", default="aircraft_inspection")
    p.add_argument("--reward", default="rewards.dense:dense_reward", help="module:function")
    p.add_argument("--rollouts", default=None, help="rollout file (default: noisy expert, val)")
    p.add_argument(
        "--bound", type=number(0.0, 1.0), default=0.02, help="max share of over-credited episodes"
    )
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")


def _add_eval_args(p: argparse.ArgumentParser, model_default: str | None) -> None:
    """The options ``mtrl eval`` and ``mtrl baseline`` share."""
    p.add_argument("--task", required=True, help="task name (see mtrl tasks)")
    if model_default is None:
        p.add_argument("--model", required=True, help="model directory, or 'default'")
    else:
        p.add_argument("--model", default=model_default, help="model directory, or 'default'")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--top-p", type=number(0.0, 1.0, low_open=True), default=1.0)
    p.add_argument("--max-tokens", type=integer(1), default=512, help="per-turn token budget")
    p.add_argument("--max-turns", type=integer(1), default=None, help="default: the task's")
    p.add_argument("--max-cases", type=integer(1), default=None, help="only the first N cases")
    p.add_argument("--max-batch", type=integer(1), default=64, help="episodes generated together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="rewards.dense:dense_reward", help="module:function")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda…")
    p.add_argument(
        "--chat-format",
        choices=CHAT_FORMAT_NAMES,
        default="auto",
        help="how the model writes tool calls (auto: from its chat template)",
    )
    p.add_argument("--out", default=None, help="output dir (default runs/eval-<task>-<time>)")


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a split with the strict scorer")
    _add_eval_args(p, model_default=None)
    p.add_argument("--base-model", default=None, help="also evaluate this base (dir or 'default')")
    p.add_argument("--n", type=integer(1), default=1, help="samples per case (pass@1 and pass@n)")
    p.add_argument("--temperature", type=number(0.0), default=0.0, help="0 = greedy")

    p = sub.add_parser(
        "baseline", help="the base model through the evaluation (greedy [+ sampled])"
    )
    _add_eval_args(p, model_default="default")
    p.add_argument(
        "--n", type=integer(1), default=1, help="> 1: a second, sampled pass with n per case"
    )
    p.add_argument(
        "--sample-temperature",
        type=number(0.0, low_open=True),
        default=1.0,
        help="of the sampled pass",
    )
    p.set_defaults(temperature=0.0)


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="baseline on test → RL training → final test evaluation beside the base",
        description="Overrides are KEY=VALUE pairs of config fields "
        "(e.g. loss_type=cispo async_config.max_steps_off_policy=1); they win over the recipe.",
        epilog=config_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    p.add_argument("--recipe", default=None, help="recipes/*.toml")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue this run directory")
    p.add_argument("--task", default=None)
    p.add_argument("--model", default=None, help="'default' or a local HF model directory")
    p.add_argument("--max-steps", dest="max_steps", default=None)
    p.add_argument("--run-name", dest="run_name", default=None)
    p.add_argument("--output-dir", dest="output_dir", default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the base model on test")
    p.add_argument("--no-final-eval", action="store_true", help="skip the final test evaluation")
    p.add_argument(
        "--agent-cmd",
        default=None,
        metavar="CMD",
        help="train your own agent: a command (e.g. 'python my_agent.py') or module:function, "
        "run once per episode against the rollout server (OPENAI_BASE_URL / OPENAI_API_KEY)",
    )
    p.add_argument(
        "--agent-workers",
        type=integer(1),
        default=None,
        help="agents run at once (default: batch size)",
    )
    p.add_argument(
        "--agent-timeout",
        type=number(0.0, low_open=True),
        default=120.0,
        help="seconds an agent may stay silent before its episode fails",
    )


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands other packages add (``mtrl_local.commands`` entry points): each entry point is
    ``register(subparsers)``, which adds its parser with ``set_defaults(handler=fn)``, ``fn(args,
    console) -> exit code``."""
    for ep in command_plugins():
        try:
            register = ep.load()
        except Exception as exc:
            why = f"its entry point {ep.value} failed ({exc})"
            raise UserError(f"command '{ep.name}': {why}") from None
        register(sub)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs and tests)."""
    parser = OneLineParser(prog="mtrl", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_suite_commands(sub)
    _add_eval_commands(sub)
    _add_train_command(sub)
    model_group.register(sub)
    sft_command.register(sub)
    _add_plugin_commands(sub)
    return parser
