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

Dynamic sampling (DAPO, arXiv 2503.14476; verl's ``filter_groups``), in both modes: a group
whose advantages are all zero teaches nothing, so it is dropped and more cases are sampled until
the batch has its number of groups again, at most ``max_refill_rounds`` extra rounds (each
sampling only the missing cases). Still short after them, the batch is topped up
with dropped groups, so its shape never changes. The counts go to the step's metrics.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import queue
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from transformers import PreTrainedModel

from mtrl_local import metrics as M
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


class CasePicker(Protocol):
    """(data_position, epoch[, count]) → (cases, next position, next epoch); ``count`` cases
    instead of a step's worth."""

    def __call__(
        self, position: int, epoch: int, count: int | None = None, /
    ) -> tuple[list[Any], int, int]: ...


#: The ids of the groups of these trajectories whose advantages are all zero.
ZeroGroups = Callable[[Sequence[Trajectory]], set[str]]


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

    def pick(
        self, position: int, epoch: int, count: int | None = None
    ) -> tuple[list[Any], int, int]:
        """The next ``count`` (default ``per_step``) cases from ``(position, epoch)``; wraps into
        the next epoch."""
        cases = []
        order = self._order(epoch)
        for _ in range(self.per_step if count is None else count):
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
        chat_format: str = "auto",
        zero_groups: ZeroGroups | None = None,
        max_refill_rounds: int = 0,
    ) -> None:
        """``inference_copy``: a whole copy of the weights to sample with when ``model`` is sharded
        (FSDP); it gets the policy's weights after every step. ``tool_limits`` override the
        environments' tool timeout and output cap; ``chat_format`` is the model's tool-call
        format. ``zero_groups``: the advantage estimator's zero-advantage groups, for dynamic
        sampling (module docstring; ``None`` = off) with ``max_refill_rounds`` extra rounds."""
        self.task = task
        self.n_samples = n_samples
        self.sampling = sampling
        self.max_turns = max_turns
        self.reward_fn = reward_fn
        self.scorer = scorer
        self.pick_cases = pick_cases
        self.seed = seed
        self.staleness = max_steps_off_policy
        self.zero_groups = zero_groups
        self.max_refill_rounds = max_refill_rounds
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
            self.sampler,
            tokenizer,
            max_batch=max_batch,
            progress=False,
            tool_limits=tool_limits,
            chat_format=chat_format,
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

    def _run(self, cases: list[Any], seed: int) -> list[Trajectory]:
        return self.engine.run(
            self.task,
            cases,
            n_samples=self.n_samples,
            sampling=self.sampling,
            max_turns=self.max_turns,
            seed=seed,
            reward_fn=self.reward_fn,
            scorer=self.scorer,
        )

    def _make(self) -> StepBatch:
        position, epoch = self._position
        cases, position, epoch = self.pick_cases(position, epoch)
        seed = step_seed(self.seed, self._batch_index)
        trajectories = self._run(cases, seed)
        stats = self.engine.stats  # this run's
        batch = StepBatch(
            trajectories=trajectories,
            policy_version=self.sampler.policy_version,
            data_position=position,
            epoch=epoch,
            wall_s=stats.seconds,
            new_tokens=stats.sampled_tokens,
        )
        if self.zero_groups is not None:
            self._refill(batch, len(cases), seed, self.zero_groups)
        self._position = (batch.data_position, batch.epoch)
        self._batch_index += 1
        return batch

    def _refill(self, batch: StepBatch, n_groups: int, seed: int, zero_groups: ZeroGroups) -> None:
        """Dynamic sampling: ``batch`` with its zero-advantage groups replaced by new ones (module
        docstring); the extra rounds' episodes, tokens and seconds added to it."""
        kept, spare = split_groups(batch.trajectories, zero_groups(batch.trajectories))
        rounds = episodes = 0
        while len(kept) < n_groups and rounds < self.max_refill_rounds:
            rounds += 1
            cases, batch.data_position, batch.epoch = self.pick_cases(
                batch.data_position, batch.epoch, n_groups - len(kept)
            )
            more = self._run(cases, refill_seed(seed, rounds))
            episodes += len(more)
            batch.wall_s += self.engine.stats.seconds
            batch.new_tokens += self.engine.stats.sampled_tokens
            rename_clashes(more, {g[0].group_id for g in kept + spare}, rounds)
            new_kept, new_spare = split_groups(more, zero_groups(more))
            kept, spare = kept + new_kept, spare + new_spare
        top_up = spare[: n_groups - len(kept)]
        batch.trajectories = [t for group in kept + top_up for t in group]
        batch.metrics.update(
            {
                M.GROUPS_DROPPED: float(len(spare) - len(top_up)),
                M.REFILL_ROUNDS: float(rounds),
                M.REFILL_EPISODES: float(episodes),
            }
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


def refill_seed(seed: int, round_: int) -> int:
    """The seed of refill round ``round_`` (≥ 1) of the step whose seed is ``seed``: a hash, so
    that it is no other step's seed, in 31 bits, so that any generator takes it."""
    digest = hashlib.blake2b(f"{seed}|refill|{round_}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def split_groups(
    trajectories: Sequence[Trajectory], zero: set[str]
) -> tuple[list[list[Trajectory]], list[list[Trajectory]]]:
    """``trajectories`` as groups, in order of first appearance: those not in ``zero``, and
    those in it."""
    groups: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        groups.setdefault(t.group_id, []).append(t)
    kept = [g for gid, g in groups.items() if gid not in zero]
    return kept, [g for gid, g in groups.items() if gid in zero]


def rename_clashes(trajectories: Sequence[Trajectory], taken: set[str], round_: int) -> None:
    """A refill round that wrapped around the case order may sample a case the batch already
    holds: its group gets the id ``<id>~r<round>``, so the two groups stay apart."""
    for t in trajectories:
        if t.group_id in taken:
            t.group_id = f"{t.group_id}~r{round_}"
