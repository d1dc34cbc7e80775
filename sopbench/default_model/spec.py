"""What determines the embedded default model: its spec (hashed into the cache key) and shape."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

#: Bumped when the build procedure changes in a way the spec does not show (invalidates caches).
RECIPE_VERSION = 5
BUILD_FILE = "mtrl_build.json"


@dataclass(frozen=True)
class DefaultModelSpec:
    """Everything that determines the default model; its hash names the cache directory."""

    architecture: Literal["qwen3", "llama"] = "llama"
    """Decoder layout. Qwen3 normalises queries and keys per head (q/k RMSNorm); Llama does not,
    and at this size forms its induction head much sooner (token-level copy loss 0.19 vs 2.0
    after 350 steps at lr 1e-3): q/k-norm caps the attention logits until its gains grow."""
    vocab_size: int = 2048
    """Tokenizer size incl. 256 bytes and 7 added tokens; BPE on the suite stops near ~2.8k."""
    hidden_size: int = 128
    """Model width (Qwen3 ``hidden_size``)."""
    num_layers: int = 2
    """Decoder layers: 2 beat 4 at equal wall time (twice the steps)."""
    num_heads: int = 4
    """Attention heads (also the KV heads: no grouping at this size)."""
    intermediate_size: int = 512
    """MLP width."""
    max_length: int = 4096
    """Longest training sequence in tokens (an aircraft trajectory is ~2–2.8k)."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate of every phase. At 3e-3 no induction head formed (token-level
    copy loss flat at ~3.1 nats after 600 steps); at 1e-3 it formed by step ~300."""
    induction_steps: int = 400
    """At most this many optimizer steps per attempt of the token-level copy stage."""
    induction_attempts: int = 4
    """Fresh initialisations tried until the copy stage reaches its target (the last one is kept
    whatever its loss)."""
    induction_target_loss: float = 0.3
    """The copy stage stops once its loss (mean of 20 steps) is below this: the head formed."""
    induction_batch_size: int = 32
    """Sequences per induction step."""
    keyed_steps: int = 200
    """Optimizer steps of keyed retrieval of id-like runs (``curriculum.keyed_runs``), right
    after the induction stage; 0 skips it. Without it tail numbers were never copied exactly."""
    keyed_batch_size: int = 16
    """Sequences per keyed-retrieval step."""
    keyed_width: int = 512
    """Tokens per keyed-retrieval sequence (answers sit up to ~500 tokens after their record)."""
    curriculum_steps: int = 200
    """Optimizer steps of the copy curriculum."""
    curriculum_batch_size: int = 32
    """Sequences per curriculum step (each ~60–120 tokens)."""
    sft_steps: int = 900
    """Optimizer steps on the demonstrations."""
    sft_batch_size: int = 2
    """Whole trajectories per SFT step."""
    verdict_steps: int = 400
    """At most this many steps of derived-verdict answers after SFT (``curriculum.verdict_answer``
    says why); 0 skips it and the refresh. Without it, greedy answers said "pass, pass,
    consistent" and ``aircraft_ready: false`` (strict TSR 0.00 on aircraft test; with it 0.34)."""
    verdict_batch_size: int = 32
    """Sequences per derived-verdict step."""
    verdict_answers_per_sequence: int = 4
    """Answers per derived-verdict sequence (~75 tokens each): earlier answers are distractors."""
    verdict_target_loss: float = 0.003
    """The derived-verdict stage stops once its mean loss over 20 steps is below this (the ready
    token's share of the loss, ~ln 2 / 40 per token while it is guessed, is gone)."""
    refresh_steps: int = 150
    """SFT steps on the demonstrations after the derived-verdict stage."""
    evidence_task: str = "aircraft_inspection"
    """Task of the evidence stage (``evidence.train_evidence`` says why); "" skips it and its
    refresh."""
    evidence_steps: int = 200
    """Optimizer steps of the evidence stage."""
    evidence_batch_size: int = 16
    """Reference episodes per evidence step (their shared system turn runs once per step)."""
    evidence_weight: float = 20.0
    """Loss weight of the answer's decision values against 1 for the model's other tokens."""
    evidence_recombined: float = 0.5
    """Share of evidence episodes on recombined aircraft (evidence of three train cases)."""
    evidence_refresh_steps: int = 100
    """SFT steps on the demonstrations after the evidence stage."""
    noise_rate: float = 0.05
    """Error rate of the noisy expert writing the demonstrations."""
    task_mix: tuple[tuple[str, int], ...] = (
        ("aircraft_inspection", 3),
        ("customer_service", 1),
        ("inventory_reconciliation", 1),
    )
    """``(task, repeats)``: train-split episodes per task, each repeat with other noise seeds."""
    cases_per_task: int | None = None
    """Use only the first N train cases of each task (tiny test builds); ``None``: all."""
    seed: int = 0
    """Seeds python, numpy, torch, the data order and the noisy expert."""
    copy_eval_items: int = 60
    """Held-out curriculum items whose greedy copy accuracy the build records."""
    num_threads: int = 2
    """``torch.set_num_threads`` during the build (2 cores is the budgeted machine)."""

    def spec_hash(self) -> str:
        """Short stable hash of the spec and the recipe version (the cache key)."""
        blob = json.dumps({"recipe": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_model(spec: DefaultModelSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised decoder over ``tokenizer``'s vocabulary (tied embeddings)."""
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_heads,
        "head_dim": spec.hidden_size // spec.num_heads,
        "max_position_embeddings": spec.max_length,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if spec.architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen3ForCausalLM(Qwen3Config(**common))
