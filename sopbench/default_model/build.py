"""Building the embedded default model: a tiny decoder trained locally to a foothold on the suite.

Nothing can be downloaded, and RL amplifies only what the model can already do, so the suite
builds a starting point on the CPU (:func:`build_default_model`), every phase budgeted in
optimizer steps and seeded:

1. a byte-level BPE tokenizer trained on the suite's own text (SOPs, tool schemas and train-split
   trajectories; one token per digit and per capital, :mod:`~sopbench.default_model.tokenizer`);
2. a randomly initialised ``LlamaForCausalLM`` of ~0.75M parameters (hidden 128, 2 layers);
3. a token-level induction stage, restarted from a fresh init while it stalls, a token-level
   keyed retrieval of id-like runs, then a text copy curriculum
   (:mod:`~sopbench.default_model.curriculum`, :mod:`~sopbench.default_model.stages`) — without
   them a tiny model does not learn to copy an id from the user message into a tool call, nor a
   tail number out of a tool result;
4. a warm start with TRL's ``SFTTrainer(assistant_only_loss=True)`` on noisy-expert
   demonstrations of the **train** split of every task (:mod:`~sopbench.default_model.sft`);
5. a derived-verdict stage (``aircraft_ready`` = the conjunction of the answer's own verdicts,
   :func:`~sopbench.default_model.curriculum.verdict_answer`) and a short SFT refresh;
6. an evidence stage (:mod:`~sopbench.default_model.evidence`): whole reference episodes of the
   aircraft train split, some on recombined aircraft, with the answer's decisions weighted, so
   that verdicts follow the tool results; then a short SFT refresh.

The aim is a *foothold*, not a solved task: the model follows the procedure, writes well-formed
tool calls with the right ids and a parseable answer, and guesses most rule-derived fields, so
strict TSR sits inside (5 %, 50 %) and RL has room to raise it. Its measured numbers are in the
README ("The embedded default model"). The build is a client of the library (chat format, shared
prefix); the library knows nothing of it.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
import transformers
import trl
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sopbench.base import ExpertEpisode
from sopbench.default_model.curriculum import CopyExample, curriculum
from sopbench.default_model.data import demonstration_episodes, demonstration_rows, suite_texts
from sopbench.default_model.evidence import train_evidence
from sopbench.default_model.phase import PhaseResult
from sopbench.default_model.sft import train_phase
from sopbench.default_model.spec import BUILD_FILE, RECIPE_VERSION, DefaultModelSpec, make_model
from sopbench.default_model.stages import (
    copy_accuracy,
    train_curriculum,
    train_induction,
    train_keyed_runs,
    train_verdicts,
)
from sopbench.default_model.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Data:
    """What every stage trains on, made once at the start of a build."""

    episodes: list[ExpertEpisode]
    tokenizer: PreTrainedTokenizerBase
    demo_rows: list[dict[str, Any]]
    curriculum: list[CopyExample]
    held_out: list[CopyExample]
    seconds: float


def build_default_model(
    out_dir: str | Path, spec: DefaultModelSpec | None = None, progress: bool = True
) -> Path:
    """Build the default model into ``out_dir`` (created; must be empty or absent).

    Writes a Hugging Face model directory (``save_pretrained``: config, safetensors weights,
    tokenizer with our chat template and ``response_template``) and ``mtrl_build.json`` with the
    spec, versions, wall time and what the build measured. Returns ``out_dir``.
    """
    spec = spec or DefaultModelSpec()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(spec.num_threads)
    # Tiny weights and Adam moments drift into denormal floats, which x86 CPUs process up to
    # ~100x slower; flushing them to zero changes no measurable result.
    # (``set_flush_denormal`` returns whether the CPU supports it, not the previous state, and
    # nothing reads that state: restore the process default, off, in ``finally``.)
    torch.set_flush_denormal(True)
    try:
        _seed_everything(spec.seed)
        data = _prepare(spec)
        model, phases = _token_stages(spec, data.tokenizer)
        _seed_everything(spec.seed)
        phases += _text_stages(spec, model, data, progress)
        copy_acc = copy_accuracy(model, data.tokenizer, data.held_out)
        n = len(data.held_out)
        logger.info("held-out copy accuracy (greedy, %d items): %.3f", n, copy_acc)
        _write(out, spec, model, data, phases, copy_acc, time.perf_counter() - t_start)
        return out
    finally:
        torch.set_num_threads(threads_before)
        torch.set_flush_denormal(False)


def _prepare(spec: DefaultModelSpec) -> _Data:
    """Demonstrations, the tokenizer trained on the suite's text, and the copy curriculum."""
    t0 = time.perf_counter()
    episodes = demonstration_episodes(
        spec.task_mix, spec.noise_rate, spec.seed, spec.cases_per_task
    )
    tokenizer = train_tokenizer(suite_texts(episodes), vocab_size=spec.vocab_size)
    demo_rows = demonstration_rows(episodes)
    n_cur = spec.curriculum_steps * spec.curriculum_batch_size
    cur_items = list(curriculum(n_cur, seed=spec.seed))
    held_out = list(curriculum(spec.copy_eval_items, seed=10_000 + spec.seed))
    data = _Data(episodes, tokenizer, demo_rows, cur_items, held_out, time.perf_counter() - t0)
    logger.info(
        "data: %d demonstrations, %d curriculum items, tokenizer %d tokens (%.1fs)",
        *(len(demo_rows), len(cur_items), len(tokenizer), data.seconds),
    )
    return data


def _token_stages(
    spec: DefaultModelSpec, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, list[PhaseResult]]:
    """A fresh model through the induction stage (restarted while it stalls), then keyed runs."""
    # Whether the induction head forms within a few hundred steps depends on the random
    # initialisation (by step ~300 for some inits, not by 1,100 for others), so a stalled attempt
    # is restarted from a fresh init. Seeds are derived from spec.seed: the build stays
    # deterministic.
    phases = []
    for attempt in range(spec.induction_attempts):
        _seed_everything(spec.seed * 1000 + attempt)
        model = make_model(spec, tokenizer)
        induction = train_induction(
            model,
            tokenizer,
            steps=spec.induction_steps,
            batch_size=spec.induction_batch_size,
            learning_rate=spec.learning_rate,
            seed=spec.seed * 1000 + attempt,
            target_loss=spec.induction_target_loss,
        )
        phases.append(induction)
        if induction.reached_target:
            break
        logger.warning("induction head not formed (attempt %d): new init", attempt + 1)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %s, %d parameters", type(model).__name__, n_params)
    if spec.keyed_steps > 0:
        _seed_everything(spec.seed)
        phases.append(
            train_keyed_runs(
                model,
                tokenizer,
                steps=spec.keyed_steps,
                batch_size=spec.keyed_batch_size,
                width=spec.keyed_width,
                learning_rate=spec.learning_rate,
                seed=spec.seed,
            )
        )
    return model, phases


def _text_stages(
    spec: DefaultModelSpec, model: PreTrainedModel, data: _Data, progress: bool
) -> list[PhaseResult]:
    """The copy curriculum, SFT, the derived verdicts and the evidence, each with its refresh."""
    tokenizer = data.tokenizer
    with tempfile.TemporaryDirectory(prefix="mtrl-build-") as work:

        def sft(name: str, steps: int) -> PhaseResult:
            return train_phase(
                name,
                model,
                tokenizer,
                data.demo_rows,
                steps=steps,
                batch_size=spec.sft_batch_size,
                learning_rate=spec.learning_rate,
                max_length=spec.max_length,
                seed=spec.seed,
                work_dir=Path(work),
                progress=progress,
            )

        phases = [
            train_curriculum(
                model,
                tokenizer,
                data.curriculum,
                steps=spec.curriculum_steps,
                batch_size=spec.curriculum_batch_size,
                learning_rate=spec.learning_rate,
                seed=spec.seed,
            ),
            sft("sft", spec.sft_steps),
        ]
        if spec.verdict_steps > 0:
            _seed_everything(spec.seed)
            phases.append(_verdicts(spec, model, tokenizer))
            phases.append(sft("sft_refresh", spec.refresh_steps))
        if spec.evidence_task and spec.evidence_steps > 0:
            _seed_everything(spec.seed)
            phases.append(_evidence(spec, model, tokenizer))
            _seed_everything(spec.seed)
            phases.append(sft("sft_refresh_evidence", spec.evidence_refresh_steps))
    return phases


def _verdicts(
    spec: DefaultModelSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> PhaseResult:
    return train_verdicts(
        model,
        tokenizer,
        steps=spec.verdict_steps,
        batch_size=spec.verdict_batch_size,
        per_sequence=spec.verdict_answers_per_sequence,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        target_loss=spec.verdict_target_loss,
    )


def _evidence(
    spec: DefaultModelSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> PhaseResult:
    return train_evidence(
        model,
        tokenizer,
        task_name=spec.evidence_task,
        steps=spec.evidence_steps,
        batch_size=spec.evidence_batch_size,
        weight=spec.evidence_weight,
        recombined=spec.evidence_recombined,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        max_cases=spec.cases_per_task,
    )


def _write(
    out: Path,
    spec: DefaultModelSpec,
    model: PreTrainedModel,
    data: _Data,
    phases: list[PhaseResult],
    copy_acc: float,
    wall: float,
) -> None:
    """The model directory and ``mtrl_build.json`` (spec, versions, phases, timings)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    data.tokenizer.save_pretrained(out)
    episodes = data.episodes
    record = {
        "recipe_version": RECIPE_VERSION,
        "spec": asdict(spec),
        "spec_hash": spec.spec_hash(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(data.tokenizer),
        "demonstrations": len(data.demo_rows),
        "demonstration_strict_tsr": round(
            sum(e.strict for e in episodes) / max(len(episodes), 1), 4
        ),
        "phases": [p.to_json() for p in phases],
        "measured": {"held_out_copy_accuracy": copy_acc},
        "wall_seconds": {"data_and_tokenizer": round(data.seconds, 1), "total": round(wall, 1)},
        "versions": _versions(),
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else None,
    }
    (out / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("default model built in %.0fs -> %s", wall, out)


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
    }
