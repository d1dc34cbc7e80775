"""Training on an agent we did not write: its episodes, recorded by the rollout server, as batches.

:class:`AgentBatchSource` is the trainer's batch source for bring-your-own agents (it has the
same five methods as :class:`~mtrl_local.train.batch_source.EngineBatchSource`). Each step it

1. picks the step's cases and assigns ``num_generations`` episodes to each (group = case), with
   ids the agent will send back;
2. launches the agent once per episode — a command (``python my_agent.py``) in a subprocess, or
   a Python function on a thread — at most ``workers`` at a time, with ``OPENAI_BASE_URL`` /
   ``OPENAI_API_KEY`` pointing at the server and the assignment in ``MTRL_*`` variables. The key
   is the episode's own (:mod:`~mtrl_local.server.auth`): an agent can act on its episode only;
3. waits for every episode to report its reward. An agent that exits, raises or goes silent for
   ``idle_timeout_s`` (or runs past ``episode_timeout_s``) without reporting fails its episode:
   counted (``rollout/failure_rate``, ``agent/*``), never trained on, and the step goes on;
4. returns the recorded episodes as trajectories: the exact prompt and sampled ids, the sampler's
   logprobs, the agent's reward and metrics, and the strict score of the recorded messages.

Synchronous only (``max_steps_off_policy = 0``): the sampler is the trainer's own module, paused
while the weights change.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from mtrl_local import metrics as M
from mtrl_local.errors import UserError
from mtrl_local.rollout.sampler import Sampler, SamplingParams
from mtrl_local.rollout.transformers_sampler import TransformersSampler
from mtrl_local.scoring import Scorer
from mtrl_local.server.agents import AgentContext, AgentFunction, AgentRun
from mtrl_local.server.app import RolloutServer
from mtrl_local.server.episodes import FAILED, EpisodeRecord
from mtrl_local.task import Task
from mtrl_local.train.batch_source import CasePicker, StepBatch, step_seed
from mtrl_local.train.trainer import Trainer

logger = logging.getLogger(__name__)


class AgentBatchSource:
    """Produces :class:`StepBatch` es from an external agent's episodes (module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Task,
        *,
        agent: list[str] | AgentFunction,
        n_samples: int,
        sampling: SamplingParams,
        max_turns: int,
        scorer: Scorer,
        pick_cases: CasePicker,
        seed: int,
        device: torch.device,
        max_batch: int,
        workers: int = 8,
        sampler: Sampler | None = None,
        log_dir: Path | None = None,
        idle_timeout_s: float = 120.0,
        episode_timeout_s: float = 900.0,
        agent_env: Mapping[str, str] | None = None,
    ) -> None:
        #: A command line (run in a subprocess) or a function (run on a thread).
        self.agent = agent
        self.task = task
        self.n_samples = n_samples
        self.sampling = sampling
        self.max_turns = max_turns
        self.scorer = scorer
        self.pick_cases = pick_cases
        self.seed = seed
        self.workers = max(1, workers)
        self.log_dir = log_dir
        self.idle_timeout_s = idle_timeout_s
        self.episode_timeout_s = episode_timeout_s
        self.agent_env = dict(agent_env or {})
        #: Stale batches dropped (always 0: this source is synchronous).
        self.dropped = 0
        self._shared = sampler is None
        self.sampler: Sampler = sampler or TransformersSampler(
            cast(PreTrainedModel, model), tokenizer, device=device, max_batch=max_batch
        )
        self.server = RolloutServer(
            self.sampler,
            tokenizer,
            sampling=sampling,
            max_batch=max_batch,
            idle_timeout_s=idle_timeout_s,
            model_name=str(getattr(getattr(model, "config", None), "_name_or_path", "policy")),
        ).start()
        self._pool = (
            ThreadPoolExecutor(self.workers, thread_name_prefix="agent")
            if callable(self.agent)
            else None
        )
        self._position = (0, 0)
        self._step = 0
        #: Per-step agent counters, summed over the run (logged as ``agent/*``).
        self.totals: Counter[str] = Counter()

    # -- the BatchSource interface --------------------------------------------------------------
    def start(self, data_position: int, epoch: int, step: int, policy_version: int) -> None:
        self._position = (data_position, epoch)
        self._step = step
        self.sampler.policy_version = policy_version

    def next_batch(self, step: int) -> StepBatch:
        """Run one step's episodes through the agent and return what the server recorded."""
        started = time.perf_counter()
        position, epoch = self._position
        cases, position, epoch = self.pick_cases(position, epoch)
        seed = step_seed(self.seed, self._step)
        self.server.sampling = replace(self.sampling, seed=seed)
        contexts = self._assign(cases, seed)
        counts = self._run_agents(contexts)
        self.server.batcher.pause()  # nothing generates while the trainer updates the weights
        trajectories = []
        for ctx in contexts:
            version = self.sampler.policy_version
            traj = self.server.registry.trajectory(ctx.episode_id, version, self.scorer)
            trajectories.append(traj)
            self.server.registry.forget(ctx.episode_id)
        self._position = (position, epoch)
        self._step += 1
        failed = sum(t.failed for t in trajectories)
        mismatches = sum(t.counters.get("history_mismatch", 0) > 0 for t in trajectories)
        counts["failed"] = failed
        counts["history_mismatch"] = mismatches
        self.totals.update(counts)
        wall = time.perf_counter() - started
        logger.info(
            "agent step %d: %d episodes, %d failed (%s), %.1fs",
            step,
            len(trajectories),
            failed,
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v) or "none",
            wall,
        )
        batch = StepBatch(
            trajectories=trajectories,
            policy_version=self.sampler.policy_version,
            data_position=position,
            epoch=epoch,
            wall_s=wall,
            new_tokens=sum(s.n_tokens for t in trajectories for s in t.turns),
        )
        batch.metrics = {
            M.AGENT_FAILED_FRAC: failed / max(len(trajectories), 1),
            M.AGENT_HISTORY_MISMATCH: float(mismatches),
            M.AGENT_TIMEOUTS: float(counts.get("timeouts", 0)),
            M.AGENT_CRASHES: float(counts.get("crashes", 0)),
        }
        return batch

    def update_weights(self, model: torch.nn.Module, version: int) -> None:
        """After an optimizer step: drop caches made with the old weights, then serve again."""
        if self._shared:
            cast(TransformersSampler, self.sampler).invalidate(version)
        else:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.sampler.load_state_dict(state, version)
        self.server.batcher.resume()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.server.stop()

    # -- one step --------------------------------------------------------------------------------
    def _assign(self, cases: list[Any], seed: int) -> list[AgentContext]:
        contexts = []
        for case in cases:
            for s in range(self.n_samples):
                episode_id = f"s{self._step:05d}-{case.case_id}-{s}"
                record = self.server.registry.assign(
                    EpisodeRecord(
                        episode_id,
                        task=self.task.name,
                        case_id=case.case_id,
                        split=getattr(case, "split", ""),
                        ground_truth=dict(getattr(case, "ground_truth", {}) or {}),
                        group_id=str(case.case_id),
                        sample_index=s,
                        seed=seed,
                        max_turns=self.max_turns,
                    )
                )
                contexts.append(
                    AgentContext(
                        base_url=self.server.url,
                        api_key=record.key,
                        episode_id=episode_id,
                        task=self.task.name,
                        case_id=case.case_id,
                        split=getattr(case, "split", ""),
                        group_id=str(case.case_id),
                        sample_index=s,
                        seed=seed,
                        max_turns=self.max_turns,
                        max_tokens=self.sampling.max_tokens,
                    )
                )
        return contexts

    def _launch(self, ctx: AgentContext) -> AgentRun:
        if callable(self.agent):
            assert self._pool is not None
            return AgentRun.in_thread(self._pool, self.agent, ctx)
        log = None
        if self.log_dir is not None:
            log = self.log_dir / f"step-{self._step:05d}" / f"{ctx.episode_id}.log"
        return AgentRun.in_process(self.agent, ctx, {**os.environ, **self.agent_env}, log)

    def _run_agents(self, contexts: list[AgentContext]) -> Counter[str]:
        """Launch, watch and reap every episode's agent; returns the step's counters."""
        registry = self.server.registry
        pending = list(contexts)
        running: list[AgentRun] = []
        counts: Counter[str] = Counter()
        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    running.append(self._launch(pending.pop(0)))
                time.sleep(0.02)
                for i in registry.expire(self.idle_timeout_s):
                    counts["timeouts"] += 1
                    logger.warning(
                        "episode %s: no request or report for %.0fs", i, self.idle_timeout_s
                    )
                still: list[AgentRun] = []
                now = time.monotonic()
                for run in running:
                    rec = registry.get(run.ctx.episode_id)
                    if run.exited():
                        if not rec.done:
                            counts["crashes"] += 1
                            registry.fail(run.ctx.episode_id, run.why_failed())
                        continue
                    if rec.state == FAILED:
                        run.kill()  # timed out or rewrote history: its work is not used
                        continue
                    if rec.done:
                        # Reported: give the agent a moment to exit on its own.
                        run.reported_at = run.reported_at or now
                        if now - run.reported_at > 10.0:
                            run.kill()
                            continue
                    elif now - run.started > self.episode_timeout_s:
                        counts["timeouts"] += 1
                        run.kill()
                        registry.fail(
                            run.ctx.episode_id, f"timeout: ran past {self.episode_timeout_s:g}s"
                        )
                        continue
                    still.append(run)
                running = still
        finally:
            for run in running:
                run.kill()
        return counts


def agent_source_factory(
    agent: list[str] | AgentFunction,
    *,
    workers: int | None = None,
    idle_timeout_s: float = 120.0,
    episode_timeout_s: float = 900.0,
    sampler: Sampler | None = None,
    agent_env: Mapping[str, str] | None = None,
) -> Callable[[Trainer], AgentBatchSource]:
    """What ``Trainer(..., source_factory=…)`` takes to train ``agent`` instead of a built-in env.

    ``workers`` defaults to one agent per episode of the step (all of a step's episodes at once,
    which is what lets the server batch their requests).
    """

    def build(trainer: Trainer) -> AgentBatchSource:
        cfg = trainer.cfg
        if cfg.async_config.max_steps_off_policy != 0:
            raise UserError(
                "agent training is synchronous: set async_config.max_steps_off_policy=0"
            )
        return AgentBatchSource(
            trainer.model,
            trainer.tokenizer,
            trainer.task,
            agent=agent,
            n_samples=cfg.num_generations,
            sampling=trainer.sampling,
            max_turns=trainer.max_turns,
            scorer=trainer.scorer,
            pick_cases=trainer.schedule.pick,
            seed=cfg.seed,
            device=trainer.device,
            max_batch=cfg.per_device_train_batch_size,
            workers=workers or cfg.per_device_train_batch_size,
            sampler=sampler,
            log_dir=trainer.run.agent_logs,
            idle_timeout_s=idle_timeout_s,
            episode_timeout_s=episode_timeout_s,
            agent_env=agent_env,
        )

    return build


__all__ = ["AgentBatchSource", "AgentContext", "AgentFunction", "agent_source_factory"]
