"""The chat format and the locally trained tokenizer, and TRL 1.16 accepting both.

Everything runs on CPU with a tokenizer trained in the test and a tiny random Qwen3 model: no hub.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any, ClassVar

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from mtrl_local.chat import (
    IM_END,
    RESPONSE_TEMPLATE,
    TAG_TOKENS,
    TOOLS_HEADER,
    prepare_tokenizer_for_trl,
    render,
)
from mtrl_local.chat_codec import ChatCodec
from mtrl_local.env import render_final_response, render_tool_call
from sopbench.default_model.tokenizer import train_tokenizer

SYSTEM = "You inspect aircraft before flight. Follow the SOP step by step and report the results."

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_aircraft",
            "description": "Identification record of an aircraft.",
            "parameters": {
                "type": "object",
                "properties": {"tail": {"type": "string", "description": "Tail number."}},
                "required": ["tail"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "check_component",
            "description": "Inspection result of one component.",
            "parameters": {
                "type": "object",
                "properties": {
                    "tail": {"type": "string"},
                    "component": {"type": "string", "enum": ["engine", "battery"]},
                },
                "required": ["tail", "component"],
            },
        },
    },
]


def conversation(tail: str = "N731QK", report: str = "AC-48213") -> list[dict[str, Any]]:
    """A 4-assistant-turn tool conversation as ``Episode`` records it (raw content + tool_calls)."""

    def assistant(text: str, calls: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        content = text + "".join(render_tool_call(n, a) for n, a in calls)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [{"name": n, "arguments": a} for n, a in calls]
        return msg

    def result(name: str, value: Any) -> dict[str, Any]:
        return {"role": "tool", "name": name, "content": json.dumps(value)}

    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Inspect aircraft {tail} (report {report})."},
        assistant("First the identification.\n", [("get_aircraft", {"tail": tail})]),
        result("get_aircraft", {"tail": tail, "model": "A320", "report": report}),
        assistant(
            "",
            [
                ("check_component", {"tail": tail, "component": "engine"}),
                ("check_component", {"tail": tail, "component": "battery"}),
            ],
        ),
        result("check_component", {"status": "pass"}),
        result("check_component", {"status": "fail", "code": "E-17"}),
        assistant("The battery failed; one more look.", [("get_aircraft", {"tail": tail})]),
        result("get_aircraft", {"tail": tail, "model": "A320", "report": report}),
        assistant(render_final_response({"aircraft_ready": False, "report": report}), []),
    ]


def corpus(n: int = 60, seed: int = 0) -> list[str]:
    """Synthetic task text: rendered conversations with random ids, plus the tool schemas."""
    rng = random.Random(seed)
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    texts = [json.dumps(t["function"]) for t in TOOLS]
    for _ in range(n):
        tail = "N" + "".join(rng.choice("0123456789") for _ in range(3)) + rng.choice(letters) * 2
        report = "AC-" + "".join(rng.choice("0123456789") for _ in range(5))
        for m in conversation(tail, report):
            texts.append(m["content"])
    return texts


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return train_tokenizer(corpus(), vocab_size=512)


def ids_of(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def tiny_qwen3(tok: PreTrainedTokenizerBase, seed: int = 0) -> Qwen3ForCausalLM:
    """A randomly initialised 2-layer, hidden-64 Qwen3 over ``tok``'s vocabulary."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Qwen3ForCausalLM(config)


# -- the template ------------------------------------------------------------------------------
def test_template_renders_tools_tool_calls_and_tool_turns(tok: PreTrainedTokenizerBase) -> None:
    msgs = conversation()
    text = render(tok, msgs, TOOLS)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}\n\n{TOOLS_HEADER}")
    for t in TOOLS:  # one schema per line, the inner function object
        assert "\n" + json.dumps(t["function"]) + "\n" in text
    assert text.count("<|im_start|>assistant\n") == 4
    assert text.count("<|im_start|>tool\n") == 4
    # Raw content is rendered as written, and its calls are not rendered a second time.
    assert text.split(TOOLS_HEADER)[1].count("<tool_call>") == 4
    assert '<|im_start|>tool\n{"status": "fail", "code": "E-17"}<|im_end|>\n' in text
    assert text.endswith('"report": "AC-48213"}</final_response><|im_end|>\n')
    # Without tools and system message there is no system turn.
    assert render(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_openai_style_tool_calls_are_rendered(tok: PreTrainedTokenizerBase) -> None:
    nested = {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    flat_str = {"name": "g", "arguments": '{"b": "X-1"}'}  # as a datasets column stores it
    msg = {"role": "assistant", "content": "", "tool_calls": [nested, flat_str]}
    assert render(tok, [msg]) == (
        "<|im_start|>assistant\n"
        '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
        '<tool_call>{"name": "g", "arguments": {"b": "X-1"}}</tool_call><|im_end|>\n'
    )
    # The canonical rendering is what ``render_tool_call`` writes.
    assert render(tok, [{"role": "assistant", "content": None, "tool_calls": [nested]}]) == (
        f"<|im_start|>assistant\n{render_tool_call('f', {'a': 1})}<|im_end|>\n"
    )


def test_prefix_preserving_over_tool_conversation(tok: PreTrainedTokenizerBase) -> None:
    msgs = conversation()
    turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    assert len(turns) == 4
    for k in turns:
        before = ids_of(tok, render(tok, msgs[:k], TOOLS, add_generation_prompt=True))
        after = ids_of(tok, render(tok, msgs[: k + 1], TOOLS))
        expected = before + ChatCodec(tok).encode_assistant(msgs[k]["content"])
        assert after[: len(expected)] == expected, f"turn at message {k}"


def build_trajectory(
    tok: PreTrainedTokenizerBase, msgs: list[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    """What the rollout engine does: ids and loss mask built only by appending ids."""
    first = next(k for k, m in enumerate(msgs) if m["role"] == "assistant")
    ids = ChatCodec(tok).encode_prompt(msgs[:first], TOOLS)
    mask = [0] * len(ids)
    k = first
    while k < len(msgs):
        sampled = ChatCodec(tok).encode_assistant(
            msgs[k]["content"]
        )  # stands for the sampler's output
        ids += sampled
        mask += [1] * len(sampled)
        k += 1
        new = []
        while k < len(msgs) and msgs[k]["role"] != "assistant":
            new.append(msgs[k])
            k += 1
        glue = ChatCodec(tok).encode_continuation(new)
        ids += glue
        mask += [0] * len(glue)
    return ids, mask


def test_trajectory_by_appending_ids_equals_full_render(
    tok: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("building a trajectory must not decode")

    for name in ("decode", "batch_decode", "convert_ids_to_tokens"):
        monkeypatch.setattr(tok, name, no_decoding)
    msgs = conversation()
    ids, _ = build_trajectory(tok, msgs)
    full = ids_of(tok, render(tok, msgs, TOOLS))
    # The full render also closes the last turn with "\n"; the trajectory ends at the sampled eos.
    assert full == ids + ids_of(tok, "\n")
    assert ids[-1] == tok.eos_token_id
    assert ChatCodec(tok).encode_continuation([]) == []


def test_assistant_mask_is_exactly_replies_and_eos(tok: PreTrainedTokenizerBase) -> None:
    msgs = conversation()
    out = tok.apply_chat_template(
        msgs, tools=TOOLS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = build_trajectory(tok, msgs)
    assert out["input_ids"] == ids + ids_of(tok, "\n")
    assert out["assistant_masks"] == [*mask, 0]
    trained_eos = [t for t, m in zip(ids, mask, strict=True) if m and t == tok.eos_token_id]
    assert len(trained_eos) == 4  # every reply's <|im_end|> is trained, so the model learns to stop


# -- the tokenizer -----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["AC-48213", "N731QK", ' "tail": "N731QK"', "report AC-00917."])
def test_digits_and_capitals_are_one_token_each(tok: PreTrainedTokenizerBase, text: str) -> None:
    # Decoded one by one: byte-level symbols such as "Ġ" (a space) are not the text itself.
    pieces = [tok.decode([i]) for i in ids_of(tok, text)]
    assert "".join(pieces) == text
    marked = [p for p in pieces if any(c.isdigit() or c.isupper() for c in p)]
    assert marked == [c for c in text if c.isdigit() or c.isupper()], pieces


def test_tags_and_control_tokens_are_single_tokens(tok: PreTrainedTokenizerBase) -> None:
    for t in (*TAG_TOKENS, "<|im_start|>", IM_END, "<|endoftext|>"):
        assert len(ids_of(tok, t)) == 1, t
    assert tok.eos_token == IM_END
    assert tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    # Tags survive skip_special_tokens (TRL's fallback decode); control tokens don't.
    text = f"<|im_start|>assistant\n{render_tool_call('f', {})}{IM_END}"
    assert tok.decode(ids_of(tok, text), skip_special_tokens=True) == (
        "assistant\n" + render_tool_call("f", {})
    )


def test_ids_round_trip_and_save_load(tok: PreTrainedTokenizerBase, tmp_path: Any) -> None:
    texts = [
        render(tok, conversation(), TOOLS),
        "naïve café — 温度 21°C\ttabs  and  spaces\n\n\nend",
        '{"a": [1, 2.5e-3, null], "b": "</tool_call>"}',
    ]
    for text in texts:
        assert tok.decode(ids_of(tok, text)) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok)
    assert loaded.chat_template == tok.chat_template
    assert loaded.response_template == RESPONSE_TEMPLATE
    assert (loaded.eos_token, loaded.pad_token) == (tok.eos_token, tok.pad_token)
    for text in texts:
        assert ids_of(loaded, text) == ids_of(tok, text)
    reply = ids_of(loaded, f"<|im_start|>assistant\n{render_tool_call('f', {})}{IM_END}")
    assert loaded.decode(reply, skip_special_tokens=True) == "assistant\n" + render_tool_call(
        "f", {}
    )


def test_prepare_tokenizer_refuses_a_foreign_template(tok: PreTrainedTokenizerBase) -> None:
    other = copy.deepcopy(tok)
    other.chat_template = "{{ messages[0].content }}"
    with pytest.raises(ValueError, match="another chat template"):
        prepare_tokenizer_for_trl(other)
    prepare_tokenizer_for_trl(other, overwrite_template=True)
    assert other.chat_template == tok.chat_template


# -- TRL 1.16 ----------------------------------------------------------------------------------
def test_trl_template_checks_pass(tok: PreTrainedTokenizerBase) -> None:
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        is_chat_template_prefix_preserving,
        is_chat_template_stop_token_trained,
        supports_tool_calling,
    )

    assert supports_tool_calling(tok)
    assert is_chat_template_prefix_preserving(tok)
    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)
    assert get_training_chat_template(tok) is None  # TRL keeps our template as it is


def test_trl_parse_response_reads_tool_calls(tok: PreTrainedTokenizerBase) -> None:
    from trl.chat_template_utils import parse_response

    msgs = conversation()
    prompt = ChatCodec(tok).encode_prompt(msgs[:2], TOOLS)
    parsed = parse_response(
        tok, ChatCodec(tok).encode_assistant(msgs[4]["content"]), prefix=prompt, tools=TOOLS
    )
    assert parsed["content"] == ""
    assert [c["function"] for c in parsed["tool_calls"]] == [
        {"name": "check_component", "arguments": {"tail": "N731QK", "component": "engine"}},
        {"name": "check_component", "arguments": {"tail": "N731QK", "component": "battery"}},
    ]
    parsed = parse_response(tok, ChatCodec(tok).encode_assistant(msgs[2]["content"]), prefix=prompt)
    assert parsed["content"] == "First the identification."
    assert parsed["tool_calls"][0]["function"]["arguments"] == {"tail": "N731QK"}
    final = msgs[-1]["content"]
    assert parse_response(tok, ChatCodec(tok).encode_assistant(final), prefix=prompt) == {
        "role": "assistant",
        "content": final,
    }


def sft_rows(n: int = 4) -> list[dict[str, Any]]:
    """Conversational SFT rows. Tool-call arguments and tools are JSON strings: ``datasets`` would
    otherwise merge every differing arguments dict into one struct with null-filled fields."""
    rows = []
    for i in range(n):
        msgs = conversation(tail=f"N{100 + i}QK", report=f"AC-{10000 + i}")
        for m in msgs:
            for call in m.get("tool_calls", []):
                call["arguments"] = json.dumps(call["arguments"])
        rows.append({"messages": msgs, "tools": json.dumps(TOOLS)})
    return rows


def test_trl_sft_assistant_only_loss(tok: PreTrainedTokenizerBase, tmp_path: Any) -> None:
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list(sft_rows())
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        assistant_only_loss=True,
        max_length=1024,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    trainer = SFTTrainer(
        model=tiny_qwen3(tok), processing_class=tok, train_dataset=dataset, args=args
    )
    assert trainer.chat_template is None  # our template was used as is
    row = trainer.train_dataset[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    replies = [m["content"] for m in sft_rows(1)[0]["messages"] if m["role"] == "assistant"]
    assert trained == [t for r in replies for t in ChatCodec(tok).encode_assistant(r)]
    result = trainer.train()
    assert trainer.state.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))


class Hangar:
    """A trivial TRL environment: one tool method; records the calls it gets."""

    calls: ClassVar[list[str]] = []  # class-level: TRL builds the instances itself

    def reset(self, **kwargs: Any) -> None:
        return None

    def get_aircraft(self, tail: str) -> str:
        """Identification record of an aircraft.

        Args:
            tail: Tail number, e.g. N731QK.
        """
        Hangar.calls.append(tail)
        return json.dumps({"tail": tail, "model": "A320"})


def overfit_tool_call(
    tok: PreTrainedTokenizerBase, prompt: list[dict[str, Any]]
) -> Qwen3ForCausalLM:
    """A tiny model that has memorised one reply: a call to ``get_aircraft``, so TRL's tool loop
    has a real call to parse and run (a random model almost never writes one)."""
    model = tiny_qwen3(tok)
    tools = [Hangar().get_aircraft]
    prompt_ids = ChatCodec(tok).encode_prompt(prompt, tools)
    reply = ChatCodec(tok).encode_assistant(render_tool_call("get_aircraft", {"tail": "N100QK"}))
    ids = torch.tensor([prompt_ids + reply])
    labels = torch.tensor([[-100] * len(prompt_ids) + reply])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model


def test_trl_grpo_environment_factory(
    tok: PreTrainedTokenizerBase, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory is "experimental"
    from trl import GRPOConfig, GRPOTrainer

    prompt = [{"role": "user", "content": "Check N100QK."}]
    dataset = Dataset.from_list([{"prompt": prompt}, {"prompt": prompt}])

    def reward(completions: list[list[dict[str, Any]]], **kwargs: Any) -> list[float]:
        return [float(len(c)) for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=48,
        max_tool_calling_iterations=1,
        temperature=0.2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    Hangar.calls = []
    trainer = GRPOTrainer(
        model=overfit_tool_call(tok, prompt),
        processing_class=tok,
        reward_funcs=reward,
        train_dataset=dataset,
        environment_factory=Hangar,
        args=args,
    )
    assert trainer.chat_template is None  # prefix-preserving: TRL kept our template
    trainer.train()
    assert trainer.state.global_step == 1
    assert Hangar.calls and set(Hangar.calls) == {"N100QK"}
