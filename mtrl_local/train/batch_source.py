"""Batch sources: where a training step's episodes come from.

A :class:`BatchSource` hands the trainer one :class:`StepBatch` per step. This module's
:class:`EngineBatchSource` runs the task's own environment through the rollout engine; the
rollout server's :class:`~mtrl_local.server.source.AgentBatchSource` runs a user's agent.
:class:`CaseSchedule` decides which training cases each step uses.

Synchronous (``max_steps_off_policy = 0``): the trainer's own model samples the batch, then
learns from it; every rollout is on-policy.

Asynchronous (docs/design.md, "Async rollouts"): a worker thread samples with its own copy of the
weights while the trainer updates. A batch made by policy version v may be consumed at step s only
if ``s − v ≤ max_steps_off_policy``; older ones are dropped and counted. After every optimizer step
the trainer hands the worker the new weights, which it loads between batches. The queue holds at
most ``max_steps_off_policy`` batches, so the worker never runs further ahead than can be used.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from transformers import PreTrainedModel

from mtrl_local.env import ToolLimits
from mtrl_local.rollout.engine import RolloutEngine
from mtrl_local.rollout.sampler import Sampler, SamplingParams
from mtrl_local.rollout.transformers_sampler import TransformersSampler
from mtrl_local.scoring import RewardFn, Scorer
from mtrl_local.task import Task
from mtrl_local.train.distributed import full_state_dict
from mtrl_local.trajectory import Trajectory

logger = logging.getLogger(__name__)


@dataclass
class StepBatch:
    """One step's worth of trajectories and how they were made."""

    trajectories: list[Trajectory]
    policy_version: int
    #: The data position after this batch (where the next batch starts).
    data_position: int
    epoch: int
    wall_s: float
    new_tokens: int
    #: Source-specific metrics logged with the step (e.g. ``agent/*`` of the agent source).
    metrics: dict[str, float] = field(default_factory=dict)


#: (data_position, epoch) → (cases, next position, next epoch)
CasePicker = Callable[[int, int], tuple[list[Any], int, int]]


class CaseSchedule:
    """The training cases of each step: ``per_step`` cases at a time, in an order reshuffled
    (seeded) every epoch; ``(position, epoch)`` is all the state a resume needs."""

    def __init__(self, cases: Sequence[Any], per_step: int, seed: int) -> None:
        self.cases = list(cases)
        self.per_step = per_step
        self.seed = seed

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.cases)))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        return order

    def pick(self, position: int, epoch: int) -> tuple[list[Any], int, int]:
        """The next ``per_step`` cases from ``(position, epoch)``; wraps into the next epoch."""
        cases = []
        order = self._order(epoch)
        for _ in range(self.per_step):
            if position >= len(order):
                position, epoch = 0, epoch + 1
                order = self._order(epoch)
            cases.append(self.cases[order[position]])
            position += 1
        return cases, position, epoch


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s episodes (environments and sampler noise)."""
    return seed * 1_000_003 + step


class BatchSource(Protocol):
    """What the trainer needs from a batch source (this module's, or the agent server's)."""

    sampler: Sampler
    dropped: int

    def start(self, data_position: int, epoch: int, step: int, policy_version: int) -> None: ...

    def next_batch(self, step: int) -> StepBatch: ...

    def update_weights(self, model: torch.nn.Module, version: int) -> None: ...

    def close(self) -> None: ...


class EngineBatchSource:
    """Produces :class:`StepBatch` es; see the module docstring for the two modes."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Task,
        *,
        n_samples: int,
        sampling: SamplingParams,
        max_turns: int,
        reward_fn: RewardFn,
        scorer: Scorer,
        pick_cases: CasePicker,
        seed: int,
        max_steps_off_policy: int,
        device: torch.device,
        max_batch: int,
        sampler: Sampler | None = None,
        inference_copy: torch.nn.Module | None = None,
        tool_limits: ToolLimits | None = None,
    ) -> None:
        """``inference_copy``: a whole copy of the weights to sample with when ``model`` is sharded
        (FSDP); it gets the policy's weights after every step. ``tool_limits`` override the
        environments' tool timeout and output cap."""
        self.task = task
        self.n_samples = n_samples
        self.sampling = sampling
        self.max_turns = max_turns
        self.reward_fn = reward_fn
        self.scorer = scorer
        self.pick_cases = pick_cases
        self.seed = seed
        self.staleness = max_steps_off_policy
        self.dropped = 0
        self._error: BaseException | None = None
        #: Sync with the built-in sampler: the sampler shares the trainer's module (no copy).
        self._shared = sampler is None and inference_copy is None and self.staleness == 0
        self.sampler: Sampler
        if sampler is not None:
            self.sampler = sampler  # any Sampler (vLLM, scripted, a remote server)
        elif inference_copy is not None:
            self.sampler = TransformersSampler(
                cast(PreTrainedModel, inference_copy), tokenizer, device=device, max_batch=max_batch
            )
        elif self._shared:
            self.sampler = TransformersSampler(
                cast(PreTrainedModel, model), tokenizer, device=device, max_batch=max_batch
            )
        else:
            self.sampler = TransformersSampler(
                cast(PreTrainedModel, copy.deepcopy(model)),
                tokenizer,
                device=device,
                max_batch=max_batch,
            )
        self.engine = RolloutEngine(
            self.sampler, tokenizer, max_batch=max_batch, progress=False, tool_limits=tool_limits
        )
        self._queue: queue.Queue[StepBatch] = queue.Queue(maxsize=max(1, self.staleness))
        self._pending: tuple[Mapping[str, Any], int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._position = (0, 0)
        self._batch_index = 0

    # -- both modes --------------------------------------------------------------------------------
    def start(self, data_position: int, epoch: int, step: int, policy_version: int) -> None:
        """Produce batches from ``(data_position, epoch)`` for steps ``step``, ``step+1``…"""
        self._position = (data_position, epoch)
        self._batch_index = step
        self.sampler.policy_version = policy_version
        if self.staleness > 0:
            self._thread = threading.Thread(target=self._work, name="rollout-worker", daemon=True)
            self._thread.start()

    def _make(self) -> StepBatch:
        position, epoch = self._position
        cases, position, epoch = self.pick_cases(position, epoch)
        trajectories = self.engine.run(
            self.task,
            cases,
            n_samples=self.n_samples,
            sampling=self.sampling,
            max_turns=self.max_turns,
            seed=step_seed(self.seed, self._batch_index),
            reward_fn=self.reward_fn,
            scorer=self.scorer,
        )
        self._position = (position, epoch)
        self._batch_index += 1
        stats = self.engine.stats
        return StepBatch(
            trajectories=trajectories,
            policy_version=self.sampler.policy_version,
            data_position=position,
            epoch=epoch,
            wall_s=stats.seconds,
            new_tokens=stats.sampled_tokens,
        )

    def next_batch(self, step: int) -> StepBatch:
        """The batch to learn from at ``step`` (blocks until one is fresh enough)."""
        if self.staleness == 0:
            return self._make()
        while True:
            if self._error is not None:
                raise RuntimeError("rollout worker failed") from self._error
            try:
                batch = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if step - batch.policy_version <= self.staleness:
                return batch
            self.dropped += 1
            logger.info(
                "dropped a stale batch: made by version %d, step %d (max %d off-policy)",
                batch.policy_version,
                step,
                self.staleness,
            )

    def update_weights(self, model: torch.nn.Module, version: int) -> None:
        """After an optimizer step: the sampler must use ``version`` from now on."""
        if self._shared:
            # Same module: only the cached keys/values (computed with old weights) must go.
            cast(TransformersSampler, self.sampler).invalidate(version)
            return
        # Whole weights even from a sharded (FSDP) policy: a collective every process joins.
        state = {k: v.detach().clone() for k, v in full_state_dict(model).items()}
        if self.staleness == 0:
            self.sampler.load_state_dict(state, version)
            return
        with self._lock:
            self._pending = (state, version)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # Unblock a worker waiting to put into a full queue.
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                self._thread.join(timeout=0.2)

    # -- the worker (async only) -------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    pending, self._pending = self._pending, None
                if pending is not None:
                    self.sampler.load_state_dict(pending[0], pending[1])
                batch = self._make()
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced to the trainer by next_batch
            logger.exception("rollout worker failed")
            self._error = exc
