"""Shared pieces of the trainer tests: a tiny model directory and a noisy-expert sampler.

The tiny model is random, so its own rollouts all score the same and carry no gradient. To test
the update path with real reward variance, :func:`noisy_expert_sampler` replays the suite's noisy
expert through the rollout engine as a :class:`ScriptedSampler` — the engine, environments,
rewards, advantages and losses are all real; only the sampler is scripted (its logprobs are a
constant, which the truncated IS weight handles like any off-policy gap).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Qwen3Config, Qwen3ForCausalLM

from mtrl_local.chat_codec import ChatCodec
from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.plugins import load_reward, load_task, resolve_model
from mtrl_local.rollout.scripted import ScriptedSampler
from mtrl_local.scoring import RewardResult
from mtrl_local.train.trainer import Trainer
from sopbench.default_model.tokenizer import train_tokenizer


def build_tiny_model(path: Path, task_name: str = "aircraft_inspection") -> Path:
    """A 1-layer, hidden-32 Qwen3 with a tokenizer trained on the task's own text."""
    task = load_task(task_name)
    texts = [task.sop]
    for case in task.cases("train")[:30]:
        texts += [m["content"] for m in task.run_expert(case, noise_rate=0.2).messages]
    tokenizer = train_tokenizer(texts, vocab_size=600)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def noisy_expert_sampler(
    tokenizer: Any, task_name: str, noise_rate: float = 0.3
) -> ScriptedSampler:
    """Replays the noisy expert of ``task_name``: sample ``s`` of a case uses noise seed ``s``."""
    task = load_task(task_name)
    cache: dict[str, list[list[int]]] = {}

    def script(key: str, turn: int, context: list[int]) -> list[int]:
        if key not in cache:
            case_id, _, sample = key.partition("#")
            episode = task.run_expert(
                task.case(case_id), noise_rate=noise_rate, noise_seed=int(sample.split("~")[0])
            )
            cache[key] = [
                ChatCodec(tokenizer).encode_assistant(m["content"])
                for m in episode.messages
                if m["role"] == "assistant"
            ]
        turns = cache[key]
        return turns[turn] if turn < len(turns) else [tokenizer.eos_token_id]

    return ScriptedSampler(script, tokenizer.eos_token_id, logprob=-1.0)


def digit_share_reward(messages: Any, ground_truth: Any, **_: Any) -> Any:
    """A reward that differs between a random model's samples (the share of digits it wrote),
    so that a run of the *real* sampler on the tiny model has advantages to learn from."""
    text = "".join(m.get("content") or "" for m in messages if m.get("role") == "assistant")
    return RewardResult(sum(c.isdigit() for c in text) / max(len(text), 1), {})


def make_trainer(cfg: MultiTurnRLConfig, **kwargs: Any) -> Trainer:
    """A trainer for ``cfg``'s names, resolved as the CLI resolves them."""
    assert cfg.task is not None
    return Trainer(
        cfg, load_task(cfg.task), load_reward(cfg.reward), resolve_model(cfg.model), **kwargs
    )
