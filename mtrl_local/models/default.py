"""The embedded default model: a tiny decoder built locally, with a foothold on the suite.

Nothing can be downloaded, and RL amplifies only what the model can already do (DESIGN §1.4), so
the toolkit builds its own starting point on the CPU:

1. a byte-level BPE tokenizer trained on the suite's own text (SOPs, tool schemas and train-split
   trajectories; one token per digit and per capital, :mod:`mtrl_local.models.tokenizer`);
2. a randomly initialised ``LlamaForCausalLM`` of ~0.75M parameters (hidden 128, 2 layers);
3. a token-level induction stage, restarted from a fresh init while it stalls, a token-level
   keyed retrieval of id-like runs, then a text copy curriculum
   (:mod:`mtrl_local.models.curriculum`) — without them a tiny model does not learn to copy an
   id from the user message into a tool call, nor a tail number out of a tool result;
4. a warm start with TRL's ``SFTTrainer(assistant_only_loss=True)`` on noisy-expert
   demonstrations of the **train** split of every task (:mod:`mtrl_local.models.sft`);
5. a derived-verdict stage (``aircraft_ready`` = the conjunction of the answer's own verdicts,
   :func:`mtrl_local.models.curriculum.verdict_answer`) and a short SFT refresh;
6. an evidence stage (:func:`mtrl_local.models.sft.train_evidence`): whole reference episodes of
   the aircraft train split, some on recombined aircraft, with the answer's decisions weighted,
   so that verdicts follow the tool results; then a short SFT refresh.

The aim is a *foothold*, not a solved task: the model follows the procedure, writes well-formed
tool calls with the right ids and a parseable answer, and guesses most rule-derived fields, so
strict TSR sits inside (5 %, 50 %) and RL has room to raise it.

Status (measured, seed 0, this spec, aircraft_inspection test split, 100 cases): strict TSR
**0.35 greedy, 0.095 at temperature 1** (2 samples per case; inside the band); first turns are
well-formed calls in 97 % / 94 %, completion 84 % / 60 %, field accuracy 67 % / 40 %,
``tail_number`` exact 77 % / 45 %. The verdicts still lean to the common values, so the greedy
successes are mostly the all-pass aircraft (ready 0.74, not ready 0.07). The build takes ~23
minutes on 2 idle cores; its output is shipped
(:data:`SHIPPED_DIR`).

Budgets are in optimizer steps (deterministic given the seed). ``default_model_path()`` caches
the model under ``$MTRL_CACHE`` (or ``~/.cache/mtrl-local``), keyed by a hash of the spec, from the
shipped build when it matches the spec, else built on first use under a file lock.

Entry point (``make base-model``)::

    .venv/bin/python -m mtrl_local.models.default [--out DIR] [--seed N] [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mtrl_local.chat import prepare_tokenizer_for_trl
from mtrl_local.models.curriculum import curriculum
from mtrl_local.models.sft import (
    PhaseResult,
    copy_accuracy,
    demonstration_episodes,
    demonstration_rows,
    suite_texts,
    train_curriculum,
    train_evidence,
    train_induction,
    train_keyed_runs,
    train_phase,
    train_verdicts,
)
from mtrl_local.models.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

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
    """Task of the evidence stage (``sft.train_evidence`` says why); "" skips it and its refresh."""
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        t0 = time.perf_counter()
        episodes = demonstration_episodes(
            spec.task_mix, spec.noise_rate, spec.seed, spec.cases_per_task
        )
        tokenizer = train_tokenizer(suite_texts(episodes), vocab_size=spec.vocab_size)
        demo_rows = demonstration_rows(episodes)
        n_cur = spec.curriculum_steps * spec.curriculum_batch_size
        cur_items = list(curriculum(n_cur, seed=spec.seed))
        held_out = list(curriculum(spec.copy_eval_items, seed=10_000 + spec.seed))
        prep_s = time.perf_counter() - t0
        logger.info(
            "data: %d demonstrations, %d curriculum items, tokenizer %d tokens (%.1fs)",
            len(demo_rows),
            len(cur_items),
            len(tokenizer),
            prep_s,
        )

        # Whether the induction head forms within a few hundred steps depends on the random
        # initialisation (measured: by step ~300 for some inits, not by 1,100 for others), so a
        # stalled attempt is restarted from a fresh init. Seeds are derived from spec.seed: the
        # build stays deterministic.
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
        _seed_everything(spec.seed)
        with tempfile.TemporaryDirectory(prefix="mtrl-build-") as work:

            def sft(name: str, steps: int) -> PhaseResult:
                return train_phase(
                    name,
                    model,
                    tokenizer,
                    demo_rows,
                    steps=steps,
                    batch_size=spec.sft_batch_size,
                    learning_rate=spec.learning_rate,
                    max_length=spec.max_length,
                    seed=spec.seed,
                    work_dir=Path(work),
                    progress=progress,
                )

            phases += [
                train_curriculum(
                    model,
                    tokenizer,
                    cur_items,
                    steps=spec.curriculum_steps,
                    batch_size=spec.curriculum_batch_size,
                    learning_rate=spec.learning_rate,
                    seed=spec.seed,
                ),
                sft("sft", spec.sft_steps),
            ]
            if spec.verdict_steps > 0:
                _seed_everything(spec.seed)
                phases.append(
                    train_verdicts(
                        model,
                        tokenizer,
                        steps=spec.verdict_steps,
                        batch_size=spec.verdict_batch_size,
                        per_sequence=spec.verdict_answers_per_sequence,
                        learning_rate=spec.learning_rate,
                        seed=spec.seed,
                        target_loss=spec.verdict_target_loss,
                    )
                )
                phases.append(sft("sft_refresh", spec.refresh_steps))
            if spec.evidence_task and spec.evidence_steps > 0:
                _seed_everything(spec.seed)
                phases.append(
                    train_evidence(
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
                )
                _seed_everything(spec.seed)
                phases.append(sft("sft_refresh_evidence", spec.evidence_refresh_steps))
        copy_acc = copy_accuracy(model, tokenizer, held_out)
        logger.info("held-out copy accuracy (greedy, %d items): %.3f", len(held_out), copy_acc)

        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        wall = time.perf_counter() - t_start
        record = {
            "recipe_version": RECIPE_VERSION,
            "spec": asdict(spec),
            "spec_hash": spec.spec_hash(),
            "parameters": n_params,
            "vocab_size": len(tokenizer),
            "demonstrations": len(demo_rows),
            "demonstration_strict_tsr": round(
                sum(e.strict for e in episodes) / max(len(episodes), 1), 4
            ),
            "phases": [p.to_json() for p in phases],
            "measured": {"held_out_copy_accuracy": copy_acc},
            "wall_seconds": {"data_and_tokenizer": round(prep_s, 1), "total": round(wall, 1)},
            "versions": _versions(),
            "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else None,
        }
        (out / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        logger.info("default model built in %.0fs -> %s", wall, out)
        return out
    finally:
        torch.set_num_threads(threads_before)
        torch.set_flush_denormal(False)


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
    }


# -- the cache ------------------------------------------------------------------------------------
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$MTRL_CACHE``, else ``~/.cache/mtrl-local``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MTRL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mtrl-local"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: a second process waits instead of building twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: A build of the default spec shipped with the package (weights ~3 MB), so that a fresh clone
#: evaluates and trains without first spending the build's ~24 CPU minutes. Used only when its
#: recorded spec hash is the one asked for; ``make base-model`` rebuilds it from scratch.
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def shipped_build(spec: DefaultModelSpec) -> Path | None:
    """The shipped build directory if it was built from ``spec`` (same hash), else ``None``."""
    record = SHIPPED_DIR / BUILD_FILE
    if not record.is_file():
        return None
    try:
        shipped_hash = json.loads(record.read_text(encoding="utf-8")).get("spec_hash")
    except (OSError, ValueError):
        return None
    return SHIPPED_DIR if shipped_hash == spec.spec_hash() else None


def default_model_path(
    cache_dir: str | Path | None = None,
    build: bool = True,
    spec: DefaultModelSpec | None = None,
    force: bool = False,
    progress: bool = True,
    use_shipped: bool = True,
) -> Path:
    """The cached default model directory, built on first use (``build=False``: never build).

    With ``use_shipped`` (the default) a missing cache entry is filled from the build shipped
    with the package when it matches ``spec``; otherwise (or with ``force``) the model is built.
    The build writes into a temporary sibling and renames it into place, so a directory that
    exists is complete; the lock makes concurrent callers wait for one build.
    """
    spec = spec or DefaultModelSpec()
    root = cache_root(cache_dir)
    target = root / f"default-{spec.spec_hash()}"
    if not force and (target / BUILD_FILE).is_file():
        return target
    shipped = shipped_build(spec) if use_shipped and not force else None
    if not build and shipped is None:
        raise FileNotFoundError(f"default model not built yet: {target} (run make base-model)")
    with _file_lock(root / f".default-{spec.spec_hash()}.lock"):
        if not force and (target / BUILD_FILE).is_file():
            return target  # another process built it while we waited
        tmp = root / f".building-{spec.spec_hash()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if shipped is not None:
                shutil.copytree(shipped, tmp)
                logger.info("default model: the shipped build (%s)", spec.spec_hash())
            else:
                build_default_model(tmp, spec, progress=progress)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any local Hugging Face causal-LM directory as ``(model, tokenizer)``, model in eval mode.

    A tokenizer that carries its own chat template keeps it (its turns would be misread by ours);
    one without a template gets ours, which needs its ``<|im_start|>``/``<|im_end|>`` tokens.
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        prepare_tokenizer_for_trl(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tokenizer


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mtrl_local.models.default",
        description="Build the embedded default model (tokenizer + tiny Qwen3 + warm start).",
    )
    p.add_argument("--out", type=Path, help="build into this directory instead of the cache")
    p.add_argument("--seed", type=int, default=DefaultModelSpec.seed, help="build seed")
    p.add_argument("--cache-dir", type=Path, help="cache root (default $MTRL_CACHE or ~/.cache)")
    p.add_argument(
        "--force",
        action="store_true",
        help="build from scratch even if a cached or shipped build exists",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a DefaultModelSpec field (experiments; changes the cache key)",
    )
    return p.parse_args(argv)


def _spec_from_args(args: argparse.Namespace) -> DefaultModelSpec:
    spec = DefaultModelSpec(seed=args.seed)
    types = {f.name: f.type for f in dataclasses.fields(spec)}
    overrides: dict[str, Any] = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"unknown spec field '{name}'")
        overrides[name] = json.loads(value)
        if name == "task_mix":
            overrides[name] = tuple(tuple(x) for x in overrides[name])
    return dataclasses.replace(spec, **overrides)


def main(argv: list[str] | None = None) -> int:
    """``make base-model``: build into ``--out`` or the cache; prints nothing but the path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parse_args(argv)
    spec = _spec_from_args(args)
    if args.out is not None:
        if args.force and args.out.exists():
            shutil.rmtree(args.out)
        path = build_default_model(args.out, spec)
    else:
        path = default_model_path(args.cache_dir, build=True, spec=spec, force=args.force)
    logger.info("default model: %s", path)
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = [
    "DefaultModelSpec",
    "build_default_model",
    "cache_root",
    "default_model_path",
    "load_model",
    "make_model",
    "shipped_build",
]
