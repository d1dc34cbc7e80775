"""The multi-turn RL trainer: sample → score → advantages → update → log, one step at a time.

:meth:`Trainer.step` reads top to bottom (docs/design.md, "The training step"):

1. a :class:`~mtrl_local.train.batch_source.BatchSource` samples ``num_generations`` episodes of
   each of the step's training cases (synchronously, or from the async worker); the rollout
   engine scores each episode once, with the reward and the strict scorer it is handed;
2. group advantages by name (``advantage_method``);
3. one optimizer step over the whole batch (:func:`~mtrl_local.train.update.update_policy`);
4. the new weights go to the sampler; process 0 logs the step's metrics and episodes through a
   :class:`~mtrl_local.train.step_log.StepLogger`, evaluates on val every ``eval_steps`` and
   checkpoints every ``save_steps``.

The trainer is handed a task, a reward function and a model directory; it never looks a name up
(the CLI does, :mod:`mtrl_local.plugins`). Building it opens the run: processes, seeds, the
policy and its reference, the context-budget check, the run directory (new or resumed), the
optimizer, the run store and MLflow, and the batch source — each a function of its own
(:mod:`mtrl_local.train.setup` and below).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtrl_local import metrics as M
from mtrl_local.advantages import BatchAdvantages, batch_advantages, estimator_kwargs
from mtrl_local.chat_codec import ChatCodec, record_chat_format
from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.env import ToolLimits
from mtrl_local.eval_metrics import summarize
from mtrl_local.evaluate import EvalConfig, LoadedModel, cases_of, run_episodes
from mtrl_local.rollout.sampler import Sampler, SamplingParams
from mtrl_local.rollout.transformers_sampler import TransformersSampler
from mtrl_local.run_dir import RunDir
from mtrl_local.scoring import RewardFn, Scorer, strict_score
from mtrl_local.store import RunStore
from mtrl_local.task import Task
from mtrl_local.tracking import MlflowTracker
from mtrl_local.train import distributed as dd
from mtrl_local.train.batch_source import BatchSource, CaseSchedule, EngineBatchSource, StepBatch
from mtrl_local.train.budget import check_model_budget
from mtrl_local.train.checkpoint import (
    TrainState,
    restore_training,
    restore_weights,
    save_checkpoint,
)
from mtrl_local.train.policy import Reference, export_model, load_policy, trainable_parameters
from mtrl_local.train.setup import (
    build_optimizer,
    claim_run_dir,
    lock_run_dir,
    open_records,
    seed_all,
    start_processes,
)
from mtrl_local.train.step_log import StepLogger
from mtrl_local.train.update import UpdateContext, update_policy
from mtrl_local.trajectory import Trajectory

logger = logging.getLogger(__name__)


@dataclass
class _StepTiming:
    started: float
    train_s: float


class Trainer:
    """Owns the policy, the sampler, the optimizer and the run directory of one run."""

    def __init__(
        self,
        cfg: MultiTurnRLConfig,
        task: Task,
        reward_fn: RewardFn,
        model_path: Path,
        *,
        run_dir: Path | None = None,
        resume: bool = False,
        progress: bool = True,
        scorer: Scorer = strict_score,
        sampler: Sampler | None = None,
        source_factory: Callable[[Trainer], BatchSource] | None = None,
    ) -> None:
        self.cfg, self.task, self.reward_fn, self.scorer = cfg, task, reward_fn, scorer
        # Under ``accelerate launch`` with several processes: data-parallel, process 0 writes.
        self.dist = start_processes(cfg, agent=source_factory is not None)
        self.progress = progress and self.dist.main
        self.device = dd.device_for(self.dist)
        # Every process must agree on the directory (a timestamped name could differ by a second).
        self.run = dd.broadcast(
            self.dist,
            RunDir(Path(run_dir))
            if run_dir
            else RunDir.new(cfg.output_dir, cfg.run_name, task.name),
        )
        # Taken before anything in the run directory is read or written; given back by close().
        self._lock = lock_run_dir(self.dist, self.run)
        self._store: RunStore | None = None
        self._tracker: MlflowTracker | None = None
        try:
            self._open(model_path, resume, sampler, source_factory)
        except BaseException:
            self.close()
            raise

    def _open(
        self,
        model_path: Path,
        resume: bool,
        sampler: Sampler | None,
        source_factory: Callable[[Trainer], BatchSource] | None,
    ) -> None:
        """Everything a run needs, the run directory claimed (the lock is held)."""
        cfg = self.cfg
        checkpoint = claim_run_dir(self.dist, self.run, resume=resume)
        seed_all(cfg.seed)
        self.model, self.tokenizer = load_policy(cfg, model_path, self.device)
        # The reference is the model before any training, a resumed run's too.
        self.reference = Reference(self.model, cfg.lora_rank > 0) if cfg.beta > 0 else None
        self.max_turns = cfg.max_turns or self.task.max_turns
        self.schedule = CaseSchedule(self.task.cases("train"), cfg.prompts_per_step, cfg.seed)
        check_model_budget(  # refuse a config whose longest episode cannot fit the window
            self.model,
            self.task,
            ChatCodec(self.tokenizer, cfg.chat_format),
            self.schedule.cases[0],
            max_turns=self.max_turns,
            sampling_max_tokens=cfg.sampling_max_tokens,
        )
        if checkpoint is not None:
            restore_weights(checkpoint, self.model)
        #: Under FSDP the policy is sharded; this whole copy samples, evaluates and is saved
        #: (its weights are replaced by the policy's after every optimizer step).
        self.inference_copy: torch.nn.Module | None = None
        if cfg.fsdp:
            self.inference_copy = copy.deepcopy(self.model)
            dd.shard_model(self.model)
            if self.reference is not None:
                self.reference.shard()
        self.params = trainable_parameters(self.model)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.params)
        self.state = TrainState()
        if checkpoint is not None:
            self.state = restore_training(checkpoint, self.model, self.optimizer, self.scheduler)
            logger.info("resumed from %s (step %d)", checkpoint.path, self.state.step)
        self._store, self._tracker = open_records(
            cfg, self.run, self.task.name, resume=resume, main=self.dist.main
        )
        if self.dist.active and self.dist.main:
            logger.info("data-parallel over %d processes", self.dist.world)
        self.sampling = SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.sampling_max_tokens
        )
        self.source = source_factory(self) if source_factory else self._engine_source(sampler)
        self.step_log: StepLogger | None = None

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def store(self) -> RunStore:
        """The run store (process 0 only: the other processes never write)."""
        if self._store is None:
            raise RuntimeError(f"process {self.dist.rank} has no run store; only process 0 writes")
        return self._store

    @property
    def tracker(self) -> MlflowTracker:
        """MLflow (a no-op tracker on the processes that do not write)."""
        if self._tracker is None:
            raise RuntimeError("the trainer's records are not open")
        return self._tracker

    # -- opening ---------------------------------------------------------------------------------
    def _pick_shard(
        self, position: int, epoch: int, count: int | None = None
    ) -> tuple[list[Any], int, int]:
        """This process's share of the step's cases (all of them with one process)."""
        cases, position, epoch = self.schedule.pick(position, epoch, count)
        return dd.shard(self.dist, cases), position, epoch

    def _engine_source(self, sampler: Sampler | None) -> EngineBatchSource:
        cfg = self.cfg
        return EngineBatchSource(
            self.model,
            self.tokenizer,
            self.task,
            n_samples=cfg.num_generations,
            sampling=self.sampling,
            max_turns=self.max_turns,
            reward_fn=self.reward_fn,
            scorer=self.scorer,
            pick_cases=self._pick_shard,
            seed=cfg.seed,
            max_steps_off_policy=cfg.async_config.max_steps_off_policy,
            device=self.device,
            max_batch=cfg.per_device_train_batch_size,
            sampler=sampler,
            inference_copy=self.inference_copy,
            tool_limits=ToolLimits(cfg.tool_timeout_s, cfg.max_tool_output_chars),
            chat_format=cfg.chat_format,
            zero_groups=self._zero_groups if cfg.dynamic_sampling else None,
            max_refill_rounds=cfg.max_refill_rounds,
        )

    # -- evaluation ------------------------------------------------------------------------------
    def eval_config(self, split: str) -> EvalConfig:
        return EvalConfig.of_training(self.cfg, split, self.max_turns)

    def evaluate(self, split: str = "val") -> tuple[dict[str, Any], list[Trajectory]]:
        """Strict evaluation of the current policy on ``split``: its summary and episodes."""
        config = self.eval_config(split)
        self.model.eval()
        sampler = self.source.sampler if self.cfg.async_config.max_steps_off_policy == 0 else None
        if sampler is None:  # the async worker owns its sampler: evaluate with the policy itself
            model = cast(PreTrainedModel, self.model)
            sampler = TransformersSampler(model, self.tokenizer, device=self.device)
        tokenizer = cast(PreTrainedTokenizerBase, self.tokenizer)
        trajectories = run_episodes(
            LoadedModel(sampler, tokenizer, "policy"),
            self.task,
            cases_of(self.task, config),
            config,
            reward_fn=self.reward_fn,
            scorer=self.scorer,
        )
        summary = summarize(trajectories, self.task, config.success_threshold, config.n_samples)
        return summary, trajectories

    def _validate(self, step: int) -> dict[str, float]:
        summary, trajectories = self.evaluate("val")
        assert self.step_log is not None
        return self.step_log.evaluation(step, "val", "tuned", summary, trajectories)

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> TrainState:
        """Run until ``max_steps``; returns the final train state."""
        cfg, state, main = self.cfg, self.state, self.dist.main
        if main:
            self.store.set_status("running")
            self.step_log = StepLogger(
                self.store,
                self.tracker,
                total_steps=cfg.max_steps,
                first_step=state.step,
                desc=f"train {self.task.name}",
                progress=self.progress,
            )
            if state.step == 0 and cfg.eval_steps > 0:
                self.step_log.metrics(0, self._validate(0))
        self.source.start(state.data_position, state.epoch, state.step, state.policy_version)
        try:
            while state.step < cfg.max_steps:
                self.step()
        except BaseException as exc:
            if main:  # the dashboard and `--resume` show why the run stopped
                self.store.set_status("failed", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.source.close()
            if self.step_log is not None:
                self.step_log.close()
        if main:
            self.store.set_status("finished")
        return state

    def step(self) -> None:
        """One training step: sample and score, advantages, update, log."""
        cfg, state = self.cfg, self.state
        started = time.perf_counter()
        batch = self.source.next_batch(state.step)
        advantages = self._advantages(batch.trajectories)
        train_started = time.perf_counter()
        metrics = self._update(batch.trajectories, advantages.advantages)
        timing = _StepTiming(started, time.perf_counter() - train_started)
        self._advance(batch)
        # Under FSDP gathering the optimizer state is a collective: every process.
        optim_state = dd.optimizer_state(self.model, self.optimizer) if self._save_due() else None
        trajectories, zero_groups, new_tokens, rollout_s = self._gather(
            batch, advantages.zero_group_ids
        )
        if not self.dist.main:
            return
        metrics.update(
            M.rollout_metrics(trajectories, zero_groups, [t.group_id for t in trajectories])
        )
        metrics.update(batch.metrics)
        over = M.reward_over_strict_frac(trajectories, cfg.success_threshold)
        if over is not None:
            metrics[M.REWARD_OVER_STRICT_FRAC] = over
        metrics.update(
            M.perf_metrics(
                step_s=time.perf_counter() - timing.started,
                new_tokens=new_tokens,
                rollout_s=rollout_s,
                train_tokens=metrics.get(M.TRAIN_TOKENS, 0.0),
                train_s=timing.train_s,
                staleness=(state.step - 1) - batch.policy_version,
                dropped=self.source.dropped,
                policy_version=state.policy_version,
            )
        )
        if cfg.eval_steps > 0 and state.step % cfg.eval_steps == 0:
            metrics.update(self._validate(state.step))
        assert self.step_log is not None
        self.step_log.step(state.step, metrics, trajectories)
        if optim_state is not None:
            save_checkpoint(
                self.run.checkpoints,
                state,
                self.weights_model,
                optim_state,
                self.scheduler,
                sharded=cfg.fsdp,
            )

    def _advantages(self, trajectories: Sequence[Trajectory]) -> BatchAdvantages:
        """Group advantages by ``advantage_method``."""
        cfg = self.cfg
        kwargs = estimator_kwargs(
            cfg.advantage_method,
            scale_rewards=cfg.scale_rewards,
            pass_k=cfg.pass_k,
            success_threshold=cfg.success_threshold,
        )
        return batch_advantages(trajectories, cfg.advantage_method, **kwargs)

    def _zero_groups(self, trajectories: Sequence[Trajectory]) -> set[str]:
        return self._advantages(trajectories).zero_group_ids

    def _update(
        self, trajectories: Sequence[Trajectory], advantages: Sequence[torch.Tensor]
    ) -> dict[str, float]:
        """One optimizer step over the batch (this process's shard of it)."""
        pad = self.tokenizer.pad_token_id
        ctx = UpdateContext(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            params=self.params,
            pad_id=pad if isinstance(pad, int) else 0,
            device=self.device,
            reference=self.reference,
            bf16=self._use_bf16(),
            max_completion_tokens=self.max_turns * self.cfg.sampling_max_tokens,
        )
        return update_policy(ctx, self.cfg, trajectories, advantages)

    def _use_bf16(self) -> bool:
        wanted = self.cfg.bf16 if self.cfg.bf16 is not None else self.device.type == "cuda"
        return bool(wanted and self.device.type == "cuda")

    def _advance(self, batch: StepBatch) -> None:
        """The step is taken: count it, remember the data position, hand the sampler the
        new weights."""
        state = self.state
        state.step += 1
        state.policy_version += 1
        state.data_position, state.epoch = batch.data_position, batch.epoch
        state.dropped_stale = self.source.dropped
        self.source.update_weights(self.model, state.policy_version)

    def _save_due(self) -> bool:
        every, step = self.cfg.save_steps, self.state.step
        return every > 0 and (step % every == 0 or step == self.cfg.max_steps)

    def _gather(
        self, batch: StepBatch, zero_groups: set[str]
    ) -> tuple[list[Trajectory], set[str], int, float]:
        """The whole step's episodes on process 0 (every process's, under several)."""
        trajectories, tokens, seconds = batch.trajectories, batch.new_tokens, batch.wall_s
        if not self.dist.active:
            return trajectories, zero_groups, tokens, seconds
        parts = dd.gather(self.dist, (trajectories, sorted(zero_groups), tokens, seconds))
        return (
            [t for part in parts for t in part[0]],
            {g for part in parts for g in part[1]},
            sum(part[2] for part in parts),
            max(part[3] for part in parts),
        )

    # -- the end ---------------------------------------------------------------------------------
    @property
    def weights_model(self) -> torch.nn.Module:
        """The policy's weights as one unsharded module (under FSDP: the inference copy)."""
        return self.inference_copy if self.inference_copy is not None else self.model

    def export(self) -> Path:
        """The final model as a plain HF directory (LoRA merged) in the run directory."""
        record_chat_format(
            self.tokenizer, ChatCodec(self.tokenizer, self.cfg.chat_format).format.name
        )
        out = export_model(self.weights_model, self.tokenizer, self.run.final_model)
        logger.info("final model: %s", out)
        return out

    def close(self) -> None:
        """Close the records and give the run directory back (safe to call more than once)."""
        try:
            if self._tracker is not None:
                self._tracker.close()
            if self._store is not None:
                self._store.close()
        finally:
            if self._lock is not None:
                self._lock.release()
