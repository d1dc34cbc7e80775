"""Rollout throughput: the engine vs a batched ``model.generate`` ceiling and a one-at-a-time loop.

Marked ``slow`` (the default run deselects it with ``-m 'not slow'``). Run::

    .venv/bin/python -m pytest tests/bench -m slow -p no:cacheprovider --log-cli-level=INFO \\
        --benchmark-disable-gc

Model: a random decoder of the default model's shape (``DefaultModelSpec``:
hidden 128, 2 layers, 4 heads, MLP 512, tied embeddings) over a tokenizer trained on the suite.
A random model writes no tool calls and stops at random, so turns are forced to realistic shapes:
eos is banned (``ignore_eos``), every turn samples exactly ``TOKENS_PER_TURN`` tokens, and the
token after each newline is forced to ``<tool_call>`` (so the unclosed call gets an error result
and the episode goes on to ``MAX_TURNS``). Tool results are therefore short error strings, not the
50–100-token records of real turns (prefill per turn is a little smaller than in real rollouts).

Measured in one run, on ``aircraft_inspection`` cases:

* engine: ``N_EPISODES`` concurrent episodes (one ``generate`` call per turn, KV reuse on);
* ceiling: one batched ``model.generate`` at the same batch, a prompt of the same length, the same
  number of new tokens per row as an episode samples in total (sampling, ``min_new_tokens``);
* one at a time: the same engine and sampler at ``max_batch=1`` on ``N_SERIAL`` episodes;
* KV reuse on vs off on ``N_KV`` episodes (off re-prefills the whole context every turn);
* the shared prompt (run once, attended to by every row) vs each row holding its own copy, on
  ``N_EPISODES`` episodes.

Numbers on a shared CPU are noisy; threads default to 1 (``MTRL_BENCH_THREADS``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtrl_local.chat_codec import ChatCodec
from mtrl_local.env.actions import FINAL_OPEN, TOOL_CALL_OPEN
from mtrl_local.plugins import load_task
from mtrl_local.rollout import RolloutEngine, SamplingParams, TransformersSampler
from sopbench.default_model.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

TASK = load_task("aircraft_inspection")
N_EPISODES = int(os.environ.get("MTRL_BENCH_EPISODES", "64"))
N_SERIAL = int(os.environ.get("MTRL_BENCH_SERIAL", "2"))
N_KV = int(os.environ.get("MTRL_BENCH_KV", "16"))
MAX_TURNS = int(os.environ.get("MTRL_BENCH_TURNS", "6"))
TOKENS_PER_TURN = 24


@pytest.fixture(scope="module", autouse=True)
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MTRL_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    episodes = [TASK.run_expert(c) for c in TASK.cases("train")[:40]]
    texts = [TASK.sop, *(json.dumps(s) for s in episodes[0].tools)]
    texts += [m["content"] for e in episodes for m in e.messages]
    return train_tokenizer(texts, vocab_size=2048)


def default_shaped_model(tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Random weights in the default model's shape (the built default is not needed here)."""
    from sopbench.default_model.spec import DefaultModelSpec, make_model

    torch.manual_seed(0)
    return make_model(DefaultModelSpec(), tok).eval()


def force_multi_turn(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """The token after every newline is ``<tool_call>`` (see the module docstring)."""
    newline = tok.encode("\n", add_special_tokens=False)[0]
    opener = tok.convert_tokens_to_ids(TOOL_CALL_OPEN)
    final = tok.convert_tokens_to_ids(FINAL_OPEN)  # a random final answer would end the episode
    last: dict[str, torch.Tensor] = {}

    def keep_ids(_: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        last["ids"] = (args[0] if ids is None else ids)[:, -1]

    def bias(_: Any, __: Any, logits: torch.Tensor) -> torch.Tensor:
        boost = torch.zeros_like(logits)
        boost[last["ids"] == newline, :, opener] = 1e4
        boost[..., final] = -1e4
        return logits + boost

    model.register_forward_pre_hook(keep_ids, with_kwargs=True)
    model.lm_head.register_forward_hook(bias)


PARAMS = SamplingParams(temperature=1.0, max_tokens=TOKENS_PER_TURN, seed=0, ignore_eos=True)


def run_engine(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    n: int,
    *,
    max_batch: int = 64,
    kv_reuse: bool = True,
    share_prompt: bool = True,
) -> dict[str, float]:
    sampler = TransformersSampler(
        model, tok, kv_reuse=kv_reuse, max_batch=max_batch, share_prompt=share_prompt
    )
    engine = RolloutEngine(sampler, tok, max_batch=max_batch, progress=False)
    trajs = engine.run(TASK, TASK.cases("train")[:n], sampling=PARAMS, max_turns=MAX_TURNS)
    assert all(t.n_turns == MAX_TURNS for t in trajs), [t.done_reason for t in trajs]
    s = engine.stats
    return {
        "tokens": s.sampled_tokens,
        "seconds": s.seconds,
        "tok_s": s.tokens_per_s,
        "calls": s.generate_calls,
        "final_len": max(len(t.input_ids) for t in trajs),
        "prefill_tokens": sampler.stats["prefill_tokens"],
        "shared_prefix_tokens": sampler.stats["shared_prefix_tokens"],
    }


def run_ceiling(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt_len: int, new_tokens: int
) -> dict[str, float]:
    """Batched ``model.generate``: the same batch, prompt length and new tokens per row."""
    prompt = ChatCodec(tok).encode_prompt(TASK.make_env().reset(TASK.cases("train")[0]))[
        :prompt_len
    ]
    ids = torch.tensor([prompt] * N_EPISODES)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tok.pad_token_id,
        )
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * N_EPISODES
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def test_bench_rollout_throughput(benchmark: Any, tok: PreTrainedTokenizerBase) -> None:
    plain = default_shaped_model(tok)
    forced = default_shaped_model(tok)
    force_multi_turn(forced, tok)
    env = TASK.make_env()
    prompt_len = len(
        ChatCodec(tok).encode_prompt(env.reset(TASK.cases("train")[0]), env.tool_schemas())
    )

    engine = benchmark.pedantic(run_engine, args=(forced, tok, N_EPISODES), rounds=1, iterations=1)
    ceiling = run_ceiling(plain, tok, prompt_len, MAX_TURNS * TOKENS_PER_TURN)
    serial = run_engine(forced, tok, N_SERIAL, max_batch=1)
    kv_on = run_engine(forced, tok, N_KV)
    kv_off = run_engine(forced, tok, N_KV, kv_reuse=False)
    own_prompt = run_engine(forced, tok, N_EPISODES, share_prompt=False)

    results = {
        "prompt_len": prompt_len,
        "episodes": N_EPISODES,
        "turns": MAX_TURNS,
        "tokens_per_turn": TOKENS_PER_TURN,
        "threads": torch.get_num_threads(),
        "engine": engine,
        "ceiling": ceiling,
        "one_at_a_time": serial,
        "kv_on": kv_on,
        "kv_off": kv_off,
        "own_prompt_copies": own_prompt,
        "engine_over_ceiling": engine["tok_s"] / ceiling["tok_s"],
        "engine_over_one_at_a_time": engine["tok_s"] / serial["tok_s"],
        "kv_on_over_off": kv_on["tok_s"] / kv_off["tok_s"],
        "shared_prompt_over_own_copies": engine["tok_s"] / own_prompt["tok_s"],
    }
    benchmark.extra_info.update(results)
    logger.info("rollout benchmark:\n%s", json.dumps(results, indent=2))
    out = os.environ.get("MTRL_BENCH_OUT")
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    assert engine["calls"] == MAX_TURNS  # every turn of every episode in one generate call
