"""What a model directory must hold, checked without loading a model library.

``mtrl`` checks a model directory before torch and transformers load (seconds), so a broken
directory is one line at once: ``config.json`` must be a JSON object naming its ``model_type``
(or ``adapter_config.json`` for a LoRA adapter), a tokenizer must be there, and every
safetensors weight file must be whole (its header parses and its tensors fit in the file).
:func:`check_import` does the same for ``mtrl model import``: its source (a GGUF file, known by
its magic bytes, or a model directory) and where it may write.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Literal, get_args

from mtrl_local.errors import UserError
from mtrl_local.jsonl import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin")
#: A safetensors header past this size is not a header: the file is not safetensors.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: The first four bytes of every GGUF file (llama.cpp's single-file format).
GGUF_MAGIC = b"GGUF"
SourceKind = Literal["gguf", "hf"]
#: The dtypes an imported model's weights can be saved in.
ImportDtype = Literal["float32", "bfloat16"]
IMPORT_DTYPES: tuple[str, ...] = get_args(ImportDtype)


def check_model_files(path: Path) -> None:
    """A :class:`UserError` naming the first thing ``path`` lacks to be a model directory."""
    config = path / "config.json"
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        _read_object(adapter, path)
    elif config.is_file():
        if "model_type" not in _read_object(config, path):
            raise UserError(f"model '{path}': config.json names no model_type")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"model '{path}': no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    else:
        raise UserError(
            f"model '{path}': not a model directory (no config.json or adapter_config.json)"
        )
    weights = [w for pattern in WEIGHT_PATTERNS for w in sorted(path.glob(pattern))]
    if not weights:
        raise UserError(f"model '{path}': no weights (no *.safetensors or pytorch_model*.bin)")
    for file in weights:
        if file.suffix == ".safetensors":
            _check_safetensors(file, path)


def _read_object(file: Path, model: Path) -> dict[str, Any]:
    obj = read_json(file)
    if not isinstance(obj, dict):
        raise UserError(f"model '{model}': {file.name} is not a JSON object")
    return obj


def _check_safetensors(file: Path, model: Path) -> None:
    """The header is 8 bytes of length, then that much JSON; every tensor's end offset must fit."""
    broken = f"model '{model}': weights {file.name} are truncated or not safetensors"
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(broken)
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise UserError(broken)
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            raise UserError(broken) from None
    if not isinstance(header, dict):
        raise UserError(broken)
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    if 8 + length + max(ends, default=0) > size:
        raise UserError(broken)


# -- what `mtrl model import` accepts -------------------------------------------------------------
def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic (whatever its suffix)."""
    try:
        with path.open("rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def check_import(src: Path, out: Path, overwrite: bool = False) -> SourceKind:
    """What ``src`` is (a GGUF file or a model directory), once ``out`` is known to be writable
    there; else a :class:`UserError` naming the path and why."""
    kind = _import_source(src)
    _check_import_out(src, out, overwrite)
    return kind


def _import_source(src: Path) -> SourceKind:
    if not src.exists():
        raise UserError(f"model '{src}': no such file or directory")
    if src.is_file():
        if not is_gguf_file(src):
            raise UserError(
                f"model '{src}': neither a GGUF file (its first bytes are not GGUF) "
                "nor a model directory"
            )
        return "gguf"
    if (src / "adapter_config.json").is_file():
        raise UserError(f"model '{src}': a LoRA adapter; import its base model instead")
    check_model_files(src)
    quantization = _read_object(src / "config.json", src).get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise UserError(
            f"model '{src}': quantized ({method or 'quantization_config'}); "
            "import an unquantized model or a GGUF file"
        )
    return "hf"


def _check_import_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"out '{out}': exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"out '{out}': exists and is not empty (--force replaces it)")
    target, source = out.resolve(), src.resolve()
    if target == source or target in source.parents:
        raise UserError(f"out '{out}': holds the source '{src}'; choose another directory")
