"""``mtrl model …``: commands on model files. ``mtrl model import SRC --out DIR`` turns a GGUF
file or a local Hugging Face directory into a model directory (:mod:`mtrl_local.model_import`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mtrl_local.model_files import IMPORT_DTYPES, check_import


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``mtrl model`` and its subcommands to the ``mtrl`` parser."""
    p = sub.add_parser("model", help="model files: import a GGUF or a Hugging Face directory")
    group = p.add_subparsers(dest="model_command", metavar="COMMAND", required=True)
    q = group.add_parser(
        "import",
        help="a GGUF file (dequantised) or a local HF directory → a model directory",
        description="Write SRC (a .gguf file, or a local Hugging Face causal-LM directory) as a "
        "model directory: safetensors weights, tokenizer with its chat template, generation "
        "config and mtrl_import.json. Nothing is downloaded.",
    )
    q.add_argument("src", help="a GGUF file or a local Hugging Face model directory")
    q.add_argument("--out", required=True, help="the model directory to write")
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.add_argument("--dtype", choices=IMPORT_DTYPES, default="float32", help="of the weights")
    q.set_defaults(handler=run_import)


def run_import(args: argparse.Namespace, console: Console) -> int:
    src, out = Path(args.src), Path(args.out)
    check_import(src, out, overwrite=args.force)  # a mistake is one line before anything loads
    # torch and transformers take seconds to import: only once the paths are known to be good.
    from mtrl_local.model_import import import_model

    report = import_model(src, out, dtype=args.dtype, overwrite=args.force)
    table = Table(title="imported model", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("source", str(src))
    table.add_row("model directory", str(out))
    table.add_row("architecture", f"{report.architecture} ({report.model_type})")
    table.add_row("parameters", f"{report.num_parameters / 1e6:.1f}M ({report.dtype})")
    table.add_row("vocab", f"{report.vocab_size:,}")
    table.add_row("eos token", str(report.eos_token))
    template = "none (mtrl's is used)" if not report.has_chat_template else "yes"
    if report.has_chat_template:
        added = ", ignores tools (mtrl adds them)"
        template += ", renders tools" if report.renders_tools else added
        template += f", chat_format auto → {report.chat_format}"
    table.add_row("chat template", template)
    console.print(table)
    console.print(f"next: mtrl baseline --task TASK --model {out}")
    return 0
