"""``mtrl sft``: warm-start a model from demonstrations (:mod:`mtrl_local.sft`).

The demonstrations are a JSONL file (``--data``: one ``{"messages", "tools"}`` conversation a
line, or what ``mtrl export noisy`` writes) or a suite task's noisy expert made in memory
(``--task``). Every name and file is checked before torch and transformers load, so a mistake is
one line at once; then the library is handed the model directory and the demonstrations.
"""

from __future__ import annotations

import argparse
import functools
from itertools import islice
from pathlib import Path
from typing import Any, cast

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mtrl_local.chat_formats import CHAT_FORMAT_NAMES
from mtrl_local.cli.values import integer, number
from mtrl_local.demonstrations import Demonstration, expert_demonstrations, read_demonstrations
from mtrl_local.errors import UserError
from mtrl_local.plugins import check_model, load_task, resolve_model
from mtrl_local.task import ExpertTask

SPLITS = ("train", "val", "test")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``mtrl sft`` to the ``mtrl`` parser."""
    p = sub.add_parser(
        "sft",
        help="warm-start a model from demonstrations (TRL SFTTrainer, assistant-only loss)",
        description="Fine-tune MODEL on demonstrations, rendered in the chat format the rollout "
        "uses, with the loss on the assistant turns only; write a plain model directory to OUT.",
    )
    p.add_argument("--model", required=True, help="model directory, or 'default'")
    p.add_argument("--out", required=True, help="the model directory to write (new or empty)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help='JSONL: {"messages": [...], "tools": [...]} per line')
    source.add_argument("--task", help="a suite task: its noisy expert's episodes")
    p.add_argument("--split", choices=SPLITS, default="train", help="of --task's cases")
    p.add_argument("--n", type=integer(1), default=1, help="noisy episodes per case (--task)")
    p.add_argument("--noise-rate", type=number(0.0, 1.0), default=0.08, help="of --task's expert")
    p.add_argument("--chat-format", choices=CHAT_FORMAT_NAMES, default="auto")
    p.add_argument("--lora-rank", type=integer(0), default=0, help="0 = full fine-tuning")
    p.add_argument("--lora-alpha", type=integer(1), default=32)
    p.add_argument("--epochs", type=number(0.0, low_open=True), default=1.0)
    p.add_argument("--lr", type=number(0.0, low_open=True), default=1e-4, help="learning rate")
    p.add_argument("--max-length", type=integer(2), default=4096, help="longer ones are dropped")
    p.add_argument("--batch-size", type=integer(1), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-examples", type=integer(1), default=None, help="only the first N")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.set_defaults(handler=run_sft_command)


def _check_out(out: Path, model: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty directory")
    if Path(model).exists() and out.resolve() == Path(model).resolve():
        raise UserError(f"--out {out}: is the model being fine-tuned")


@functools.cache
def _task_tools(name: str) -> list[dict[str, Any]]:
    """The tool schemas of task ``name`` (for export lines written without ``tools``)."""
    env = load_task(name).make_env()
    try:
        return env.tool_schemas()
    finally:
        env.close()


def _demonstrations(args: argparse.Namespace) -> list[Demonstration]:
    """The demonstrations ``--data`` or ``--task`` names (at most ``--max-examples``)."""
    if args.data:
        return read_demonstrations(args.data, tools_for=_task_tools)[: args.max_examples]
    task = load_task(args.task)
    if not hasattr(task, "run_expert"):
        raise UserError(f"task '{args.task}': has no expert program (run_expert); pass --data")
    made = expert_demonstrations(
        cast(ExpertTask, task),
        task.cases(args.split),
        noise_rate=args.noise_rate,
        per_case=args.n,
        seed=args.seed,
    )
    return list(islice(made, args.max_examples))


def run_sft_command(args: argparse.Namespace, console: Console) -> int:
    out = Path(args.out)
    _check_out(out, args.model)
    check_model(args.model)
    demos = _demonstrations(args)
    # torch, transformers and TRL take seconds to import: only once the inputs are known good.
    from mtrl_local.sft import REPORT_FILE, SftConfig, run_sft

    config = SftConfig(
        chat_format=args.chat_format,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        max_length=args.max_length,
        per_device_train_batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
    )
    report = run_sft(resolve_model(args.model), demos, out, config)
    table = Table(title=f"sft → {out}", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column()
    table.add_row("demonstrations", f"{report.examples} ({report.dropped_too_long} too long)")
    table.add_row("tokens", f"{report.tokens:,} ({report.assistant_tokens:,} trained)")
    table.add_row("chat format", report.chat_format)
    table.add_row("steps", f"{report.steps} ({report.epochs:g} epochs, {report.seconds:.0f}s)")
    table.add_row("final loss", "-" if report.final_loss is None else f"{report.final_loss:.4f}")
    console.print(table)
    console.print(f"report: {escape(str(out / REPORT_FILE))}")
    task = args.task or "TASK"
    fmt = "" if args.chat_format == "auto" else f" --chat-format {args.chat_format}"
    console.print(f"next: mtrl baseline --task {task} --model {escape(str(out))}{fmt}")
    return 0
