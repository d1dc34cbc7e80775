"""Tool-call formats and the chat codec: real SmolLM2 tokenizer, our own family-style templates.

The real tokenizer's ChatML template ignores ``tools``: the codec must add them. The three
family-style templates (``tests/family_templates.py``) check that calls are read and results
written the way each family does, end to end through the rollout engine, token for token.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from mtrl_local.chat import CHAT_TEMPLATE
from mtrl_local.chat_codec import ChatCodec
from mtrl_local.chat_formats import (
    CHAT_FORMAT_NAMES,
    CHAT_FORMATS,
    detect_format,
    json_spans,
    parse_llama3_json,
    parse_mistral,
    parse_tool_call_list,
    resolve_format,
)
from mtrl_local.config import ChatFormatName
from mtrl_local.errors import UserError
from mtrl_local.rollout.engine import RolloutEngine
from mtrl_local.rollout.sampler import SamplingParams
from mtrl_local.rollout.scripted import ScriptedSampler
from mtrl_local.scoring import strict_score
from sopbench.aircraft_inspection import AircraftInspection
from sopbench.inventory_reconciliation import InventoryReconciliation
from tests.family_templates import FAMILIES, Family, family_tokenizer
from tests.real_tokenizer import smollm2_tokenizer

CALLS = [("run_sql", {"query": "SELECT '}{' AS x"}), ("list_tables", {})]


# -- parsing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CHAT_FORMATS))
def test_each_format_reads_the_calls_it_writes(name: str) -> None:
    fmt = CHAT_FORMATS[name]
    text = "Let me look.\n" + fmt.render_calls(CALLS)
    parsed = fmt.parse_calls(text)
    assert [(c.name, c.arguments, c.error) for c in parsed] == [(n, a, None) for n, a in CALLS]


def test_tool_call_list_reads_a_list_or_one_object_per_block() -> None:
    text = (
        '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b"}]</tool_call>'
        '<tool_call>{"name": "c", "arguments": "{\\"y\\": 2}"}</tool_call>'
    )
    assert [(c.name, c.arguments) for c in parse_tool_call_list(text)] == [
        ("a", {"x": 1}),
        ("b", {}),
        ("c", {"y": 2}),
    ]
    assert parse_tool_call_list("<tool_call>[]</tool_call>")[0].error == "tool call list is empty"
    assert parse_tool_call_list("<tool_call>[{")[0].error == "unterminated tool_call block"


def test_llama3_reads_bare_objects_with_parameters_or_arguments() -> None:
    text = (
        '<|python_tag|>{"name": "a", "parameters": {"s": "} {"}}'
        ' and then {"name": "b", "arguments": {"n": 2}}'
    )
    assert [(c.name, c.arguments) for c in parse_llama3_json(text)] == [
        ("a", {"s": "} {"}),
        ("b", {"n": 2}),
    ]
    assert parse_llama3_json("no call here") == []
    assert parse_llama3_json('{"parameters": {}}')[0].error == "tool call has no 'name'"
    assert parse_llama3_json('{"name": "a", "parameters": {')[0].error is not None
    assert parse_llama3_json('{"name": NaN}')[0].error == "tool call has NaN or Infinity (not JSON)"


def test_mistral_reads_the_list_after_each_marker() -> None:
    text = '[TOOL_CALLS][{"name": "a", "arguments": {"x": [1, 2]}}] [TOOL_CALLS] {"name": "b"}'
    assert [(c.name, c.arguments) for c in parse_mistral(text)] == [("a", {"x": [1, 2]}), ("b", {})]
    assert parse_mistral("[TOOL_CALLS] nothing")[0].error == "[TOOL_CALLS] without a JSON list"
    assert parse_mistral('[TOOL_CALLS][{"name": "a"')[0].error is not None
    assert parse_mistral("plain text") == []


def test_json_spans_skip_brackets_in_strings_and_stray_closers() -> None:
    text = 'x } {"a": "}\\"{", "b": [1, {"c": 2}]} y {"d": 1} {'
    spans = list(json_spans(text))
    assert [text[a:b] if b else None for a, b in spans] == [
        '{"a": "}\\"{", "b": [1, {"c": 2}]}',
        '{"d": 1}',
        None,
    ]


@pytest.mark.parametrize("name", ["llama3_json", "mistral", "tool_call_list"])
def test_parsers_are_linear_on_runaway_output(name: str) -> None:
    # Quadratic scanning would not finish these in any reasonable time (~10^10 steps).
    fmt = CHAT_FORMATS[name]
    for text in ("{" * 100_000, "[TOOL_CALLS][" * 50_000, "<tool_call>[" * 50_000, '{"' * 50_000):
        calls = fmt.parse_calls(text)
        assert all(c.error is not None for c in calls)


# -- choosing a format -----------------------------------------------------------------------------
def test_auto_detects_the_format_from_the_template() -> None:
    assert detect_format(CHAT_TEMPLATE).name == "hermes"
    assert detect_format(smollm2_tokenizer().chat_template).name == "hermes"
    assert detect_format(None).name == "hermes"
    for family in FAMILIES:
        assert detect_format(family.template).name == family.chat_format, family.name
    assert resolve_format("mistral", CHAT_TEMPLATE).name == "mistral"
    with pytest.raises(ValueError, match="chat_format 'qwen': unknown"):
        resolve_format("qwen", None)


def test_config_names_the_same_formats() -> None:
    assert get_args(ChatFormatName) == CHAT_FORMAT_NAMES


# -- the codec on the real SmolLM2 template --------------------------------------------------
def aircraft_opening() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    task = AircraftInspection()
    env = task.make_env()
    try:
        return env.reset(task.cases("val")[0]), env.tool_schemas()
    finally:
        env.close()


def test_tools_reach_a_model_whose_template_ignores_them(caplog: pytest.LogCaptureFixture) -> None:
    tok = smollm2_tokenizer()
    messages, tools = aircraft_opening()
    plain = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert not any(json.dumps(t["function"]) in plain for t in tools)  # the template drops them
    with caplog.at_level(logging.WARNING, logger="mtrl_local.chat_codec"):
        codec = ChatCodec(tok)
    assert "ignores `tools`" in caplog.text
    assert not codec.template_renders_tools and codec.format.name == "hermes"
    text = codec.render_prompt(messages, tools)
    assert len(tools) == 8
    for tool in tools:
        assert json.dumps(tool["function"]) in text
    assert "Call a tool by writing <tool_call>" in text
    assert text.count("<|im_start|>system") == 1 and text.endswith("<|im_start|>assistant\n")
    assert codec.encode_prompt(messages, tools) == tok.encode(text, add_special_tokens=False)
    glue = codec.encode_continuation([{"role": "tool", "name": "x", "content": "42"}])
    assert tok.decode(glue) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_renders_tools_gets_them_once() -> None:
    tok = smollm2_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    codec = ChatCodec(tok)
    messages, tools = aircraft_opening()
    assert codec.template_renders_tools
    text = codec.render_prompt(messages, tools)
    assert text.count('"name": "lookup_aircraft"') == 1
    assert codec.prompt_messages(messages, tools) == messages


def test_templates_that_cannot_be_continued_are_refused() -> None:
    tok = smollm2_tokenizer()
    no_eos = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\n{% endfor %}"
    rewrites = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(earlier) {% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    for template, why in ((no_eos, "does not end an assistant turn"), (rewrites, "rewrites")):
        tok.chat_template = template
        with pytest.raises(UserError, match=f"chat_format: .*{why}"):
            ChatCodec(tok).encode_continuation([{"role": "tool", "content": "1"}])
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        ChatCodec(tok)
    tok.chat_template = CHAT_TEMPLATE
    with pytest.raises(UserError, match="chat_format 'nope'"):
        ChatCodec(tok, "nope")


def test_assistant_text_of_writes_recorded_calls_in_the_format() -> None:
    tok = smollm2_tokenizer()
    hermes, llama = ChatCodec(tok, "hermes"), ChatCodec(tok, "llama3_json")
    recorded = {
        "role": "assistant",
        "content": 'Checking. <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>',
        "tool_calls": [{"name": "a", "arguments": {"x": 1}}],
    }
    assert hermes.assistant_text_of(recorded) == recorded["content"]
    assert llama.assistant_text_of(recorded) == 'Checking.\n{"name": "a", "parameters": {"x": 1}}'
    openai = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "b", "arguments": '{"y": 2}'}}],
    }
    assert (
        hermes.assistant_text_of(openai)
        == '<tool_call>{"name": "b", "arguments": {"y": 2}}</tool_call>'
    )
    with pytest.raises(UserError, match="tool_calls: arguments of 'b'"):
        hermes.assistant_text_of(
            {"role": "assistant", "tool_calls": [{"name": "b", "arguments": "{"}]}
        )


# -- three families, end to end ----------------------------------------------------------
def family_codec(family: Family) -> ChatCodec:
    return ChatCodec(family_tokenizer(smollm2_tokenizer(), family))


def expert_sampler(codec: ChatCodec, task: Any, think: bool) -> tuple[ScriptedSampler, dict]:
    """Replays the reference expert, each turn written in the codec's format."""
    scripted: dict[str, list[list[int]]] = {}

    def script(key: str, turn: int, context: list[int]) -> list[int]:
        if key not in scripted:
            run = task.run_expert(task.case(key.partition("#")[0]))
            texts = [codec.assistant_text_of(m) for m in run.messages if m["role"] == "assistant"]
            if think:
                texts = [f"<think>step {i}</think>\n{t}" for i, t in enumerate(texts)]
            scripted[key] = [codec.encode_assistant(t) for t in texts]
        return scripted[key][turn]

    return ScriptedSampler(script, codec.eos_id), scripted


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_episodes_run_token_for_token(family: Family) -> None:
    codec = family_codec(family)
    assert codec.format.name == family.chat_format and codec.template_renders_tools
    task = InventoryReconciliation()
    cases = task.cases("val")[:2]
    think = family.name == "qwen3"
    sampler, scripted = expert_sampler(codec, task, think)
    engine = RolloutEngine(sampler, codec.tokenizer, progress=False)
    trajectories = engine.run(
        task, cases, sampling=SamplingParams(max_tokens=4000), scorer=strict_score
    )
    tok = codec.tokenizer
    for traj in trajectories:
        assert traj.strict == 1.0 and traj.done_reason == "final_answer", traj.messages[-1]
        sampled = [t for t, m in zip(traj.input_ids, traj.loss_mask, strict=True) if m]
        assert sampled == [t for turn in scripted[f"{traj.case_id}#0"] for t in turn]
        text = tok.decode(traj.input_ids)
        assert text.count(family.result_marker) == traj.tool_calls > 0
        for name in ("list_tables", "describe_table", "run_sql"):
            assert f'"name": "{name}"' in text
        if think:
            # The template drops earlier reasoning when it re-renders the conversation; the
            # trajectory keeps what the model saw and wrote.
            rerendered = codec._render(traj.messages, None, False)
            assert "<think>step 0</think>" not in rerendered
            assert "<think>step 0</think>" in text


def test_a_chat_format_setting_overrides_auto_and_misreads_are_counted() -> None:
    # The llama3 family's calls read as hermes find no <tool_call>: the episode ends at turn 1.
    family = FAMILIES[0]
    codec = family_codec(family)
    task = InventoryReconciliation()
    sampler, _ = expert_sampler(codec, task, think=False)
    engine = RolloutEngine(sampler, codec.tokenizer, progress=False, chat_format="hermes")
    [traj] = engine.run(task, task.cases("val")[:1], sampling=SamplingParams(max_tokens=4000))
    assert traj.done_reason == "no_action" and traj.n_turns == 1


# -- the real tokenizer with a tiny random model, through `mtrl eval` ---------------------
@pytest.fixture(scope="module")
def tiny_smollm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama over the real SmolLM2 vocabulary, saved with the real tokenizer."""
    tok: PreTrainedTokenizerBase = smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-smollm")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_mtrl_eval_on_the_real_tokenizer_shows_every_tool(
    tiny_smollm: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "mtrl_local.cli", "eval", "--task", "aircraft_inspection"),
            *("--model", str(tiny_smollm), "--max-cases", "2", "--max-tokens", "6"),
            *("--max-turns", "2", "--out", str(out), "--device", "cpu"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ignores `tools`" in proc.stderr
    from mtrl_local.rollout_files import read_rollout_file

    [rollouts] = list(out.rglob("*.jsonl"))
    trajectories = read_rollout_file(rollouts)
    assert len(trajectories) == 2
    tok = smollm2_tokenizer()
    _, tools = aircraft_opening()
    first = trajectories[0]
    prompt = tok.decode(first["input_ids"][: first["prompt_len"]])
    for tool in tools:
        assert json.dumps(tool["function"]) in prompt


def test_a_recorded_format_is_what_auto_picks_after_a_reload(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from mtrl_local.chat_codec import record_chat_format

    tok = smollm2_tokenizer()
    assert ChatCodec(tok).format.name == "hermes"  # from the template
    record_chat_format(tok, "llama3_json")  # what `mtrl sft --chat-format llama3_json` does
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert ChatCodec(reloaded).format.name == "llama3_json"
    assert ChatCodec(reloaded, "mistral").format.name == "mistral"  # a setting still wins
