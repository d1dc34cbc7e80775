"""Training on an agent we did not write: its episodes, recorded by the rollout server, as batches.

:class:`AgentRolloutSource` is the trainer's rollout source for bring-your-own agents (it has the
same five methods as :class:`~mtrl_local.train.rollouts.RolloutSource`). Each step it

1. picks the step's cases and assigns ``num_generations`` episodes to each (group = case), with
   ids the agent will send back;
2. launches the agent once per episode — a command (``python my_agent.py``) in a subprocess, or
   a Python function on a thread — at most ``workers`` at a time, with ``OPENAI_BASE_URL`` /
   ``OPENAI_API_KEY`` pointing at the server and the assignment in ``MTRL_*`` variables;
3. waits for every episode to report its reward. An agent that exits, raises or goes silent for
   ``idle_timeout_s`` (or runs past ``episode_timeout_s``) without reporting fails its episode:
   counted (``rollout/failure_rate``, ``agent/*``), never trained on, and the step goes on;
4. returns the recorded episodes as trajectories: the exact prompt and sampled ids, the sampler's
   logprobs, the agent's reward and metrics, and the strict score of the recorded messages.

Synchronous only (``max_steps_off_policy = 0``): the sampler is the trainer's own module, paused
while the weights change.
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import PreTrainedModel

from mtrl_local.errors import UserError
from mtrl_local.rollout.backend import GenerationBackend, SamplingParams
from mtrl_local.rollout.transformers_backend import TransformersBackend
from mtrl_local.server.app import RolloutServer
from mtrl_local.server.episodes import FAILED, EpisodeRecord
from mtrl_local.train.rollouts import CasePicker, RolloutBatch

if TYPE_CHECKING:
    from mtrl_local.train.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentContext:
    """What a Python-function agent gets (a command agent: the same, as environment variables)."""

    base_url: str
    api_key: str
    episode_id: str
    task: str
    case_id: str
    split: str
    group_id: str
    sample_index: int
    seed: int
    max_turns: int
    max_tokens: int

    def env(self) -> dict[str, str]:
        """The environment variables of a command agent."""
        return {
            "OPENAI_BASE_URL": self.base_url,
            "OPENAI_API_KEY": self.api_key,
            "MTRL_EPISODE_ID": self.episode_id,
            "MTRL_TASK": self.task,
            "MTRL_CASE_ID": self.case_id,
            "MTRL_SPLIT": self.split,
            "MTRL_GROUP_ID": self.group_id,
            "MTRL_SAMPLE_INDEX": str(self.sample_index),
            "MTRL_SEED": str(self.seed),
            "MTRL_MAX_TURNS": str(self.max_turns),
            "MTRL_MAX_TOKENS": str(self.max_tokens),
        }


AgentFunction = Callable[[AgentContext], Any]


def resolve_agent(agent: str | AgentFunction) -> list[str] | AgentFunction:
    """``module:function`` → that function; anything else is a command line (shell-split)."""
    if callable(agent):
        return agent
    module, sep, attr = agent.partition(":")
    if sep and " " not in agent and "/" not in module and not module.endswith(".py"):
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"agent '{agent}': cannot import it ({exc})") from None
        if not callable(fn):
            raise UserError(f"agent '{agent}' is not callable")
        return cast(AgentFunction, fn)
    argv = shlex.split(agent)
    if not argv:
        raise UserError("agent command is empty")
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable  # the trainer's interpreter: same venv, same packages
    return argv


class _Run:
    """One launched agent episode."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.started = time.monotonic()
        self.proc: subprocess.Popen[bytes] | None = None
        self.future: Future[Any] | None = None
        self.log: Path | None = None
        self.reported_at: float | None = None

    def exited(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        return self.future is not None and self.future.done()

    def why_failed(self) -> str:
        if self.proc is not None:
            tail = ""
            if self.log is not None and self.log.is_file():
                lines = self.log.read_text(errors="replace").strip().splitlines()
                tail = f" (last output: {lines[-1][:200]})" if lines else ""
            return f"agent exited with code {self.proc.returncode} without a reward{tail}"
        exc = self.future.exception() if self.future is not None else None
        if exc is not None:
            return f"agent raised {type(exc).__name__}: {exc}"
        return "agent returned without a reward"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class AgentRolloutSource:
    """Produces :class:`RolloutBatch` es from an external agent's episodes (module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Any,
        *,
        agent: str | AgentFunction,
        n_samples: int,
        sampling: SamplingParams,
        max_turns: int,
        pick_cases: CasePicker,
        seed_for_step: Callable[[int], int],
        device: torch.device,
        max_batch: int,
        workers: int = 8,
        backend: GenerationBackend | None = None,
        log_dir: Path | None = None,
        idle_timeout_s: float = 120.0,
        episode_timeout_s: float = 900.0,
        agent_env: Mapping[str, str] | None = None,
    ) -> None:
        self.agent = resolve_agent(agent)
        self.task = task
        self.n_samples = n_samples
        self.sampling = sampling
        self.max_turns = max_turns
        self.pick_cases = pick_cases
        self.seed_for_step = seed_for_step
        self.workers = max(1, workers)
        self.log_dir = log_dir
        self.idle_timeout_s = idle_timeout_s
        self.episode_timeout_s = episode_timeout_s
        self.agent_env = dict(agent_env or {})
        #: Stale batches dropped (always 0: this source is synchronous).
        self.dropped = 0
        self._shared = backend is None
        self.backend: GenerationBackend = backend or TransformersBackend(
            cast(PreTrainedModel, model), tokenizer, device=device, max_batch=max_batch
        )
        self.server = RolloutServer(
            self.backend,
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

    # -- the RolloutSource interface -------------------------------------------------------------
    def start(self, data_position: int, epoch: int, step: int, policy_version: int) -> None:
        self._position = (data_position, epoch)
        self._step = step
        self.backend.policy_version = policy_version

    def next_batch(self, step: int) -> RolloutBatch:
        """Run one step's episodes through the agent and return what the server recorded."""
        started = time.perf_counter()
        position, epoch = self._position
        cases, position, epoch = self.pick_cases(position, epoch)
        seed = self.seed_for_step(self._step)
        self.server.sampling = replace(self.sampling, seed=seed)
        contexts = self._assign(cases, seed)
        counts = self._run_agents(contexts)
        self.server.batcher.pause()  # nothing generates while the trainer updates the weights
        trajectories = []
        for ctx in contexts:
            traj = self.server.registry.trajectory(ctx.episode_id, self.backend.policy_version)
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
        batch = RolloutBatch(
            trajectories=trajectories,
            policy_version=self.backend.policy_version,
            data_position=position,
            epoch=epoch,
            wall_s=wall,
            new_tokens=sum(s.n_tokens for t in trajectories for s in t.turns),
        )
        batch.metrics = {
            "agent/failed_frac": failed / max(len(trajectories), 1),
            "agent/history_mismatch": float(mismatches),
            "agent/timeouts": float(counts.get("timeouts", 0)),
            "agent/crashes": float(counts.get("crashes", 0)),
        }
        return batch

    def update_weights(self, model: torch.nn.Module, version: int) -> None:
        """After an optimizer step: drop caches made with the old weights, then serve again."""
        if self._shared:
            cast(TransformersBackend, self.backend).invalidate(version)
        else:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.backend.load_state_dict(state, version)
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
                self.server.registry.assign(
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
                        api_key=self.server.token,
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

    def _launch(self, ctx: AgentContext) -> _Run:
        run = _Run(ctx)
        if callable(self.agent):
            assert self._pool is not None
            run.future = self._pool.submit(self.agent, ctx)
            return run
        env = {**os.environ, **self.agent_env, **ctx.env()}
        out: Any = subprocess.DEVNULL
        if self.log_dir is not None:
            folder = self.log_dir / f"step-{self._step:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            run.log = folder / f"{ctx.episode_id}.log"
            out = run.log.open("wb")
        try:
            run.proc = subprocess.Popen(
                self.agent, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        except OSError as exc:
            raise UserError(
                f"agent command {shlex.join(self.agent)!r} failed to start: {exc}"
            ) from None
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        return run

    def _run_agents(self, contexts: list[AgentContext]) -> Counter[str]:
        """Launch, watch and reap every episode's agent; returns the step's counters."""
        registry = self.server.registry
        pending = list(contexts)
        running: list[_Run] = []
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
                still: list[_Run] = []
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
    agent: str | AgentFunction,
    *,
    workers: int | None = None,
    idle_timeout_s: float = 120.0,
    episode_timeout_s: float = 900.0,
    backend: GenerationBackend | None = None,
    agent_env: Mapping[str, str] | None = None,
) -> Callable[[Trainer], AgentRolloutSource]:
    """What ``Trainer(..., source_factory=…)`` takes to train ``agent`` instead of a built-in env.

    ``workers`` defaults to one agent per episode of the step (all of a step's episodes at once,
    which is what lets the server batch their requests).
    """

    def build(trainer: Trainer) -> AgentRolloutSource:
        cfg = trainer.cfg
        if cfg.async_config.max_steps_off_policy != 0:
            raise UserError(
                "agent training is synchronous: set async_config.max_steps_off_policy=0"
            )
        return AgentRolloutSource(
            trainer.model,
            trainer.tokenizer,
            trainer.task,
            agent=agent,
            n_samples=cfg.num_generations,
            sampling=trainer.sampling,
            max_turns=trainer.max_turns,
            pick_cases=trainer.pick_cases,
            seed_for_step=lambda step: cfg.seed * 1_000_003 + step,
            device=trainer.device,
            max_batch=cfg.per_device_train_batch_size,
            workers=workers or cfg.per_device_train_batch_size,
            backend=backend,
            log_dir=trainer.run_dir / "agents",
            idle_timeout_s=idle_timeout_s,
            episode_timeout_s=episode_timeout_s,
            agent_env=agent_env,
        )

    return build


__all__ = ["AgentContext", "AgentRolloutSource", "agent_source_factory", "resolve_agent"]
