"""The embedded default model: curriculum, build, determinism, cache, loading, and (slow) foothold.

Fast tests build a tiny spec (one task, a few cases, a few steps: ~16 s in all on 2 cores). The
slow test builds the real default spec (~17 min on 2 shared CPU cores) and checks the foothold
band on the aircraft_inspection test split with a small batched evaluator (greedy, and at
temperature 1.0).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mtrl_local.chat import (
    CHAT_TEMPLATE,
    IM_END,
    RESPONSE_TEMPLATE,
    encode_continuation,
    encode_prompt,
    render,
)
from mtrl_local.env import Episode, parse_tool_calls
from mtrl_local.models import default as default_mod
from mtrl_local.models.curriculum import KINDS, curriculum
from mtrl_local.models.default import (
    BUILD_FILE,
    DefaultModelSpec,
    build_default_model,
    default_model_path,
    load_model,
)
from rewards.strict import field_matches, parse_answer, strict_score
from sopbench import get_task

TINY = DefaultModelSpec(
    vocab_size=400,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    curriculum_steps=2,
    curriculum_batch_size=4,
    sft_steps=2,
    sft_batch_size=1,
    task_mix=(("customer_service", 1),),
    cases_per_task=6,
    copy_eval_items=3,
    num_threads=1,
)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_default_model(tmp_path_factory.mktemp("tiny") / "model", TINY, progress=False)


# -- curriculum --------------------------------------------------------------------------------
def test_curriculum_yields_three_kinds_with_correct_targets() -> None:
    items = list(curriculum(60, seed=3))
    assert {x.kind for x in items} == set(KINDS)
    assert [x.kind for x in items[:3]] == list(KINDS)
    for x in items:
        if x.kind == "copy_id":
            ((key, ident),) = json.loads(x.target).items()
            assert f" {ident} " in x.prompt and f'{{"{key}": <the id>}}' in x.prompt
        elif x.kind == "repeat":
            assert x.prompt.split("\nRepeat: ", 1)[1] == x.target
        else:
            obj_line, question = x.prompt.split("\n", 1)
            obj = json.loads(obj_line)
            key = re.match(r"What is (\S+)\?", question).group(1)  # type: ignore[union-attr]
            assert json.loads(x.target) == {key: obj[key]}
        assert x.messages()[1] == {"role": "assistant", "content": x.target}
    assert [x.prompt for x in curriculum(9, seed=3)] == [x.prompt for x in items[:9]]


# -- build -------------------------------------------------------------------------------------
def test_build_is_a_loadable_hf_dir_with_our_chat_format(tiny_build: Path) -> None:
    assert (tiny_build / "model.safetensors").is_file()
    record = json.loads((tiny_build / BUILD_FILE).read_text())
    assert record["spec"]["hidden_size"] == 32
    assert record["spec_hash"] == TINY.spec_hash()
    assert [p["name"] for p in record["phases"]] == ["curriculum", "sft"]
    assert {"torch", "transformers", "trl"} <= set(record["versions"])

    model, tok = load_model(tiny_build)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == IM_END
    assert tok.response_template == RESPONSE_TEMPLATE
    assert len(tok) <= 400
    ids = encode_prompt(tok, [{"role": "user", "content": "Check AC-12345."}])
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(ids)


def test_build_is_deterministic_given_seeds(tiny_build: Path, tmp_path: Path) -> None:
    again = build_default_model(tmp_path / "again", TINY, progress=False)
    a = json.loads((tiny_build / BUILD_FILE).read_text())
    b = json.loads((again / BUILD_FILE).read_text())
    assert AutoTokenizer.from_pretrained(tiny_build).get_vocab() == (
        AutoTokenizer.from_pretrained(again).get_vocab()
    )
    for pa, pb in zip(a["phases"], b["phases"], strict=True):
        assert pa["first_loss"] == pytest.approx(pb["first_loss"], rel=1e-5)
    other = build_default_model(
        tmp_path / "other", DefaultModelSpec(**{**TINY.__dict__, "seed": 1}), progress=False
    )
    c = json.loads((other / BUILD_FILE).read_text())
    assert c["phases"][0]["first_loss"] != a["phases"][0]["first_loss"]


def test_cache_is_reused_and_keyed_by_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError):
        default_model_path(tmp_path, build=False, spec=TINY)
    first = default_model_path(tmp_path, spec=TINY, progress=False)
    assert first.parent == tmp_path and TINY.spec_hash() in first.name

    def no_build(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("a cached build must not be rebuilt")

    monkeypatch.setattr(default_mod, "build_default_model", no_build)
    assert default_model_path(tmp_path, spec=TINY) == first
    monkeypatch.setenv("MTRL_CACHE", str(tmp_path))
    assert default_model_path(spec=TINY) == first
    assert not list(tmp_path.glob(".building-*"))  # the temporary build dir was renamed away


def test_load_model_on_another_architecture(tiny_build: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_build)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.chat_template = None  # a plain tokenizer dir: load_model attaches our template
    tok.save_pretrained(tmp_path)
    model, loaded = load_model(tmp_path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert loaded.chat_template == CHAT_TEMPLATE
    assert not model.training


def test_load_model_keeps_a_tokenizers_own_template(tiny_build: Path, tmp_path: Path) -> None:
    own = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    model, tok = load_model(tiny_build)
    tok.chat_template = own
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = load_model(tmp_path)
    assert loaded.chat_template == own
    assert render(loaded, [{"role": "user", "content": "hi"}]) == "[user] hi\n"


# -- the foothold (slow) -------------------------------------------------------------------------
@torch.no_grad()
def evaluate_aircraft(
    path: Path, temperature: float, split: str = "test", max_new_tokens: int = 160
) -> dict[str, Any]:
    """Batched per-turn ``generate`` driving real Episodes; strict TSR, first-turn well-formed.

    A stand-in until the evaluation harness lands: it re-encodes nothing (ids are appended per
    DESIGN §3) but recomputes the prompt at each turn (no KV cache across turns).
    """
    torch.manual_seed(0)
    model, tok = load_model(path)
    task = get_task("aircraft_inspection")
    cases = task.cases(split)  # type: ignore[arg-type]
    episodes, ids = [], []
    for case in cases:
        env = task.make_env()
        ep = Episode(env, case, seed=0, max_turns=task.max_turns)
        ids.append(encode_prompt(tok, ep.reset(), env.tool_schemas()))
        episodes.append(ep)
    names = {t["function"]["name"] for t in task.make_env().tool_schemas()}
    eos, pad = tok.eos_token_id, tok.pad_token_id
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    while active := [i for i, e in enumerate(episodes) if not e.done]:
        for s in range(0, len(active), 50):
            chunk = active[s : s + 50]
            width = max(len(ids[i]) for i in chunk)
            x = torch.full((len(chunk), width), pad)
            mask = torch.zeros_like(x)
            for r, i in enumerate(chunk):  # left padding
                x[r, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]) :] = 1
            out = model.generate(
                x,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                **sampling,
            )
            for r, i in enumerate(chunk):
                new = out[r, width:].tolist()
                new = new[: new.index(eos) + 1] if eos in new else [*new, eos]
                step = episodes[i].step(tok.decode(new[:-1], skip_special_tokens=True))
                if not step.done:
                    ids[i] = ids[i] + new + encode_continuation(tok, step.messages)
    first_ok = 0
    fields: dict[str, float] = {}
    for ep, case in zip(episodes, cases, strict=True):
        first = next(m for m in ep.messages if m["role"] == "assistant")["content"]
        calls = parse_tool_calls(first)
        first_ok += int(
            bool(calls)
            and calls[0].error is None
            and calls[0].name in names
            and isinstance(calls[0].arguments, dict)
            and calls[0].arguments.get("aircraft_id") == case.inputs["aircraft_id"]
        )
        for k, v in field_matches(parse_answer(ep.messages), case.ground_truth).items():
            fields[k] = fields.get(k, 0.0) + v / len(cases)
    scores = [
        strict_score(e.messages, c.ground_truth) for e, c in zip(episodes, cases, strict=True)
    ]
    return {
        "tsr": sum(scores) / len(cases),
        "first_turn_ok": first_ok / len(cases),
        "fields": fields,
    }


@pytest.mark.slow
@pytest.mark.xfail(
    reason="foothold not reached yet: ids are not copied (see mtrl_local/models/default.py)",
    strict=False,
)
def test_default_model_has_a_foothold(tmp_path: Path) -> None:
    """Runtime measured: build 997 s (2 shared CPU cores) + ~140 s evaluation per temperature."""
    path = build_default_model(tmp_path / "default", DefaultModelSpec(), progress=False)
    for temperature in (0.0, 1.0):
        result = evaluate_aircraft(path, temperature)
        assert 0.05 <= result["tsr"] <= 0.50, result
        assert result["first_turn_ok"] >= 0.90, result
