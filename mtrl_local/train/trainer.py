"""The multi-turn RL trainer: rollouts → rewards → advantages → one policy update, per step.

Each step (DESIGN.md §3, §5–§10):

1. take ``per_device_train_batch_size / num_generations`` training cases and sample
   ``num_generations`` episodes of each (synchronously, or from the async worker);
2. score them with the reward (scalar or per turn) and the strict scorer;
3. compute group advantages by name (``advantage_method``);
4. one optimizer step over the whole batch: each trajectory is one sequence (sequence extension),
   a group's shared prompt run once (``share_prefix``), micro-batched by a token budget, the loss
   picked by name (``loss_type``) with the global token count as normaliser so accumulation
   equals the full-batch loss;
5. hand the new weights to the sampler; log every §9 metric to the run store and MLflow; run the
   §10 diagnostics; evaluate on val every ``eval_steps``; checkpoint every ``save_steps``.

By default one update per batch (``num_iterations = 1``), so ``π_old`` is the policy's own
logprobs detached and the clip acts only through the sampler/trainer gap; with
``num_iterations`` > 1 (PPO epochs) ``π_old`` is frozen at the first pass and the later steps
are clipped against it. Trajectories with zero advantage on every token are not run through the
model when ``beta = 0`` (they add no gradient).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from transformers import PreTrainedModel

from mtrl_local.advantages import compute_advantages, group_by
from mtrl_local.config import MultiTurnRLConfig
from mtrl_local.errors import UserError
from mtrl_local.rollout.backend import GenerationBackend, SamplingParams
from mtrl_local.train import distributed as dd
from mtrl_local.train.checkpoint import (
    TrainState,
    latest_checkpoint,
    restore_training,
    restore_weights,
    save_checkpoint,
)
from mtrl_local.train.policy import (
    Reference,
    export_model,
    load_policy,
    resolve_model_path,
    trainable_parameters,
)
from mtrl_local.train.rollouts import BatchSource, RolloutBatch, RolloutSource
from mtrl_local.train.update import UpdateContext, update_policy
from mtrl_local.trajectory import Trajectory

if TYPE_CHECKING:
    from mtrl_local.store import RunStore

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
FINAL_MODEL_DIR = "final_model"


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def new_run_dir(cfg: MultiTurnRLConfig) -> Path:
    name = cfg.run_name or f"{cfg.task}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output_dir) / name


class Trainer:
    """Owns the policy, the sampler, the optimizer and the run directory of one run."""

    def __init__(
        self,
        cfg: MultiTurnRLConfig,
        run_dir: Path | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
        rollout_backend: GenerationBackend | None = None,
        source_factory: Callable[[Trainer], BatchSource] | None = None,
    ) -> None:
        from mtrl_local.store import RunStore
        from mtrl_local.tracking import MlflowTracker
        from rewards.loading import load_reward
        from sopbench import get_task

        self.cfg = cfg
        self.task = get_task(cfg.task)
        self.reward_fn = load_reward(cfg.reward)
        # Under ``accelerate launch`` with several processes: data-parallel, process 0 writes.
        self.dist = dd.setup(cpu=not torch.cuda.is_available())
        if self.dist.active:
            self._check_distributed(cfg, source_factory is not None)
        elif cfg.fsdp:
            raise UserError(
                "config: fsdp shards the model over several processes; start with `accelerate "
                "launch --multi_gpu --num_processes N -m mtrl_local.cli train …` (N ≥ 2) or set "
                "fsdp=false"
            )
        self.progress = progress and self.dist.main
        self.device = dd.device_for(self.dist)
        _seed_all(cfg.seed)
        self.model_path = resolve_model_path(cfg.model, progress=progress)
        self.model, self.tokenizer = load_policy(cfg, self.model_path, self.device)
        # The reference is the model before any training, a resumed run's too.
        self.reference = Reference(self.model, cfg.lora_rank > 0) if cfg.beta > 0 else None
        self.max_turns = cfg.max_turns or self.task.max_turns
        self.train_cases = self.task.cases("train")
        self.check_context_budget()

        # Every process must agree on the directory (a timestamped name could differ by a second).
        self.run_dir = dd.broadcast(
            self.dist, Path(run_dir) if run_dir is not None else new_run_dir(cfg)
        )
        self.state = TrainState()
        self._store: RunStore | None = None
        exists = (self.run_dir / "run.sqlite").exists()
        dd.barrier(self.dist)  # all have looked before process 0 creates it
        if not resume and exists:
            raise UserError(f"{self.run_dir}: a run exists there; use --resume to continue it")
        ckpt = latest_checkpoint(self.run_dir) if resume else None
        if ckpt is not None:
            restore_weights(ckpt, self.model)
        #: Under FSDP the policy is sharded; this whole copy samples, evaluates and is saved
        #: (its weights are replaced by the policy's after every optimizer step).
        self.sampler_model: torch.nn.Module | None = None
        if cfg.fsdp:
            self.sampler_model = copy.deepcopy(self.model)
            dd.shard_model(self.model)
            if self.reference is not None:
                self.reference.shard()
        self.params = trainable_parameters(self.model)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        warmup = max(cfg.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        if ckpt is not None:
            self.state = restore_training(ckpt, self.model, self.optimizer, self.scheduler)
            logger.info("resumed from %s (step %d)", ckpt, self.state.step)
        if resume:
            if self.dist.main:
                self._store = RunStore.open(self.run_dir)
                self._store.record_config(asdict(cfg), "resume")
        elif self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._store = RunStore.create(self.run_dir, self.run_dir.name, cfg.task, asdict(cfg))
        if self.dist.main:
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        self.tracker = MlflowTracker(
            self.run_dir,
            tracking_uri=cfg.tracking_uri,
            run_name=self.run_dir.name,
            resume=resume,
            enabled=cfg.mlflow and self.dist.main,
        )
        self.tracker.log_params(asdict(cfg))
        self.tracker.log_artifact(self.run_dir / CONFIG_FILE)
        if self.dist.main:
            logger.info("resolved config: %s", json.dumps(asdict(cfg), sort_keys=True))
            if self.dist.active:
                logger.info("data-parallel over %d processes", self.dist.world)

        self.sampling = SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.sampling_max_tokens
        )
        self.source: BatchSource
        if source_factory is not None:
            # Bring-your-own agent (mtrl_local.server): episodes come from an external agent.
            self.source = source_factory(self)
            return
        self.source = RolloutSource(
            self.model,
            self.tokenizer,
            self.task,
            n_samples=cfg.num_generations,
            sampling=self.sampling,
            max_turns=self.max_turns,
            reward_fn=self.reward_fn,
            pick_cases=self._pick_shard,
            seed_for_step=lambda step: cfg.seed * 1_000_003 + step,
            max_steps_off_policy=cfg.async_config.max_steps_off_policy,
            device=self.device,
            max_batch=cfg.per_device_train_batch_size,
            backend=rollout_backend,
            sampler=self.sampler_model,
        )

    @property
    def store(self) -> RunStore:
        """The run store (process 0 only: the other processes never write)."""
        if self._store is None:
            raise RuntimeError(f"process {self.dist.rank} has no run store; only process 0 writes")
        return self._store

    @staticmethod
    def _check_distributed(cfg: MultiTurnRLConfig, agent: bool) -> None:
        world = dd.requested_world()
        if agent:
            raise UserError("train --agent-cmd runs in one process; start it without accelerate")
        if cfg.async_config.max_steps_off_policy > 0:
            raise UserError(
                "config: async_config.max_steps_off_policy > 0 needs one process (each process "
                "would drop stale batches on its own and the optimizer steps would fall out of "
                "step); set it to 0 under accelerate launch"
            )
        if cfg.prompts_per_step % world:
            raise UserError(
                f"config: {cfg.prompts_per_step} prompts per step "
                "(per_device_train_batch_size / num_generations) do not split evenly over "
                f"{world} processes"
            )

    # -- data --------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train_cases)))
        random.Random(self.cfg.seed * 7919 + epoch).shuffle(order)
        return order

    def pick_cases(self, position: int, epoch: int) -> tuple[list[Any], int, int]:
        """The next ``prompts_per_step`` training cases from ``(position, epoch)``; wraps epochs."""
        cases = []
        order = self._epoch_order(epoch)
        for _ in range(self.cfg.prompts_per_step):
            if position >= len(order):
                position, epoch = 0, epoch + 1
                order = self._epoch_order(epoch)
            cases.append(self.train_cases[order[position]])
            position += 1
        return cases, position, epoch

    def _pick_shard(self, position: int, epoch: int) -> tuple[list[Any], int, int]:
        """This process's share of the step's cases (all of them with one process)."""
        cases, position, epoch = self.pick_cases(position, epoch)
        return dd.shard(self.dist, cases), position, epoch

    # -- checks ------------------------------------------------------------------------------------
    def check_context_budget(self) -> None:
        """Refuse a config whose longest episode cannot fit the model's context (DESIGN.md §3)."""
        from mtrl_local.chat import encode_prompt
        from mtrl_local.diagnostics import check_context_budget

        window = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if window is None:
            return
        probe = self.task.run_policy(self.train_cases[0])
        prompt = encode_prompt(self.tokenizer, probe.messages[:2], probe.tools)
        tool_tokens = max(
            (
                len(self.tokenizer.encode(m["content"], add_special_tokens=False)) + 8
                for m in probe.messages
                if m["role"] == "tool"
            ),
            default=0,
        )
        check_context_budget(
            max_turns=self.max_turns,
            sampling_max_tokens=self.cfg.sampling_max_tokens,
            tool_output_tokens=tool_tokens,
            prompt_tokens=len(prompt),
            context_window=int(window),
        )

    # -- one step ----------------------------------------------------------------------------------
    def _advantages(
        self, trajectories: Sequence[Trajectory]
    ) -> tuple[list[torch.Tensor], set[str]]:
        """Per-trajectory advantages and the ids of the groups that carry no gradient."""
        cfg = self.cfg
        kwargs: dict[str, Any] = {}
        if cfg.advantage_method in ("group_based", "group_based_per_turn"):
            kwargs["scale_rewards"] = cfg.scale_rewards
        if cfg.advantage_method == "grpo_passk":
            kwargs.update(k=cfg.pass_k, success_threshold=cfg.success_threshold)
        # A failed environment is not the policy's doing: it scores 0 and is left out of training.
        rewards: list[Any] = [
            0.0 if t.failed or t.reward is None else t.reward for t in trajectories
        ]
        groups = group_by(trajectories)
        result = compute_advantages(rewards, groups, method=cfg.advantage_method, **kwargs)
        advantages = list(result.advantages)
        zero = {
            trajectories[g[0]].group_id
            for g in groups
            if all(not bool(advantages[i].any()) for i in g)
        }
        return advantages, zero

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
        )
        return update_policy(ctx, self.cfg, trajectories, advantages)

    def _use_bf16(self) -> bool:
        wanted = self.cfg.bf16 if self.cfg.bf16 is not None else self.device.type == "cuda"
        return bool(wanted and self.device.type == "cuda")

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, split: str = "val", label: str = "tuned") -> dict[str, Any]:
        """Strict evaluation of the current policy on ``split`` (val sampling params)."""
        from mtrl_local.evaluate import EvalConfig, Policy, generate, summarize

        vsp = self.cfg.val_sampling_params
        config = EvalConfig(
            task=self.cfg.task,
            split=split,
            n_samples=vsp.n_samples,
            temperature=vsp.temperature,
            top_p=vsp.top_p,
            sampling_max_tokens=vsp.sampling_max_tokens,
            max_turns=self.max_turns,
            success_threshold=self.cfg.success_threshold,
            seed=self.cfg.seed,
            reward=self.cfg.reward,
            max_cases=self.cfg.eval_cases if split == "val" else None,
        )
        cases = self.task.cases(split)  # type: ignore[arg-type]
        if config.max_cases is not None:
            cases = cases[: config.max_cases]
        self.model.eval()
        backend = self.source.backend if self.cfg.async_config.max_steps_off_policy == 0 else None
        if backend is None:
            from mtrl_local.rollout.transformers_backend import TransformersBackend

            backend = TransformersBackend(
                cast(PreTrainedModel, self.model), self.tokenizer, device=self.device
            )
        policy = Policy(backend, self.tokenizer, name=label)
        trajectories = generate(policy, self.task, cases, config, self.reward_fn)
        summary = summarize(trajectories, self.task, config.success_threshold, config.n_samples)
        summary["trajectories"] = trajectories
        return summary

    def _log_val(self, step: int) -> dict[str, float]:
        from mtrl_local.evaluate import val_metrics

        summary = self.evaluate("val")
        trajectories = summary.pop("trajectories")
        self.store.add_evaluation(step, "val", "tuned", summary)
        self.store.add_trajectories(step, trajectories, label="val")
        return val_metrics(summary)

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> TrainState:
        """Run until ``max_steps``; returns the final train state."""
        from mtrl_local.diagnostics import diagnose
        from mtrl_local.metrics import (
            REWARD_OVER_STRICT_FRAC,
            reward_over_strict_frac,
            rollout_metrics,
        )

        cfg = self.cfg
        state = self.state
        main = self.dist.main
        if main:
            self.store.set_status("running")
        if main and state.step == 0 and cfg.eval_steps > 0:
            val = self._log_val(0)
            self.store.log_metrics(0, val)
            self.tracker.log_metrics(0, val)
        self.source.start(state.data_position, state.epoch, state.step, state.policy_version)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=state.step, desc=f"train {cfg.task}")
        try:
            while state.step < cfg.max_steps:
                started = time.perf_counter()
                batch: RolloutBatch = self.source.next_batch(state.step)
                trajectories = batch.trajectories
                advantages, zero_groups = self._advantages(trajectories)
                train_started = time.perf_counter()
                metrics = self._update(trajectories, advantages)
                train_s = time.perf_counter() - train_started
                state.step += 1
                state.policy_version += 1
                state.data_position, state.epoch = batch.data_position, batch.epoch
                state.dropped_stale = self.source.dropped
                self.source.update_weights(self.model, state.policy_version)
                save_due = cfg.save_steps > 0 and (
                    state.step % cfg.save_steps == 0 or state.step == cfg.max_steps
                )
                # Under FSDP gathering the optimizer state is a collective: every process.
                optim_state = dd.optimizer_state(self.model, self.optimizer) if save_due else None
                new_tokens, rollout_s = batch.new_tokens, batch.wall_s
                if self.dist.active:
                    # Process 0 logs and stores the whole batch: every process's episodes.
                    parts = dd.gather(
                        self.dist, (trajectories, sorted(zero_groups), new_tokens, rollout_s)
                    )
                    trajectories = [t for part in parts for t in part[0]]
                    zero_groups = {g for part in parts for g in part[1]}
                    new_tokens = sum(part[2] for part in parts)
                    rollout_s = max(part[3] for part in parts)
                if not main:
                    continue

                metrics.update(
                    rollout_metrics(
                        trajectories,
                        zero_adv_groups=zero_groups,
                        group_ids=[t.group_id for t in trajectories],
                    )
                )
                metrics.update(batch.metrics)
                over = reward_over_strict_frac(trajectories, cfg.success_threshold)
                if over is not None:
                    metrics[REWARD_OVER_STRICT_FRAC] = over
                step_s = time.perf_counter() - started
                metrics.update(
                    {
                        "perf/step_s": step_s,
                        "perf/rollout_tokens_per_s": new_tokens / max(rollout_s, 1e-9),
                        "perf/train_tokens_per_s": metrics.get("train/tokens", 0.0)
                        / max(train_s, 1e-9),
                        "perf/staleness_mean": float((state.step - 1) - batch.policy_version),
                        "perf/dropped_stale": float(self.source.dropped),
                        "perf/policy_version": float(state.policy_version),
                    }
                )
                if cfg.eval_steps > 0 and state.step % cfg.eval_steps == 0:
                    metrics.update(self._log_val(state.step))
                self.store.add_trajectories(state.step, trajectories)
                self.store.log_metrics(state.step, metrics)
                self.tracker.log_metrics(state.step, metrics)
                self._trace_sample(trajectories, state.step)
                findings = diagnose(self.store.history())
                self.store.add_findings([f for f in findings if f.step == state.step])
                for f in findings:
                    if f.step == state.step:
                        logger.warning("diagnostic [%s] %s → %s", f.code, f.message, f.first_change)
                if optim_state is not None:
                    save_checkpoint(
                        self.run_dir,
                        state,
                        self.weights_model,
                        optim_state,
                        self.scheduler,
                        sharded=cfg.fsdp,
                    )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{metrics.get('rollout/reward/mean', float('nan')):.3f}",
                        step_s=f"{step_s:.1f}",
                    )
        except BaseException:
            if main:
                self.store.set_status("failed")
            raise
        finally:
            self.source.close()
            if bar is not None:
                bar.close()
        if main:
            self.store.set_status("finished")
        return state

    def _trace_sample(self, trajectories: Sequence[Trajectory], step: int) -> None:
        """One group per step as MLflow traces (all of them would slow MLflow to a crawl)."""
        if not trajectories:
            return
        group = trajectories[0].group_id
        for t in trajectories:
            if t.group_id == group:
                self.tracker.log_trajectory_trace(t, step=step)

    @property
    def weights_model(self) -> torch.nn.Module:
        """The policy's weights as one unsharded module (under FSDP: the sampler's copy)."""
        return self.sampler_model if self.sampler_model is not None else self.model

    def export(self) -> Path:
        """The final model as a plain HF directory (LoRA merged) in the run directory."""
        out = export_model(self.weights_model, self.tokenizer, self.run_dir / FINAL_MODEL_DIR)
        logger.info("final model: %s", out)
        return out

    def close(self) -> None:
        self.tracker.close()
        if self._store is not None:
            self._store.close()
