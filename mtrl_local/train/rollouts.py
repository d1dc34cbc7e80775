"""Where a step's rollouts come from: now (synchronous) or from a background worker (async).

Synchronous (``max_steps_off_policy = 0``): the trainer's own model samples the batch, then
learns from it; every rollout is on-policy.

Asynchronous (DESIGN.md §7): a worker thread samples with its own copy of the weights while the
trainer updates. A batch made by policy version v may be consumed at step s only if
``s − v ≤ max_steps_off_policy``; older ones are dropped and counted. After every optimizer step
the trainer hands the worker the new weights, which it loads between batches. The queue holds at
most ``max_steps_off_policy`` batches, so the worker never runs further ahead than can be used.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from transformers import PreTrainedModel

from mtrl_local.rollout.backend import GenerationBackend, SamplingParams
from mtrl_local.rollout.engine import RolloutEngine
from mtrl_local.rollout.transformers_backend import TransformersBackend
from mtrl_local.train.distributed import full_state_dict
from mtrl_local.trajectory import Trajectory

logger = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
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


class BatchSource(Protocol):
    """What the trainer needs from a rollout source (this module's, or the agent server's)."""

    backend: GenerationBackend
    dropped: int

    def start(self, data_position: int, epoch: int, step: int, policy_version: int) -> None: ...

    def next_batch(self, step: int) -> RolloutBatch: ...

    def update_weights(self, model: torch.nn.Module, version: int) -> None: ...

    def close(self) -> None: ...


class RolloutSource:
    """Produces :class:`RolloutBatch` es; see the module docstring for the two modes."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Any,
        *,
        n_samples: int,
        sampling: SamplingParams,
        max_turns: int,
        reward_fn: Any,
        pick_cases: CasePicker,
        seed_for_step: Callable[[int], int],
        max_steps_off_policy: int,
        device: torch.device,
        max_batch: int,
        backend: GenerationBackend | None = None,
        sampler: torch.nn.Module | None = None,
    ) -> None:
        """``sampler``: a whole copy of the weights to sample with when ``model`` is sharded
        (FSDP); it gets the policy's weights after every step."""
        self.task = task
        self.n_samples = n_samples
        self.sampling = sampling
        self.max_turns = max_turns
        self.reward_fn = reward_fn
        self.pick_cases = pick_cases
        self.seed_for_step = seed_for_step
        self.staleness = max_steps_off_policy
        self.dropped = 0
        self._error: BaseException | None = None
        #: Sync with the built-in backend: the sampler shares the trainer's module (no copy).
        self._shared = backend is None and sampler is None and self.staleness == 0
        self.backend: GenerationBackend
        if backend is not None:
            self.backend = backend  # any GenerationBackend (vLLM, scripted, a remote server)
        elif sampler is not None:
            self.backend = TransformersBackend(
                cast(PreTrainedModel, sampler), tokenizer, device=device, max_batch=max_batch
            )
        elif self._shared:
            self.backend = TransformersBackend(
                cast(PreTrainedModel, model), tokenizer, device=device, max_batch=max_batch
            )
        else:
            self.backend = TransformersBackend(
                cast(PreTrainedModel, copy.deepcopy(model)),
                tokenizer,
                device=device,
                max_batch=max_batch,
            )
        self.engine = RolloutEngine(self.backend, tokenizer, max_batch=max_batch, progress=False)
        self._queue: queue.Queue[RolloutBatch] = queue.Queue(maxsize=max(1, self.staleness))
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
        self.backend.policy_version = policy_version
        if self.staleness > 0:
            self._thread = threading.Thread(target=self._work, name="rollout-worker", daemon=True)
            self._thread.start()

    def _make(self) -> RolloutBatch:
        position, epoch = self._position
        cases, position, epoch = self.pick_cases(position, epoch)
        trajectories = self.engine.run(
            self.task,
            cases,
            n_samples=self.n_samples,
            sampling=self.sampling,
            max_turns=self.max_turns,
            seed=self.seed_for_step(self._batch_index),
            reward_fn=self.reward_fn,
        )
        self._position = (position, epoch)
        self._batch_index += 1
        stats = self.engine.stats
        return RolloutBatch(
            trajectories=trajectories,
            policy_version=self.backend.policy_version,
            data_position=position,
            epoch=epoch,
            wall_s=stats.seconds,
            new_tokens=stats.sampled_tokens,
        )

    def next_batch(self, step: int) -> RolloutBatch:
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
            cast(TransformersBackend, self.backend).invalidate(version)
            return
        # Whole weights even from a sharded (FSDP) policy: a collective every process joins.
        state = {k: v.detach().clone() for k, v in full_state_dict(model).items()}
        if self.staleness == 0:
            self.backend.load_state_dict(state, version)
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
                    self.backend.load_state_dict(pending[0], pending[1])
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
