"""The rollout engine and its samplers, on CPU with a suite-trained tokenizer and a tiny Qwen3.

Scripted samplers test the engine's bookkeeping (batching, finish reasons, malformed output,
teardown) and prove token-in/token-out; the transformers sampler is tested for KV reuse,
determinism and the logprobs it records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mtrl_local.chat_codec import ChatCodec
from mtrl_local.env import Environment, ToolLimits, render_final_response, render_tool_call
from mtrl_local.env.actions import FINAL_OPEN, TOOL_CALL_OPEN
from mtrl_local.metrics import FAILURE_RATE, TRUNCATED_FRAC, TURNS_MAX_TURNS_FRAC, rollout_metrics
from mtrl_local.plugins import load_task
from mtrl_local.rollout import (
    RolloutEngine,
    SamplingParams,
    ScriptedSampler,
    TransformersSampler,
    episode_key,
)
from mtrl_local.scoring import strict_score
from mtrl_local.trajectory import Trajectory
from rewards import dense_reward
from sopbench import Case
from sopbench.default_model.tokenizer import train_tokenizer

TASK = load_task("aircraft_inspection")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core box, 2 threads contend and run ~10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    cases = TASK.cases("train")[:12]
    episodes = [TASK.run_expert(c) for c in cases]
    texts = [TASK.sop, *(json.dumps(s) for s in episodes[0].tools)]
    texts += [m["content"] for e in episodes for m in e.messages]
    return train_tokenizer(texts, vocab_size=600)


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return TASK.cases("val")[:4]


def tiny_model(
    tok: PreTrainedTokenizerBase, seed: int = 0, arch: str = "qwen3"
) -> Qwen3ForCausalLM | LlamaForCausalLM:
    """A random 2-layer, hidden-32 decoder in float64 (so batch layouts cannot flip an argmax).

    ``arch``: ``qwen3`` or ``llama`` (the default model's layout).
    """
    torch.manual_seed(seed)
    config_cls = LlamaConfig if arch == "llama" else Qwen3Config
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model_cls = LlamaForCausalLM if arch == "llama" else Qwen3ForCausalLM
    return model_cls(config).double().eval()


def force_tool_call_after_newline(model: Qwen3ForCausalLM, tok: PreTrainedTokenizerBase) -> None:
    """Make the model open ``<tool_call>`` after every newline (so random turns go on).

    The rest of each turn is the random model's own output, so the block never closes: the
    environment answers with an error result and the episode continues to ``max_turns``.
    """
    newline = tok.encode("\n", add_special_tokens=False)[0]
    opener = tok.convert_tokens_to_ids(TOOL_CALL_OPEN)
    final = tok.convert_tokens_to_ids(FINAL_OPEN)  # a random final answer would end the episode
    last: dict[str, torch.Tensor] = {}

    def keep_ids(_: Any, args: Any, kwargs: dict[str, Any]) -> None:
        last["ids"] = kwargs["input_ids"][:, -1]

    def bias(_: Any, __: Any, logits: torch.Tensor) -> torch.Tensor:
        boost = torch.zeros_like(logits)
        boost[last["ids"] == newline, :, opener] = 1e4
        boost[..., final] = -1e4
        return logits + boost

    model.register_forward_pre_hook(keep_ids, with_kwargs=True)
    model.lm_head.register_forward_hook(bias)


def reference_script(tok: PreTrainedTokenizerBase, cases: list[Case]) -> dict[str, list[list[int]]]:
    """Each case's reference turns as ids, split oddly (a decode→encode round trip changes them)."""
    script = {}
    for case in cases:
        turns = []
        for m in TASK.run_expert(case).messages:
            if m["role"] == "assistant":
                text = m["content"]
                canonical = ChatCodec(tok).encode_assistant(text)
                for cut in range(len(text) // 2, len(text)):  # split inside a merged token
                    ids = tok.encode(text[:cut], add_special_tokens=False)
                    ids += ChatCodec(tok).encode_assistant(text[cut:])
                    if ids != canonical:
                        break
                turns.append(ids)
        script[episode_key(case.case_id, 0)] = turns
    return script


def eos(tok: PreTrainedTokenizerBase) -> int:
    return int(tok.eos_token_id)


def ids(tok: PreTrainedTokenizerBase, text: str, end: bool = True) -> list[int]:
    return (
        ChatCodec(tok).encode_assistant(text) if end else tok.encode(text, add_special_tokens=False)
    )


def checked(trajs: list[Trajectory]) -> list[Trajectory]:
    for t in trajs:
        t.check()
        assert Trajectory.from_json(json.loads(json.dumps(t.to_json()))) == t
    return trajs


# -- scripted: token in, token out -------------------------------------------------------------
def test_reference_turns_are_kept_token_for_token(
    tok: PreTrainedTokenizerBase, cases: list[Case]
) -> None:
    script = reference_script(tok, cases)
    sampler = ScriptedSampler(script, eos(tok))
    trajs = checked(
        RolloutEngine(sampler, tok, progress=False).run(
            TASK,
            cases,
            sampling=SamplingParams(max_tokens=200),
            reward_fn=dense_reward,
            scorer=strict_score,
        )
    )
    odd = 0
    for traj in trajs:
        turns = script[episode_key(traj.case_id, 0)]
        assert [traj.input_ids[s.start : s.end] for s in traj.turns] == turns
        for turn in turns:
            odd += tok.encode(tok.decode(turn), add_special_tokens=False) != turn
        assert traj.done_reason == "final_answer" and traj.strict == 1.0 and traj.reward == 1.0
        assert traj.metrics["completion"] == 1.0 and traj.tool_errors == 0
        assert all(s.finish_reason == "stop" for s in traj.turns)
        assert traj.group_id == traj.case_id and traj.sample_index == 0
        assert traj.behaviour_logprobs[traj.turns[0].start] == -1.0
        assert traj.behaviour_logprobs[: traj.prompt_len] == [0.0] * traj.prompt_len
    assert odd == sum(len(t) for t in script.values())  # every turn is a non-canonical encoding
    assert sorted(sampler.released) == sorted(script)


def test_all_active_episodes_share_one_generate_call(
    tok: PreTrainedTokenizerBase, cases: list[Case]
) -> None:
    call = ids(tok, render_tool_call("lookup_aircraft", {"aircraft_id": "AC-1"}))
    answer = ids(tok, render_final_response({"aircraft_ready": False}))

    def script(key: str, turn: int, context: list[int]) -> list[int]:
        case_index = [c.case_id for c in cases].index(key.split("#")[0])
        return answer if turn >= case_index else call  # case i answers at turn i

    sampler = ScriptedSampler(script, eos(tok))
    engine = RolloutEngine(sampler, tok, progress=False)
    trajs = checked(engine.run(TASK, cases, n_samples=2, sampling=SamplingParams(max_tokens=64)))
    assert [t.n_turns for t in trajs] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [len(keys) for keys in sampler.calls] == [8, 6, 4, 2]
    assert engine.stats.generate_calls == 4 and engine.stats.episodes == 8
    assert [t.sample_index for t in trajs] == [0, 1] * 4

    small = ScriptedSampler(script, eos(tok))
    RolloutEngine(small, tok, max_batch=3, progress=False).run(
        TASK, cases, n_samples=2, sampling=SamplingParams(max_tokens=64)
    )
    assert max(len(keys) for keys in small.calls) == 3


def test_finish_reasons_max_turns_and_truncation(
    tok: PreTrainedTokenizerBase, cases: list[Case]
) -> None:
    call = ids(tok, render_tool_call("lookup_aircraft", {"aircraft_id": "AC-1"}))
    long_text = ids(tok, "checking " * 40, end=False)
    script = {
        episode_key(cases[0].case_id, 0): [call] * 10,  # tool calls until max_turns
        episode_key(cases[1].case_id, 0): [call, long_text],  # no eos within budget: no_action
    }
    trajs = checked(
        RolloutEngine(ScriptedSampler(script, eos(tok)), tok, progress=False).run(
            TASK, cases[:2], sampling=SamplingParams(max_tokens=32), max_turns=3
        )
    )
    looping, cut = trajs
    assert looping.done_reason == "max_turns" and looping.n_turns == 3
    assert [s.finish_reason for s in looping.turns] == ["stop"] * 3
    assert cut.done_reason == "no_action" and cut.truncated
    assert [s.finish_reason for s in cut.turns] == ["stop", "length"]
    assert cut.turns[-1].n_tokens == 32 and cut.counters["truncated_turns"] == 1
    metrics = rollout_metrics(trajs, set())
    assert metrics[TRUNCATED_FRAC] == 0.5
    assert metrics[TURNS_MAX_TURNS_FRAC] == 0.5


def test_malformed_output_is_answered_and_counted(
    tok: PreTrainedTokenizerBase, cases: list[Case]
) -> None:
    good = {"aircraft_id": cases[0].inputs.get("aircraft_id", "AC-1")}
    broken = ids(tok, '<tool_call>{"name": "lookup_aircraft", "arguments": {</tool_call>')
    unknown = ids(tok, render_tool_call("launch_rocket", good))
    unterminated = ids(tok, '<tool_call>{"name": "lookup_aircraft", ' + '"x" ' * 40, end=False)
    after_final = ids(tok, render_final_response({"aircraft_ready": True}) + " Anything else?")
    script = {episode_key(cases[0].case_id, 0): [broken, unknown, unterminated, after_final]}
    sampler = ScriptedSampler(script, eos(tok))
    engine = RolloutEngine(sampler, tok, progress=False)
    (traj,) = checked(engine.run(TASK, cases[:1], sampling=SamplingParams(max_tokens=48)))
    assert [s.tool_errors for s in traj.turns] == [1, 1, 1, 0]
    assert [s.finish_reason for s in traj.turns] == ["stop", "stop", "length", "stop"]
    assert traj.done_reason == "final_answer" and traj.tool_errors == 3
    assert traj.counters == {
        "malformed_tool_calls": 2,  # broken JSON, unterminated block
        "unknown_tools": 1,
        "truncated_turns": 1,
        "text_after_final": 1,
    }
    tool_msgs = [m["content"] for m in traj.messages if m["role"] == "tool"]
    assert "not valid JSON" in tool_msgs[0] and "unknown tool" in tool_msgs[1]
    assert "unterminated" in tool_msgs[2]
    # The cut turn is closed by an eos the model did not sample (mask 0, logprob 0).
    end = traj.turns[2].end
    assert traj.input_ids[end] == eos(tok) and traj.loss_mask[end] == 0
    assert engine.stats.counters["malformed_tool_calls"] == 2


def test_context_window_ends_the_episode_with_length(
    tok: PreTrainedTokenizerBase, cases: list[Case]
) -> None:
    call = ids(tok, render_tool_call("lookup_aircraft", {"aircraft_id": "AC-1"}))
    script = {episode_key(cases[0].case_id, 0): [call] * 10}
    probe = RolloutEngine(ScriptedSampler(script, eos(tok)), tok, progress=False)
    prompt_len = probe.run(TASK, cases[:1], sampling=SamplingParams(), max_turns=1)[0].prompt_len
    limit = prompt_len + 3 * len(call)
    sampler = ScriptedSampler(script, eos(tok), max_context_len=limit)
    (traj,) = checked(
        RolloutEngine(sampler, tok, progress=False).run(
            TASK, cases[:1], sampling=SamplingParams(max_tokens=64)
        )
    )
    assert traj.done_reason == "length" and len(traj.input_ids) <= limit
    assert traj.counters["context_overflow"] == 1


class SpyTask:
    """``aircraft_inspection`` whose environments are recorded and can be made to fail."""

    def __init__(self, fail_reset: int | None = None, fail_step: int | None = None) -> None:
        self.name = TASK.name
        self.max_turns = TASK.max_turns
        self.envs: list[Environment] = []
        self.fail_reset, self.fail_step = fail_reset, fail_step

    def make_env(self) -> Environment:
        env = TASK.make_env()
        n = len(self.envs)
        self.envs.append(env)
        if n == self.fail_reset:

            def broken_setup(case: Any, seed: int) -> None:
                raise OSError("fixture store is gone")

            env.setup = broken_setup  # type: ignore[method-assign]
        if n == self.fail_step:

            def broken_call(name: Any, arguments: Any) -> Any:
                raise ConnectionError("sandbox died")

            env.call_tool = broken_call  # type: ignore[method-assign]
        return env


def open_envs(task: SpyTask) -> int:
    return sum(env._open for env in task.envs)


def test_teardown_when_generation_raises(tok: PreTrainedTokenizerBase, cases: list[Case]) -> None:
    call = ids(tok, render_tool_call("lookup_aircraft", {"aircraft_id": "AC-1"}))
    sampler = ScriptedSampler(lambda *_: call, eos(tok), fail_on_call=1)
    task = SpyTask()
    with pytest.raises(RuntimeError, match="scripted generation failure"):
        RolloutEngine(sampler, tok, progress=False).run(task, cases, sampling=SamplingParams())
    assert len(task.envs) == len(cases) and open_envs(task) == 0
    assert sorted(sampler.released) == sorted(episode_key(c.case_id, 0) for c in cases)


def test_environment_failures_mark_episodes_failed(
    tok: PreTrainedTokenizerBase, cases: list[Case]
) -> None:
    call = ids(tok, render_tool_call("lookup_aircraft", {"aircraft_id": "AC-1"}))
    answer = ids(tok, render_final_response({"aircraft_ready": False}))
    sampler = ScriptedSampler(lambda k, turn, c: call if turn == 0 else answer, eos(tok))
    task = SpyTask(fail_reset=1, fail_step=2)
    engine = RolloutEngine(sampler, tok, progress=False)
    trajs = checked(engine.run(task, cases, sampling=SamplingParams(), reward_fn=dense_reward))
    assert [t.failed for t in trajs] == [False, True, True, False]
    assert trajs[1].input_ids == [] and trajs[1].done_reason == "error"
    assert trajs[2].turns[0].finish_reason == "error" and trajs[2].done_reason == "error"
    assert engine.stats.failed == 2 and open_envs(task) == 0
    assert rollout_metrics(trajs, set())[FAILURE_RATE] == 0.5


# -- the transformers sampler -------------------------------------------------------------------
def multi_turn_run(
    tok: PreTrainedTokenizerBase,
    cases: list[Case],
    *,
    kv_reuse: bool = True,
    share_prompt: bool = True,
    max_batch: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    arch: str = "qwen3",
) -> tuple[list[Trajectory], TransformersSampler]:
    model = tiny_model(tok, arch=arch)
    force_tool_call_after_newline(model, tok)
    sampler = TransformersSampler(
        model, tok, kv_reuse=kv_reuse, max_batch=max_batch, share_prompt=share_prompt
    )
    engine = RolloutEngine(sampler, tok, max_batch=max_batch, progress=False)
    params = SamplingParams(temperature=temperature, max_tokens=6, seed=seed)
    return checked(engine.run(TASK, cases, sampling=params, max_turns=3)), sampler


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_kv_reuse_gives_the_same_greedy_tokens_as_re_prefill(
    tok: PreTrainedTokenizerBase, cases: list[Case], arch: str
) -> None:
    reused, sampler = multi_turn_run(tok, cases, kv_reuse=True, arch=arch)
    fresh, _ = multi_turn_run(tok, cases, kv_reuse=False, arch=arch)
    assert all(t.n_turns == 3 and t.done_reason == "max_turns" for t in reused)
    assert [t.input_ids for t in reused] == [t.input_ids for t in fresh]
    flat = [x for t in fresh for x in t.behaviour_logprobs]
    assert [x for t in reused for x in t.behaviour_logprobs] == pytest.approx(flat)
    # Turns 2 and 3 prefilled only the appended ids: most of the context was reused. The prompt
    # common to all episodes was prefilled once, not once per episode.
    shared = sampler.stats["shared_prefix_tokens"]
    assert shared > 0.5 * min(t.prompt_len for t in reused)
    first_turns = sum(t.prompt_len for t in reused) - (len(reused) - 1) * shared
    appended = sampler.stats["prefill_tokens"] - first_turns
    assert 0 < appended < 0.05 * sampler.stats["reused_tokens"]
    assert sampler.cached_episodes == 0  # released at the end


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prompt_attention_equals_per_row_attention(
    tok: PreTrainedTokenizerBase, cases: list[Case], arch: str, temperature: float
) -> None:
    """The prompt run once and attended to by every row (split attention, merged by log-sum-exp)
    gives the tokens and logprobs of every row holding its own copy (grouped-query heads too)."""
    shared, sampler = multi_turn_run(tok, cases, arch=arch, temperature=temperature, seed=3)
    own, plain = multi_turn_run(
        tok, cases, arch=arch, temperature=temperature, seed=3, share_prompt=False
    )
    assert [t.input_ids for t in shared] == [t.input_ids for t in own]
    flat = [x for t in own for x in t.behaviour_logprobs]
    assert [x for t in shared for x in t.behaviour_logprobs] == pytest.approx(flat, abs=1e-9)
    prompt = min(t.prompt_len for t in shared)
    assert sampler.stats["shared_prefix_tokens"] > 0.5 * prompt
    assert plain.stats["shared_prefix_tokens"] == 0
    saved = (len(shared) - 1) * sampler.stats["shared_prefix_tokens"]
    assert plain.stats["prefill_tokens"] - sampler.stats["prefill_tokens"] == saved
    assert sampler.model.config._attn_implementation == "sdpa"  # restored after each call


def test_a_new_prompt_replaces_the_shared_prefix_and_stale_entries_re_prefill(
    tok: PreTrainedTokenizerBase,
) -> None:
    """Turn 2 of the same episodes reuses the shared prefix; a call whose contexts do not start
    with it builds a new one, and an episode cached under the old one is re-prefilled (same
    tokens as a sampler that never shared)."""
    from mtrl_local.rollout import GenerationRequest

    model = tiny_model(tok)
    gen = torch.Generator().manual_seed(1)
    head = torch.randint(10, len(tok), (40,), generator=gen).tolist()
    other = torch.randint(10, len(tok), (40,), generator=gen).tolist()
    tails = [torch.randint(10, len(tok), (n,), generator=gen).tolist() for n in (5, 9, 3)]
    params = SamplingParams(temperature=0.0, max_tokens=4)

    def run(sampler: TransformersSampler) -> list[list[int]]:
        out = []
        ctx = {f"e{i}": head + t for i, t in enumerate(tails)}
        ctx["x0"], ctx["x1"] = other + tails[0], other + tails[1]
        for keys in (["e0", "e1", "e2"], ["e0", "e1", "e2"], ["x0", "x1"], ["e0", "e2"]):
            results = sampler.generate([GenerationRequest(k, ctx[k]) for k in keys], params)
            for k, r in zip(keys, results, strict=True):
                out.append(r.token_ids)
                ctx[k] = ctx[k] + r.token_ids + [11, 12]
        return out

    sharing = TransformersSampler(model, tok)
    assert run(sharing) == run(TransformersSampler(model, tok, share_prompt=False))
    # Built for e*, rebuilt for x*, rebuilt for e* (e0 and e2 re-prefilled their own ids).
    assert sharing.stats["shared_prefix_tokens"] == 40 * 3


def test_sampling_is_seeded_and_independent_of_batch_layout(
    tok: PreTrainedTokenizerBase, cases: list[Case]
) -> None:
    a, _ = multi_turn_run(tok, cases, temperature=1.0, seed=7)
    b, _ = multi_turn_run(tok, cases, temperature=1.0, seed=7, max_batch=1)
    c, _ = multi_turn_run(tok, cases, temperature=1.0, seed=8)
    assert [t.input_ids for t in a] == [t.input_ids for t in b]
    assert [t.input_ids for t in a] != [t.input_ids for t in c]


def test_recorded_logprobs_are_the_raw_policy_logprobs(
    tok: PreTrainedTokenizerBase, cases: list[Case]
) -> None:
    model = tiny_model(tok)
    sampler = TransformersSampler(model, tok)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=8, seed=1)
    trajs = checked(
        RolloutEngine(sampler, tok, progress=False).run(TASK, cases[:2], sampling=params)
    )
    for traj in trajs:
        with torch.no_grad():
            logits = model(torch.tensor([traj.input_ids])).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        for span in traj.turns:
            for pos in range(span.start, span.end):
                expected = float(logp[pos - 1, traj.input_ids[pos]])
                assert traj.behaviour_logprobs[pos] == pytest.approx(expected, abs=1e-6)


def test_rows_finishing_early_are_compacted_and_reused(tok: PreTrainedTokenizerBase) -> None:
    """Rows with different budgets leave the batch mid-decode; their caches still serve turn 2."""
    from mtrl_local.rollout import GenerationRequest

    model = tiny_model(tok)
    budgets = [1, 2, 3, 8, 8, 8]
    gen = torch.Generator().manual_seed(0)
    contexts = [torch.randint(10, len(tok), (n,), generator=gen).tolist() for n in (9, 30, 17)] * 2
    params = SamplingParams(temperature=0.0, max_tokens=8)

    def two_turns(sampler: TransformersSampler) -> list[list[int]]:
        out = []
        ctx = contexts
        for turn in range(2):
            requests = [GenerationRequest(f"e{i}", c, budgets[i]) for i, c in enumerate(ctx)]
            results = sampler.generate(requests, params)
            out += [r.token_ids for r in results]
            glue = [[11, 12, 13][: i % 3 + 1] for i in range(len(ctx))]
            ctx = [c + r.token_ids + g for c, r, g in zip(ctx, results, glue, strict=True)]
            del turn
        return out

    reused = TransformersSampler(model, tok, kv_reuse=True)
    assert two_turns(reused) == two_turns(TransformersSampler(model, tok, kv_reuse=False))
    assert reused.stats["reused_tokens"] > 0 and reused.cached_episodes == 6
    assert reused.stats["compactions"] == 2  # one per turn: 3 of 6 rows done after step 3
    reused.release("e0")
    reused.load_state_dict(model.state_dict(), version=3)
    assert reused.cached_episodes == 0 and reused.policy_version == 3


def test_the_engines_tool_limits_reach_every_environment(
    tok: PreTrainedTokenizerBase, cases: list[Case]
) -> None:
    answer = ids(tok, render_final_response({"aircraft_ready": False}))
    script = {
        episode_key(c.case_id, 0): [
            ids(tok, render_tool_call("lookup_aircraft", {"aircraft_id": c.inputs["aircraft_id"]})),
            answer,
        ]
        for c in cases[:2]
    }
    engine = RolloutEngine(
        ScriptedSampler(script, eos(tok)),
        tok,
        progress=False,
        tool_limits=ToolLimits(timeout_s=0, max_output_chars=40),
    )
    trajs = checked(engine.run(TASK, cases[:2], sampling=SamplingParams(max_tokens=64)))
    for traj in trajs:
        [result] = [m["content"] for m in traj.messages if m["role"] == "tool"]
        assert result[:40] and result[40:].startswith("…[truncated "), result
