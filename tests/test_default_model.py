"""The embedded default model: curriculum, build, determinism, cache, loading, and (slow) foothold.

Fast tests build a tiny spec (one task, a few cases, a few steps: ~16 s in all on 2 cores). The
slow tests check the shipped build and a from-scratch rebuild (~32 min on 2 cores) for the foothold
band on the aircraft_inspection test split with a small batched evaluator (greedy, and at
temperature 1.0).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from mtrl_local.chat import (
    ASSISTANT_HEADER,
    CHAT_TEMPLATE,
    IM_END,
    RESPONSE_TEMPLATE,
    render,
)
from mtrl_local.chat_codec import ChatCodec
from mtrl_local.evaluate import EvalConfig, evaluate
from mtrl_local.model_io import load_model
from mtrl_local.plugins import load_task
from rewards.dense import dense_reward
from sopbench.aircraft_inspection import rules as aircraft_rules
from sopbench.aircraft_inspection.cases import recombined_inputs
from sopbench.default_model import cache as cache_mod
from sopbench.default_model import evidence as evidence_mod
from sopbench.default_model import stages as stages_mod
from sopbench.default_model.build import build_default_model
from sopbench.default_model.cache import default_model_path
from sopbench.default_model.curriculum import (
    KINDS,
    VERDICTS,
    curriculum,
    induction_sequences,
    keyed_runs,
    verdict_answer,
)
from sopbench.default_model.data import jsonable_messages
from sopbench.default_model.phase import PhaseResult
from sopbench.default_model.spec import BUILD_FILE, DefaultModelSpec

TINY = DefaultModelSpec(
    vocab_size=400,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    induction_steps=2,
    induction_attempts=1,
    induction_batch_size=4,
    keyed_steps=2,
    keyed_batch_size=2,
    keyed_width=96,
    curriculum_steps=2,
    curriculum_batch_size=4,
    sft_steps=2,
    sft_batch_size=1,
    verdict_steps=2,
    verdict_batch_size=2,
    verdict_answers_per_sequence=2,
    refresh_steps=2,
    evidence_steps=2,
    evidence_batch_size=2,
    evidence_refresh_steps=2,
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


def test_induction_sequences_train_only_a_repeat_at_varying_distance() -> None:
    rng = random.Random(0)
    symbols, fillers, markers = list(range(10, 20)), list(range(100, 200)), (5, 6)
    inputs, labels = induction_sequences(rng, symbols, fillers, markers, 200, width=64)
    distances = set()
    for x, y in zip(inputs, labels, strict=True):
        assert len(x) == len(y) == 64
        trained = [i for i, v in enumerate(y) if v != -100]
        run = [x[i] for i in trained]
        assert 5 <= len(run) <= 15 and all(t in symbols for t in run)
        assert [y[i] for i in trained] == run
        assert trained == list(range(trained[0], trained[-1] + 1))  # one contiguous repeat
        assert x[trained[0] - 1] == 6 and x.count(6) == 1  # the start marker, once
        # the run appeared earlier, before the first marker, verbatim
        first = next(i for i in range(len(x)) if x[i : i + len(run)] == run)
        assert first < trained[0] - len(run) and x[first + len(run)] == 5  # then the end marker
        distances.add(trained[0] - first)
    assert len(distances) > 10  # no fixed offset: a positional shortcut cannot solve it


def test_keyed_runs_ask_for_one_record_that_is_in_the_window() -> None:
    rng = random.Random(1)
    digits, capitals = list(range(10, 20)), list(range(20, 44))  # capitals[0] plays "N"
    fillers, markers = list(range(100, 400)), (5, 6)
    inputs, labels = keyed_runs(rng, digits, capitals, fillers, markers, 300, width=256)
    distances, tail_shaped = set(), 0
    for x, y in zip(inputs, labels, strict=True):
        assert len(x) == len(y) == 256
        trained = [i for i, v in enumerate(y) if v != -100]
        run = [x[i] for i in trained]
        assert [y[i] for i in trained] == run and 4 <= len(run) <= 8
        assert trained == list(range(trained[0], trained[-1] + 1))
        assert x[trained[0] - 3] == 6 and x.count(6) == 1  # start marker, then the 2-token key
        key = x[trained[0] - 2 : trained[0]]
        # The key occurs once before the query, followed by exactly this run and the end marker.
        earlier = [i for i in range(trained[0] - 3) if x[i : i + 2] == key]
        assert len(earlier) == 1
        i = earlier[0] + 2
        assert x[i : i + len(run)] == run and x[i + len(run)] == 5
        distances.add(trained[0] - i)
        tail_shaped += run[0] == capitals[0] and len(run) == 6
    assert len(distances) > 50 and max(distances) > 150  # far and varied
    assert tail_shaped > 30


def test_verdict_answers_are_aircraft_answers_whose_ready_is_the_conjunction() -> None:
    # The skeleton (keys, order, separators, chat glue) is that of a real final answer.
    task = load_task("aircraft_inspection")
    episode = task.run_expert(task.cases("train")[0], seed=0, noise_rate=0.0)
    real = f"{ASSISTANT_HEADER}{episode.messages[-1]['content']}{IM_END}\n"
    value = r'("[^"]*"|true|false)'
    skeleton = re.sub(value, "V", real)
    rng = random.Random(4)
    ready = []
    for _ in range(400):
        text, spans = verdict_answer(rng)
        assert re.sub(value, "V", text) == skeleton
        answer = json.loads(text[text.index("{") : text.rindex("}") + 1])
        assert answer["aircraft_ready"] is all(answer[f] == good for f, good, _ in VERDICTS)
        ready.append(answer["aircraft_ready"])
        # Every value but aircraft_ready is random and untrained; nothing else is.
        assert [text[a:b] for a, b in spans] == [json.dumps(answer[f]) for f in list(answer)[:-1]]
    assert 0.35 < sum(ready) / len(ready) < 0.65


def test_verdict_stage_trains_ready_and_never_a_random_value(tiny_build: Path) -> None:
    model, tok = load_model(tiny_build)
    seen: list[tuple[list[int], list[int]]] = []

    def spy(name, model, make_batch, **kw):  # type: ignore[no-untyped-def]
        seen.append(make_batch())
        return PhaseResult(name, 0, 0, 0.0, None, None, [], 0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages_mod, "_token_stage", spy)
        stages_mod.train_verdicts(
            model,
            tok,
            steps=1,
            batch_size=3,
            per_sequence=2,
            learning_rate=1e-3,
            seed=0,
            target_loss=None,
        )
    ((x, y),) = seen
    for ids, labels in zip(x, y, strict=True):
        trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
        assert (
            trained.count("aircraft_ready") == 2
            and trained.count(" true") + trained.count(" false") == 2
        )
        for word in ("pass", "fail", "consistent", "none", "INC-", "DR-", "N1", "N2"):
            assert word not in trained


# -- evidence stage --------------------------------------------------------------------------------
def test_recombined_aircraft_take_each_verdict_from_its_source() -> None:
    task = load_task("aircraft_inspection")
    cases = task.cases("train")
    rng = random.Random(0)
    for _ in range(300):
        a, b, c = (rng.choice(cases) for _ in range(3))
        inputs = recombined_inputs(a.inputs, b.inputs, c.inputs, rng)
        assert task.check_inputs(inputs) is None
        truth = aircraft_rules.ground_truth("mix", inputs)
        for field, source in (
            ("mechanical_inspection_result", a),
            ("component_incident_response", a),
            ("component_mismatch_response", a),
            ("electrical_inspection_result", b),
            ("cross_check_reporting_response", c),
        ):
            assert (truth[field] in ("none", "pass", "consistent")) == (
                source.ground_truth[field] in ("none", "pass", "consistent")
            ), field
    # The tools expose everything the rules decide on a recombined aircraft too.
    episodes = [task.run_expert(task.recombined_case(cases, rng, i)) for i in range(20)]
    assert all(e.strict for e in episodes)
    assert {e.case.ground_truth["aircraft_ready"] for e in episodes} == {True, False}


def _aircraft_episode(index: int = 0) -> Any:
    task = load_task("aircraft_inspection")
    return task.run_expert(task.cases("train")[index])


def test_evidence_example_weights_the_answers_decisions(tiny_build: Path) -> None:
    _, tok = load_model(tiny_build)
    episode = _aircraft_episode(3)
    ids, weights = evidence_mod.evidence_example(tok, episode, 7.0)
    mask = tok.apply_chat_template(
        jsonable_messages(episode.messages),
        tools=episode.tools,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )["assistant_masks"]
    assert set(weights) == {0.0, 1.0, 7.0}
    # Only the model's own tokens are trained; the decisions are among them.
    assert [w > 0 for w in weights] == [bool(m) for m in mask]
    heavy = tok.decode([t for t, w in zip(ids, weights, strict=True) if w == 7.0])
    for field in evidence_mod.EVIDENCE_FIELDS:
        assert json.dumps(episode.case.ground_truth[field]) in heavy, field
    assert episode.case.ground_truth["tail_number"] not in heavy


def test_evidence_loss_with_a_shared_prefix_is_the_whole_sequence_loss(tiny_build: Path) -> None:
    model, tok = load_model(tiny_build)
    model = model.double().train()
    batch = [evidence_mod.evidence_example(tok, _aircraft_episode(i), 5.0) for i in range(3)]
    loss, prefix, shared = evidence_mod.evidence_loss(model, batch, int(tok.pad_token_id))
    loss.backward()
    assert prefix is not None and shared > 200  # the system turn
    prefix.backward()
    split = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    num, den = torch.zeros((), dtype=torch.float64), 0.0
    for ids, weights in batch:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits, torch.tensor(ids[1:]), reduction="none"
        )
        num = num + (token_loss * torch.tensor(weights[1:], dtype=torch.float64)).sum()
        den += sum(weights[1:])
    whole = num / den
    whole.backward()
    assert loss.item() == pytest.approx(whole.item(), rel=1e-9)
    for name, param in model.named_parameters():
        diff = (split[name] - param.grad).abs().max().item()
        assert diff <= 1e-9 * param.grad.abs().max().item(), name


# -- build -------------------------------------------------------------------------------------
def test_build_is_a_loadable_hf_dir_with_our_chat_format(tiny_build: Path) -> None:
    assert (tiny_build / "model.safetensors").is_file()
    record = json.loads((tiny_build / BUILD_FILE).read_text())
    assert record["spec"]["hidden_size"] == 32
    assert record["spec_hash"] == TINY.spec_hash()
    assert [p["name"] for p in record["phases"]] == [
        "induction",
        "keyed_runs",
        "curriculum",
        "sft",
        "verdicts",
        "sft_refresh",
        "evidence",
        "sft_refresh_evidence",
    ]
    assert {"torch", "transformers", "trl"} <= set(record["versions"])

    model, tok = load_model(tiny_build)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == IM_END
    assert tok.response_template == RESPONSE_TEMPLATE
    assert len(tok) <= 400
    ids = ChatCodec(tok).encode_prompt([{"role": "user", "content": "Check AC-12345."}])
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

    monkeypatch.setattr(cache_mod, "build_default_model", no_build)
    assert default_model_path(tmp_path, spec=TINY) == first
    monkeypatch.setenv("MTRL_CACHE", str(tmp_path))
    assert default_model_path(spec=TINY) == first
    assert not list(tmp_path.glob(".building-*"))  # the temporary build dir was renamed away


def test_a_shipped_build_of_the_same_spec_fills_the_cache_without_building(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_build(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("a shipped build of the same spec must not be rebuilt")

    monkeypatch.setattr(cache_mod, "SHIPPED_DIR", tiny_build)
    monkeypatch.setattr(cache_mod, "build_default_model", no_build)
    path = default_model_path(tmp_path / "cache", build=False, spec=TINY)
    assert (path / "model.safetensors").read_bytes() == (
        tiny_build / "model.safetensors"
    ).read_bytes()
    # another spec does not match the shipped build: it must be built (here: refused)
    other = DefaultModelSpec(**{**TINY.__dict__, "seed": 7})
    assert cache_mod.shipped_build(other) is None
    with pytest.raises(FileNotFoundError, match="make base-model"):
        default_model_path(tmp_path / "cache", build=False, spec=other)


def test_load_model_on_another_architecture(tiny_build: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_build)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    tok.chat_template = None  # a plain tokenizer dir: load_model attaches our template
    tok.save_pretrained(tmp_path)
    model, loaded = load_model(tmp_path)
    assert type(model).__name__ == "Qwen3ForCausalLM"
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


def test_the_shipped_build_is_of_the_current_default_spec() -> None:
    """A change to the spec or the recipe must come with a re-shipped build (make base-model)."""
    shipped = cache_mod.shipped_build(DefaultModelSpec())
    assert shipped is not None, "sopbench/default_model/shipped/ is missing or of another spec"
    record = json.loads((shipped / BUILD_FILE).read_text())
    assert record["spec"] == json.loads(json.dumps(DefaultModelSpec().__dict__))
    model, tok = load_model(shipped)
    assert type(model).__name__ == "LlamaForCausalLM" and tok.eos_token == IM_END


# -- the foothold (slow) -------------------------------------------------------------------------
def assert_foothold(path: Path) -> None:
    task = load_task("aircraft_inspection")
    for temperature in (0.0, 1.0):
        config = EvalConfig(temperature=temperature, device="cpu")
        report = evaluate([("model", path)], task, config, reward_fn=dense_reward)
        summary = report.results[0].summary
        assert 0.05 <= summary["tsr"] <= 0.50, summary
        assert summary["first_turn_tool_call_frac"] >= 0.90, summary


@pytest.mark.slow
def test_the_shipped_default_model_has_a_foothold() -> None:
    """The shipped build through the real evaluation harness, test split (~4 min)."""
    shipped = cache_mod.shipped_build(DefaultModelSpec())
    assert shipped is not None
    assert_foothold(shipped)


@pytest.mark.slow
def test_a_rebuilt_default_model_has_a_foothold(tmp_path: Path) -> None:
    """The default spec rebuilt from scratch (~32 min on 2 cores), then the same check."""
    assert_foothold(build_default_model(tmp_path / "default", DefaultModelSpec(), progress=False))
