"""Importing a model: a GGUF file or a local Hugging Face directory → a model directory of ours.

:func:`import_model` loads the source with transformers (a GGUF's weights dequantised) and writes
a plain Hugging Face directory that :func:`mtrl_local.model_io.load_model` reads: safetensors
weights, ``config.json``, the tokenizer with its chat template, ``generation_config.json`` with
the eos / pad / bos ids, and ``mtrl_import.json`` (where it came from, the GGUF's sha256, the
versions, the date). The directory is written beside its target and renamed into place, so a
failure leaves no half-written model. Nothing is downloaded: the source is a local path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mtrl_local.chat_codec import template_renders_tools
from mtrl_local.chat_formats import detect_format
from mtrl_local.errors import UserError, first_line
from mtrl_local.model_files import ImportDtype, SourceKind, check_import

logger = logging.getLogger(__name__)

IMPORT_FILE = "mtrl_import.json"
#: What transformers raises on a file or directory it cannot load (bad metadata, unknown
#: architecture, missing package, truncated weights); anything else is a bug and keeps its trace.
LOAD_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    RuntimeError,
    ImportError,
    struct.error,
)


@dataclass(frozen=True)
class ImportReport:
    """What was imported, as logged and recorded in ``mtrl_import.json``."""

    source: str
    out: str
    kind: SourceKind
    architecture: str  # the model class, e.g. LlamaForCausalLM
    model_type: str
    num_parameters: int
    vocab_size: int
    eos_token: str | None
    dtype: ImportDtype
    has_chat_template: bool
    renders_tools: bool  # the chat template shows a conversation's `tools` to the model
    chat_format: str  # the tool-call format `chat_format = "auto"` picks for its template


def import_model(
    src: Path, out: Path, *, dtype: ImportDtype = "float32", overwrite: bool = False
) -> ImportReport:
    """Import the GGUF file or Hugging Face model directory ``src`` into the directory ``out``.

    ``out`` must not exist or be empty, unless ``overwrite``. Every refusal (a missing path, a
    file that is not GGUF, an architecture transformers cannot load, a directory that is not a
    model) is one :class:`UserError` line naming the path.
    """
    kind = check_import(src, out, overwrite)
    model, tokenizer = _load(src, kind, getattr(torch, dtype))
    _finish(model, tokenizer)
    report = ImportReport(
        source=str(src),
        out=str(out),
        kind=kind,
        architecture=type(model).__name__,
        model_type=str(model.config.model_type),
        num_parameters=sum(p.numel() for p in model.parameters()),
        vocab_size=int(model.config.get_text_config().vocab_size),
        eos_token=tokenizer.eos_token,
        dtype=dtype,
        has_chat_template=bool(tokenizer.chat_template),
        renders_tools=bool(tokenizer.chat_template) and template_renders_tools(tokenizer),
        chat_format=detect_format(tokenizer.chat_template).name,
    )
    provenance = {
        "source": str(src.resolve()),
        "kind": kind,
        **({"sha256": sha256_of(src)} if kind == "gguf" else {}),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "report": asdict(report),
    }
    _write_atomically(out, model, tokenizer, provenance)
    _log(report)
    return report


def _load(
    src: Path, kind: SourceKind, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if kind == "hf":
        return _load_pretrained(src, src, {"dtype": dtype})
    # The file is loaded from a directory of its own, by its absolute path: next to other files
    # (another model's tokenizer.json), transformers would read the tokenizer from those, and a
    # bare file name it looks up in the working directory first.
    with tempfile.TemporaryDirectory(prefix="mtrl-gguf-") as stage:
        link = Path(stage) / "model.gguf"
        link.symlink_to(src.resolve())
        # dequantize=True: a dense model, even where a GGUF kernel could keep the blocks packed.
        options = {
            "gguf_file": str(link),
            "dtype": dtype,
            "quantization_config": GgufConfig(dequantize=True),
        }
        model, tokenizer = _load_pretrained(src, Path(stage), options)
    # Dequantised, the model is a plain one; these marks only stop save_pretrained.
    model.hf_quantizer = None  # type: ignore[assignment]  # typed as a module attribute
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _load_pretrained(
    src: Path, where: Path, options: dict[str, Any]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    gguf = {"gguf_file": options["gguf_file"]} if "gguf_file" in options else {}
    # The model first: an architecture transformers does not know is the likelier refusal.
    try:
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, **options)
    except LOAD_ERRORS as exc:
        raise UserError(
            f"model '{src}': transformers cannot load it as a causal LM ({first_line(exc)})"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **gguf)
    except LOAD_ERRORS as exc:
        raise UserError(
            f"model '{src}': its tokenizer cannot be loaded ({first_line(exc)})"
        ) from None
    return model, tokenizer


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Fill in what a GGUF (or an older directory) leaves unset: the generation config's special
    ids and the tokenizer's length limit (the model's context, not transformers' 1e30)."""
    gen = model.generation_config
    if gen is not None:
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if getattr(gen, name, None) is None:
                setattr(gen, name, getattr(tokenizer, name, None))
        if gen.pad_token_id is None:
            gen.pad_token_id = gen.eos_token_id
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context and tokenizer.model_max_length > 10**12:
        tokenizer.model_max_length = int(context)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(
    out: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    provenance: dict[str, Any],
) -> None:
    """Save into a hidden sibling of ``out``, then rename it into place (the old ``out``, if any,
    is moved aside first and removed after)."""
    work = out.with_name(f".{out.name}.importing-{os.getpid()}")
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    moved_aside = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        _ensure_chat_template(work, tokenizer)
        (work / IMPORT_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            os.replace(out, old)
            moved_aside = True
        os.replace(work, out)
    except OSError as exc:
        if moved_aside and not out.exists():  # put the old directory back
            os.replace(old, out)
            moved_aside = False
        raise UserError(f"out '{out}': cannot be written ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if moved_aside:
            shutil.rmtree(old, ignore_errors=True)


def _ensure_chat_template(path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write ``chat_template.jinja`` when ``save_pretrained`` left the template out."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or (path / "chat_template.jinja").is_file():
        return
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    if "chat_template" not in config:
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")


def _log(report: ImportReport) -> None:
    logger.info(
        "imported %s → %s: %s (%s), %.1fM parameters, vocab %d, eos %r, %s",
        report.source,
        report.out,
        report.architecture,
        report.model_type,
        report.num_parameters / 1e6,
        report.vocab_size,
        report.eos_token,
        report.dtype,
    )
    if not report.has_chat_template:
        logger.warning("%s has no chat template: mtrl gives it its own when it loads", report.out)
    elif not report.renders_tools:
        logger.warning(
            "the chat template of %s ignores `tools`: mtrl adds them to the system turn in the %s "
            "format",
            report.out,
            report.chat_format,
        )
