"""Training-step benchmark: mtrl-local's ``Trainer`` against TRL 1.16's ``GRPOTrainer``.

Marked ``slow`` (the default run deselects it with ``-m 'not slow'``). Run::

    MTRL_BENCH_OUT=bench_trainer.json .venv/bin/python -m pytest \\
        tests/bench/test_bench_trainer.py -m slow -p no:cacheprovider --log-cli-level=INFO \\
        --benchmark-disable-gc

Measured in one run, all as ratios (a shared CPU makes absolute seconds noisy):

1. **Step time vs TRL**: median seconds per training step (rollout + update + the loop's own
   bookkeeping), mtrl-local ``Trainer`` (synchronous) vs ``GRPOTrainer(environment_factory=…)``.
2. **Sequence extension vs one sample per turn**: forward+backward tokens per step when each
   trajectory is one sequence vs when each turn's whole context is its own sample, computed from
   the same trajectories (a turn's context ends at its ``TurnSpan.end``), plus one update timed
   each way on the same weights, and a third time with each group's shared prompt run once
   (``share_prefix``, the trainer's default, so the step times of 1. include it).
3. **Async vs sync**: median step time of the ``Trainer`` at ``max_steps_off_policy`` 1 vs 0.

The model: the default model's shape (``DefaultModelSpec``: hidden 128, 2 layers) over a
tokenizer trained on the suite, warmed up with ``MTRL_BENCH_SFT_STEPS`` steps of SFT on
noisy-expert trajectories (loss on the assistant turns only; ~80 s on one thread), so that its
rollouts look like an agent's: a tool call every turn and a ``<final_response>`` after 6–9 turns.
A random model would sample every turn to the budget and never call a tool. The warm-up is brief:
the ids it copies are mostly wrong (tool results are mostly error strings) and from the second
turn on most of its calls are malformed JSON (600 steps still left ~70 % malformed). Both
trainers load the same saved weights. ``MTRL_BENCH_MODEL`` runs on another model directory
instead (``default``: the built default model, which writes well-formed calls), skipping the
warm-up.

How the two trainers are matched:

* the same cases, in the same order: the first ``STEPS × PROMPTS`` cases of the ``Trainer``'s own
  shuffled order become TRL's dataset (``shuffle_dataset=False``); rows are the system + user
  turns, and token-identical prompts are asserted (TRL renders its tool schemas from the wrapper
  methods of :mod:`trl_env`, we from ``env.tool_schemas()``);
* the environment: TRL's environment class wraps a fresh ``AircraftInspectionEnv`` per rollout;
  ``reset`` resets it for the row's case and every tool delegates to ``env.call_tool``;
* batch ``PROMPTS × GROUP`` trajectories, group size ``GROUP``, one optimizer step per batch
  (TRL: ``gradient_accumulation_steps=1``, ``num_iterations=1``), temperature 1.0, top-p 1,
  no top-k, lr 1e-4 constant, clip 0.2 token-mean loss (ours ``ppo``/``token_mean``, TRL's
  default ``dapo``), ``beta=0``, max grad norm 1, fp32 (TRL defaults to bf16 autocast and
  gradient checkpointing: both off here), no evaluation, no checkpoints, no MLflow / ``report_to
  none``, ``use_cpu``;
* the per-turn budget: ours ``sampling_max_tokens``; TRL's ``max_completion_length`` caps the whole
  multi-turn completion (tool results included) and is also every turn's ``max_new_tokens``
  unless ``generation_kwargs`` overrides it, so TRL gets ``generation_kwargs={"max_new_tokens":
  SAMPLING_MAX_TOKENS}`` and ``max_completion_length = MAX_TURNS × (SAMPLING_MAX_TOKENS + 128)``,
  generous enough not to bind before the turn limit;
* the turn limit: ours ``max_turns = 12`` model turns (see ``MAX_TURNS``); TRL 1.16's
  ``max_tool_calling_iterations`` counts the generations *after* the first, so ``MAX_TURNS − 1``;
* the reward: :func:`trl_env.bench_reward` on both sides (the dense reward plus 0.01 per tool
  result, so that groups have variance and neither side gets a free update, see there).

What is not matched (it is each trainer's own design): how a turn is parsed (TRL ends the episode
when its response parser finds no well-formed call; our engine answers a malformed call with an
error result and goes on), KV reuse across turns (ours keeps it; TRL re-prefills the whole
context every turn), micro-batching (ours by a token budget, TRL one padded batch). So the
rollouts differ in length: turns, tool results and tokens per step are reported beside the times,
and the step-time ratio is also given per model turn. With the warmed-up model's malformed calls
the difference is large (TRL's episodes end after ~1.7 turns, ours run ~8).

Timing: a step is the interval between the starts of consecutive steps (the last one ends when
``train`` returns), so it includes each loop's logging. ``STEPS`` steps per trainer, the first
dropped as warm-up, the median of the rest. Threads default to 1 (``MTRL_BENCH_THREADS``).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl_env import EpisodeLog, trl_environment_class, trl_reward

from mtrl_local.chat_codec import ChatCodec
from mtrl_local.config import load_config
from mtrl_local.plugins import load_task
from mtrl_local.train.policy import trainable_parameters
from mtrl_local.train.trainer import Trainer
from mtrl_local.train.update import UpdateContext, update_policy
from mtrl_local.trajectory import Trajectory, TurnSpan
from sopbench.default_model.phase import optimizer_step
from sopbench.default_model.spec import DefaultModelSpec, make_model
from sopbench.default_model.tokenizer import train_tokenizer
from tests.trainer_fixtures import make_trainer

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

TASK = load_task("aircraft_inspection")
STEPS = int(os.environ.get("MTRL_BENCH_STEPS", "5"))
SFT_STEPS = int(os.environ.get("MTRL_BENCH_SFT_STEPS", "200"))
PROMPTS = 2
GROUP = 4
SAMPLING_MAX_TOKENS = 96  # the config default; the longest reference turn (the answer) is ~80
#: The task default (15) does not fit the 4096-token context with this tokenizer's 1.6k-token
#: prompt (the Trainer checks); 12 is the most that does. The warmed-up model ends after 6–9 turns.
MAX_TURNS = 12
REWARD = "trl_env:bench_reward"  # importable: pytest puts tests/bench on sys.path
LEARNING_RATE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MTRL_BENCH_THREADS", "1")))
    # Tiny weights and Adam moments drift into denormals, which x86 CPUs process very slowly.
    denormals = torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(before)
    if not denormals:
        torch.set_flush_denormal(False)


# -- the model --------------------------------------------------------------------------------
def suite_tokenizer() -> PreTrainedTokenizerBase:
    """The rollout benchmark's tokenizer: BPE on the SOP, tool schemas and reference episodes."""
    episodes = [TASK.run_expert(c) for c in TASK.cases("train")[:40]]
    texts = [TASK.sop, *(json.dumps(s) for s in episodes[0].tools)]
    texts += [m["content"] for e in episodes for m in e.messages]
    return train_tokenizer(texts, vocab_size=2048)


def warm_up(model: torch.nn.Module, tok: PreTrainedTokenizerBase, steps: int) -> dict[str, float]:
    """SFT on whole noisy-expert trajectories, one per step, loss on the assistant turns only."""
    rows = []
    for case in TASK.cases("train")[:200]:
        episode = TASK.run_expert(case, seed=1, noise_rate=0.05)
        out = tok.apply_chat_template(
            episode.messages,
            tools=episode.tools,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = torch.tensor(out["input_ids"])
        labels = torch.where(torch.tensor(out["assistant_masks"]).bool(), ids, -100)
        rows.append((ids[None], labels[None]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Linear warm-up over 10 steps, then linear decay to 5 %.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / max(steps, 1))
    )
    model.train()
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        ids, labels = rows[step % len(rows)]
        losses.append(optimizer_step(model, opt, sched, ids, labels))
    model.eval()
    tail = losses[-20:] or [float("nan")]
    return {
        "steps": steps,
        "seconds": time.perf_counter() - started,
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss_mean20": sum(tail) / len(tail),
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """The warmed-up default-shaped model and its tokenizer, saved once for both trainers.

    ``MTRL_BENCH_MODEL`` names a model directory to use instead (``default``: the built default
    model, if it is in the cache), skipping the warm-up.
    """
    given = os.environ.get("MTRL_BENCH_MODEL")
    if given:
        from sopbench.default_model.cache import default_model_path

        path = default_model_path(build=False) if given == "default" else Path(given)
        return path, {"steps": 0.0, "seconds": 0.0}
    tok = suite_tokenizer()
    torch.manual_seed(0)
    model = make_model(DefaultModelSpec(), tok)
    sft = warm_up(model, tok, SFT_STEPS)
    logger.info("warm-up SFT: %s", sft)
    path = tmp_path_factory.mktemp("bench-model")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path, sft


# -- mtrl-local ---------------------------------------------------------------------------------
def mtrl_trainer(model: Path, out: Path, name: str, staleness: int) -> Trainer:
    cfg = load_config(
        None,
        {
            "task": TASK.name,
            "model": str(model),
            "reward": REWARD,
            "output_dir": str(out),
            "run_name": name,
            "num_generations": GROUP,
            "per_device_train_batch_size": PROMPTS * GROUP,
            "max_steps": STEPS,
            "max_turns": MAX_TURNS,
            "sampling_max_tokens": SAMPLING_MAX_TOKENS,
            "temperature": 1.0,
            "top_p": 1.0,
            "learning_rate": LEARNING_RATE,
            "async_config": {"max_steps_off_policy": staleness},
            "eval_steps": 0,
            "save_steps": 0,
            "mlflow": False,
        },
    )
    return make_trainer(cfg, progress=False)


def run_mtrl(trainer: Trainer) -> dict[str, Any]:
    """Train ``STEPS`` steps; step starts, and each step's trajectories and advantages."""
    starts: list[float] = []
    rollout_s: list[float] = []
    update_s: list[float] = []
    batches: list[tuple[list[Trajectory], list[torch.Tensor]]] = []
    next_batch = trainer.source.next_batch
    update = trainer._update

    def timed_next_batch(step: int) -> Any:
        starts.append(time.perf_counter())
        batch = next_batch(step)
        rollout_s.append(batch.wall_s)  # the engine's own time (in the background when async)
        return batch

    def recording_update(trajectories: Any, advantages: Any) -> dict[str, float]:
        batches.append((list(trajectories), list(advantages)))
        started = time.perf_counter()
        metrics = update(trajectories, advantages)
        update_s.append(time.perf_counter() - started)
        return metrics

    trainer.source.next_batch = timed_next_batch  # type: ignore[method-assign]
    trainer._update = recording_update  # type: ignore[method-assign]
    try:
        trainer.train()
        starts.append(time.perf_counter())
        history = trainer.store.history(["analysis/zero_adv_groups", "train/tokens"])
    finally:
        trainer.close()
    trajs = [t for b, _ in batches for t in b]
    return {
        "step_s": [b - a for a, b in itertools.pairwise(starts)],
        "rollout_s": rollout_s,
        "update_s": update_s,
        "batches": batches,
        "turns_mean": statistics.mean(t.n_turns for t in trajs),
        "tool_results_mean": statistics.mean(t.tool_calls for t in trajs),
        "sampled_tokens_mean": statistics.mean(sum(t.loss_mask) for t in trajs),
        "trajectory_tokens_mean": statistics.mean(len(t.input_ids) for t in trajs),
        "final_answer_frac": statistics.mean(t.done_reason == "final_answer" for t in trajs),
        "reward_mean": statistics.mean(float(t.reward or 0.0) for t in trajs),  # type: ignore[arg-type]
        "zero_adv_groups_mean": statistics.mean(
            v for _, v in history.get("analysis/zero_adv_groups", [(0, 0.0)])
        ),
        "train_tokens_per_step": [v for _, v in history.get("train/tokens", [])],
        "dropped_stale": trainer.source.dropped,
    }


# -- sequence extension vs one sample per turn ----------------------------------------------------
def per_turn_samples(
    trajectories: list[Trajectory], advantages: list[torch.Tensor]
) -> tuple[list[Trajectory], list[torch.Tensor]]:
    """Each turn as its own sample: its whole context up to its last sampled token."""
    samples, advs = [], []
    for traj, adv in zip(trajectories, advantages, strict=True):
        if traj.failed:
            continue
        for k, span in enumerate(traj.turns):
            mask = [0] * span.start + [1] * span.n_tokens
            samples.append(
                Trajectory(
                    task=traj.task,
                    case_id=traj.case_id,
                    split=traj.split,
                    ground_truth=traj.ground_truth,
                    prompt_len=traj.prompt_len,
                    input_ids=traj.input_ids[: span.end],
                    loss_mask=mask,
                    behaviour_logprobs=[
                        lp * m
                        for lp, m in zip(traj.behaviour_logprobs[: span.end], mask, strict=True)
                    ],
                    turns=[TurnSpan(span.start, span.end, span.finish_reason)],
                    reward=traj.reward,
                    group_id=traj.group_id,
                )
            )
            advs.append(adv if adv.dim() == 0 else adv[k])
    return samples, advs


def timed_update(
    trainer: Trainer,
    trajectories: list[Trajectory],
    advantages: list[torch.Tensor],
    share_prefix: bool,
) -> tuple[float, float]:
    """Seconds and forward/backward tokens of one update on a copy of the trainer's current
    weights."""
    model = copy.deepcopy(trainer.model)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE)
    pad = trainer.tokenizer.pad_token_id
    ctx = UpdateContext(
        model=model,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        params=params,
        pad_id=pad if isinstance(pad, int) else 0,
        device=trainer.device,
    )
    started = time.perf_counter()
    cfg = trainer.cfg.model_copy(update={"share_prefix": share_prefix})
    metrics = update_policy(ctx, cfg, trajectories, advantages)
    return time.perf_counter() - started, metrics["train/tokens"]


def sequence_extension(
    trainer: Trainer, batches: list[tuple[list[Trajectory], list[torch.Tensor]]]
) -> dict[str, Any]:
    seq_tokens, turn_tokens = [], []
    for trajs, _ in batches:
        kept = [t for t in trajs if not t.failed]
        seq_tokens.append(sum(len(t.input_ids) for t in kept))
        turn_tokens.append(sum(span.end for t in kept for span in t.turns))
    trajs, advs = batches[-1]
    seq_s, seq_trained = timed_update(trainer, trajs, advs, share_prefix=False)
    shared_s, shared_trained = timed_update(trainer, trajs, advs, share_prefix=True)
    turns = per_turn_samples(trajs, advs)
    turn_s, turn_trained = timed_update(trainer, *turns, share_prefix=False)
    return {
        "tokens_per_step_sequence": statistics.mean(seq_tokens),
        "tokens_per_step_per_turn": statistics.mean(turn_tokens),
        "tokens_per_turn_over_sequence": statistics.mean(turn_tokens) / statistics.mean(seq_tokens),
        "update_sequence": {"seconds": seq_s, "trained_tokens": seq_trained},
        "update_sequence_shared_prefix": {"seconds": shared_s, "trained_tokens": shared_trained},
        "update_per_turn": {"seconds": turn_s, "trained_tokens": turn_trained},
        "update_per_turn_over_sequence": turn_s / seq_s,
        "update_shared_prefix_over_sequence": shared_s / seq_s,
    }


# -- TRL ------------------------------------------------------------------------------------------
class StepClock(TrainerCallback):
    """Start of every step, end of training, and the logged metrics (TRL side)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.logs: list[dict[str, float]] = []
        self.threads: set[int] = set()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.starts.append(time.perf_counter())
        self.threads.add(torch.get_num_threads())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs:
            self.logs.append(dict(logs))


def run_trl(model: Path, out: Path, cases: list[Any]) -> dict[str, Any]:
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"  # environment_factory is "experimental"
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model)
    env = TASK.make_env()
    rows = [{"prompt": env.reset(c), "case_id": c.case_id} for c in cases]
    episodes = EpisodeLog()
    clock = StepClock()
    args = GRPOConfig(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=PROMPTS * GROUP,
        gradient_accumulation_steps=1,
        num_generations=GROUP,
        num_iterations=1,
        max_completion_length=MAX_TURNS * (SAMPLING_MAX_TOKENS + 128),
        generation_kwargs={"max_new_tokens": SAMPLING_MAX_TOKENS},
        max_tool_calling_iterations=MAX_TURNS - 1,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        shuffle_dataset=False,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        processing_class=tok,
        reward_funcs=trl_reward(TASK.case, episodes),
        train_dataset=Dataset.from_list(rows),
        environment_factory=trl_environment_class(TASK.make_env, TASK.case),
        args=args,
        callbacks=[clock],
    )
    assert trainer.chat_template is None  # our prefix-preserving template was kept
    rollout_s: list[float] = []
    generate = trainer._generate

    def timed_generate(prompts: list[Any]) -> Any:  # the whole multi-turn rollout of a batch
        started = time.perf_counter()
        out = generate(prompts)
        rollout_s.append(time.perf_counter() - started)
        return out

    trainer._generate = timed_generate  # type: ignore[method-assign]
    # The prompt TRL renders (tools from the wrapper methods) equals the one our engine encodes.
    trl_prompt = tok.apply_chat_template(
        rows[0]["prompt"], tools=trainer.tools, add_generation_prompt=True, tokenize=False
    )
    assert tok.encode(trl_prompt, add_special_tokens=False) == ChatCodec(tok).encode_prompt(
        rows[0]["prompt"], env.tool_schemas()
    )
    trainer.train()
    lengths = [
        log["completions/mean_length"] for log in clock.logs if "completions/mean_length" in log
    ]
    tokens = [log["num_tokens"] for log in clock.logs if "num_tokens" in log]
    return {
        "step_s": [b - a for a, b in itertools.pairwise(clock.starts)],
        "rollout_s": rollout_s,
        "turns_mean": statistics.mean(episodes.turns),
        "tool_results_mean": statistics.mean(episodes.tool_results),
        "completion_tokens_mean": statistics.mean(lengths) if lengths else None,
        "tokens_per_step": [b - a for a, b in zip([0.0, *tokens], tokens, strict=False)],
        "reward_mean": statistics.mean(episodes.rewards),
        "threads": sorted(clock.threads),
        "prompt_tokens": len(tok.encode(trl_prompt, add_special_tokens=False)),
    }


# -- the benchmark --------------------------------------------------------------------------------
def median_after_warmup(step_s: list[float]) -> float:
    return statistics.median(step_s[1:] if len(step_s) > 1 else step_s)


def summary(run: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in run.items() if k != "batches"}
    out["median_step_s"] = median_after_warmup(run["step_s"])
    return out


def test_bench_trainer_vs_trl(
    benchmark: Any, model_dir: tuple[Path, dict[str, float]], tmp_path: Path
) -> None:
    model, sft = model_dir

    sync_trainer = mtrl_trainer(model, tmp_path / "runs", "sync", staleness=0)
    # The cases the Trainer will train on, in its order: TRL's dataset.
    cases, position, epoch = [], 0, 0
    for _ in range(STEPS):
        picked, position, epoch = sync_trainer.schedule.pick(position, epoch)
        cases += picked
    sync = benchmark.pedantic(run_mtrl, args=(sync_trainer,), rounds=1, iterations=1)
    seq_ext = sequence_extension(sync_trainer, sync["batches"])
    asyn = run_mtrl(mtrl_trainer(model, tmp_path / "runs", "async", staleness=1))
    trl = run_trl(model, tmp_path / "trl", cases)

    results: dict[str, Any] = {
        "setup": {
            "task": TASK.name,
            "steps": STEPS,
            "prompts_per_step": PROMPTS,
            "group_size": GROUP,
            "batch": PROMPTS * GROUP,
            "sampling_max_tokens": SAMPLING_MAX_TOKENS,
            "max_turns": MAX_TURNS,
            "threads": torch.get_num_threads(),
            "warm_up_sft": sft,
            "model": "DefaultModelSpec shape, warmed-up weights shared by both sides",
        },
        "mtrl_sync": summary(sync),
        "mtrl_async": summary(asyn),
        "trl": summary(trl),
        "sequence_extension": seq_ext,
    }
    mtrl_s = results["mtrl_sync"]["median_step_s"]
    trl_s = results["trl"]["median_step_s"]
    async_s = results["mtrl_async"]["median_step_s"]
    # The two sides' episodes differ in length (TRL ends one at the first malformed call), so
    # also per model turn: seconds per step / model turns per step.
    mtrl_turn_s = mtrl_s / (results["mtrl_sync"]["turns_mean"] * PROMPTS * GROUP)
    trl_turn_s = trl_s / (results["trl"]["turns_mean"] * PROMPTS * GROUP)
    results["ratios"] = {
        "mtrl_over_trl_step_time": mtrl_s / trl_s,
        "mtrl_over_trl_time_per_model_turn": mtrl_turn_s / trl_turn_s,
        "async_over_sync_step_time": async_s / mtrl_s,
        "per_turn_over_sequence_tokens": seq_ext["tokens_per_turn_over_sequence"],
        "per_turn_over_sequence_update_time": seq_ext["update_per_turn_over_sequence"],
        "shared_prefix_over_sequence_update_time": seq_ext["update_shared_prefix_over_sequence"],
    }
    benchmark.extra_info.update(results)
    logger.info("trainer benchmark:\n%s", json.dumps(results, indent=2))
    out = os.environ.get("MTRL_BENCH_OUT")
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)

    # Sanity only, never speed.
    for name in ("mtrl_sync", "mtrl_async", "trl"):
        steps = results[name]["step_s"]
        assert len(steps) == STEPS, (name, steps)
        assert all(s > 0 and s == s and s != float("inf") for s in steps), (name, steps)
    for value in results["ratios"].values():
        assert value > 0 and value != float("inf")
    assert seq_ext["tokens_per_step_per_turn"] >= seq_ext["tokens_per_step_sequence"] > 0
