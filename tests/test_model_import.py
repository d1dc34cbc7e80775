"""``mtrl model import``: GGUF files and Hugging Face directories become model directories that
:func:`mtrl_local.model_io.load_model` loads, computing what the source computes.

The GGUF tests write a tiny llama GGUF with gguf's own writer (2 layers, hidden 64, the query
weights Q8_0-quantised), carrying the real SmolLM2 tokenizer metadata cut to its first 1,024
tokens and the merges among them, and SmolLM2's chat template. The real 135M model is imported
by a slow test. Mistakes are checked through the ``mtrl`` subprocess, as a user meets them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mtrl_local.cli import main
from mtrl_local.errors import UserError
from mtrl_local.model_import import IMPORT_FILE, import_model
from mtrl_local.model_io import load_model
from tests.adversarial.test_cli_inputs import assert_one_line_error, mtrl
from tests.real_tokenizer import smollm2_gguf

SHIPPED = Path(__file__).resolve().parents[1] / "sopbench" / "default_model" / "shipped"
VOCAB = 1024
PROMPT = [{"role": "user", "content": "Is aircraft N731QK ready for flight?"}]


# -- a tiny GGUF -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_tokenizer_fields() -> dict[str, Any]:
    """SmolLM2's tokenizer metadata, its vocabulary cut to the first ``VOCAB`` tokens (BPE ids
    follow merge order, so the merges among those tokens still make a whole tokenizer)."""
    fields = GGUFReader(smollm2_gguf()).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()[:VOCAB]
    kept = set(tokens)
    merges = [
        m
        for m in fields["tokenizer.ggml.merges"].contents()
        if all(part in kept for part in (*m.split(" "), m.replace(" ", "")))
    ]
    return {
        "tokens": tokens,
        "types": fields["tokenizer.ggml.token_type"].contents()[:VOCAB],
        "merges": merges,
        "chat_template": fields["tokenizer.chat_template"].contents(),
    }


def write_tiny_gguf(
    path: Path, tokenizer: dict[str, Any], arch: str = "llama", seed: int = 0
) -> Path:
    """A 2-layer, hidden-64 llama GGUF (GGUF's dims are reversed; numpy's are torch's)."""
    hidden, ffn, layers, heads, kv_heads = 64, 128, 2, 4, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w = GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokenizer["tokens"])
    w.add_token_types(tokenizer["types"])
    w.add_token_merges(tokenizer["merges"])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer["chat_template"])
    w.add_tensor("token_embd.weight", weight(VOCAB, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        q = quantize(weight(hidden, hidden), GGMLQuantizationType.Q8_0)
        w.add_tensor(
            f"blk.{i}.attn_q.weight", q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0
        )
        w.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_fields: Any) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", smollm2_tokenizer_fields)


def gguf_model(path: Path) -> PreTrainedModel:
    """What transformers itself makes of a GGUF file: the reference an import must match."""
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=str(path), quantization_config=GgufConfig(dequantize=True)
    )
    return model.eval()


def gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    # An absolute gguf_file: a bare name is looked up in the working directory first.
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=str(path))


def chat_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    encoded = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)
    return list(encoded["input_ids"])


def logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits  # (1, T, V)


def hidden_entries(directory: Path) -> list[str]:
    """Work directories an import leaves behind (there must be none)."""
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


# -- GGUF import -----------------------------------------------------------------------------------
def test_gguf_import_computes_what_the_gguf_does(
    tiny_gguf: Path,
    smollm2_tokenizer_fields: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Beside the file: another model's tokenizer and config, as in a downloads folder; in the
    # working directory: another GGUF of the same name. Neither may be read.
    source = tmp_path / "downloads" / "tiny.gguf"
    source.parent.mkdir()
    shutil.copy(tiny_gguf, source)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(SHIPPED / name, source.parent / name)
    monkeypatch.chdir(tmp_path)
    write_tiny_gguf(tmp_path / "tiny.gguf", smollm2_tokenizer_fields, seed=1)
    out = tmp_path / "models" / "tiny"

    report = import_model(source, out)

    assert (report.kind, report.architecture, report.model_type) == (
        "gguf",
        "LlamaForCausalLM",
        "llama",
    )
    assert report.vocab_size == VOCAB and report.eos_token == "<|im_end|>"
    assert report.has_chat_template and not report.renders_tools  # SmolLM2's ignores tools
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "chat_template.jinja", "generation_config.json"} <= files
    assert not any(name.endswith((".gguf", ".bin")) for name in files)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["bos_token_id"]) == (
        2,
        2,
        1,
    )
    provenance = json.loads((out / IMPORT_FILE).read_text())
    assert provenance["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert provenance["source"] == str(source.resolve()) and provenance["transformers_version"]
    assert provenance["report"]["num_parameters"] == report.num_parameters
    assert hidden_entries(out.parent) == []

    model, tokenizer = load_model(out)
    reference_tokenizer = gguf_tokenizer(tiny_gguf)
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    ids = chat_ids(tokenizer)
    assert ids == chat_ids(reference_tokenizer)
    assert len(tokenizer) == VOCAB and tokenizer.eos_token_id == 2
    assert torch.equal(logits(model, ids), logits(gguf_model(tiny_gguf), ids))


def test_cli_imports_in_bfloat16_and_replaces_only_with_force(
    tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny-bf16"
    args = ["model", "import", str(tiny_gguf), "--out", str(out), "--dtype", "bfloat16"]
    assert main(args) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    model, _ = load_model(out, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16

    assert main(args) == 2  # out is not empty
    assert f"out '{out}': exists and is not empty" in capsys.readouterr().err
    assert main([*args[:-2], "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert hidden_entries(tmp_path) == []


def test_unsupported_gguf_architecture_is_one_line(
    smollm2_tokenizer_fields: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_tiny_gguf(tmp_path / "odd.gguf", smollm2_tokenizer_fields, arch="notanarch")
    out = tmp_path / "out"
    assert main(["model", "import", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mtrl: error: model '{source}': transformers cannot load it")
    assert "notanarch" in err and "\n" not in err
    assert not out.exists() and hidden_entries(tmp_path) == []


def test_truncated_gguf_is_one_line(tiny_gguf: Path, tmp_path: Path) -> None:
    source = tmp_path / "cut.gguf"
    source.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(UserError, match=f"model '{source}': transformers cannot load it"):
        import_model(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- Hugging Face directory import -----------------------------------------------------------------
@pytest.mark.parametrize("layout", ["sharded safetensors", "pytorch_model.bin"])
def test_hf_directory_import_computes_what_the_source_does(layout: str, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)  # real: the default model's, ChatML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    source = tmp_path / "src"
    if layout == "sharded safetensors":
        LlamaForCausalLM(config).save_pretrained(source, max_shard_size="40KB")
        assert len(list(source.glob("*.safetensors"))) > 1
    else:
        source.mkdir()
        config.save_pretrained(source)
        torch.save(LlamaForCausalLM(config).state_dict(), source / "pytorch_model.bin")
    tokenizer.save_pretrained(source)
    out = tmp_path / "out"

    report = import_model(source, out)

    assert report.kind == "hf" and report.vocab_size == len(tokenizer)
    assert report.has_chat_template and report.renders_tools  # ours shows the tool schemas
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin")) and "sha256" not in json.loads(
        (out / IMPORT_FILE).read_text()
    )
    model, loaded = load_model(out)
    assert loaded.chat_template == tokenizer.chat_template
    ids = tokenizer.encode("Inspect aircraft N731QK (report AC-48213).")
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    assert torch.equal(logits(model, ids), logits(reference, ids))


# -- mistakes: one line naming the path, exit 2, nothing written ----------------------------------
def _not_gguf(tmp: Path) -> Path:
    path = tmp / "notes.gguf"
    path.write_text("these are notes, not weights\n")
    return path


def _no_config(tmp: Path) -> Path:
    path = tmp / "weights"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"")
    return path


def _adapter(tmp: Path) -> Path:
    path = tmp / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text('{"base_model_name_or_path": "x"}')
    return path


def _quantized(tmp: Path) -> Path:
    path = tmp / "awq"
    shutil.copytree(SHIPPED, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq"}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("make_source", "why"),
    [
        (lambda tmp: tmp / "missing.gguf", "no such file or directory"),
        (_not_gguf, "neither a GGUF file"),
        (_no_config, "not a model directory (no config.json"),
        (_adapter, "a LoRA adapter"),
        (_quantized, "quantized (awq)"),
    ],
    ids=["missing", "text-renamed-gguf", "no-config", "adapter", "quantized"],
)
def test_a_bad_source_is_one_line(make_source: Any, why: str, tmp_path: Path) -> None:
    source, out = make_source(tmp_path), tmp_path / "out"
    line = assert_one_line_error(mtrl("model", "import", str(source), "--out", str(out)))
    assert line.startswith(f"mtrl: error: model '{source}': {why}"), line
    assert not out.exists() and hidden_entries(tmp_path) == []


def test_a_non_empty_out_without_force_is_one_line(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    proc = mtrl("model", "import", str(tiny_gguf), "--out", str(out))
    assert_one_line_error(proc, f"out '{out}': exists and is not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_force_never_replaces_the_source(tiny_gguf: Path, tmp_path: Path) -> None:
    source = tmp_path / "models" / "tiny.gguf"
    source.parent.mkdir()
    shutil.copy(tiny_gguf, source)
    proc = mtrl("model", "import", str(source), "--out", str(source.parent), "--force")
    assert_one_line_error(proc, f"out '{source.parent}': holds the source")
    assert source.is_file()


# -- the real model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_imports_and_generates_as_the_gguf_does(tmp_path: Path) -> None:
    gguf = smollm2_gguf()
    out = tmp_path / "smollm2-135m"
    report = import_model(gguf, out)
    assert report.architecture == "LlamaForCausalLM"
    assert report.num_parameters == pytest.approx(134.5e6, rel=1e-3)
    assert report.vocab_size == 49152 and report.eos_token == "<|im_end|>"
    assert report.has_chat_template and not report.renders_tools

    model, tokenizer = load_model(out)
    reference_tokenizer = gguf_tokenizer(gguf)
    assert (out / "chat_template.jinja").read_text() == reference_tokenizer.chat_template
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    assert tokenizer.eos_token_id == 2 and model.generation_config.eos_token_id == 2
    prompt = torch.tensor([chat_ids(tokenizer)])
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=str(gguf)).eval()
    with torch.no_grad():
        ours = model.generate(prompt, max_new_tokens=8, do_sample=False)
        theirs = reference.generate(prompt, max_new_tokens=8, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    assert ours.shape[1] > prompt.shape[1]
