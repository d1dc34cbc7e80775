"""The multi-turn rollout engine: every active episode's next turn in one batched decode.

Token in, token out (docs/design.md, "Trajectories"): each episode's trajectory is built by
appending ids only (:mod:`mtrl_local.rollout.episode`); the sampled ids are decoded only to drive
the environment, and the decoded text is never encoded again.

The loop: start episodes until ``max_batch`` are active; ask the sampler for one turn of all of them
in a single ``generate`` call; step each environment with its turn's text; finished episodes leave
(their environment is closed and their sampler state released), the others get their tool results
appended and take part in the next call. Environments are torn down in ``finally`` whatever
happens; an environment that raises marks its episode ``failed`` without stopping the others.

Departures from a single-turn sampler worth knowing:

* A turn cut at the token budget (finish ``length``) is closed with an eos that the model did not
  sample (``loss_mask`` 0) before the tool results, so the context stays in the chat format; the
  environment sees the cut text and answers as its interface says (an unterminated tool call is an
  error result; a turn with no tool call ends the episode with ``no_action``).
* Per-turn finish reasons are the sampler's (``stop``/``length``), or ``error`` when the
  environment failed on that turn; ``max_turns`` is the episode's ``done_reason``.
* An episode whose context would reach the model's context window ends with ``done_reason``
  ``length``: each turn's budget is also capped by the room left.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mtrl_local.chat_codec import ChatCodec
from mtrl_local.chat_formats import ChatFormat
from mtrl_local.env import ToolLimits
from mtrl_local.rollout.episode import EpisodeRun
from mtrl_local.rollout.sampler import (
    GenerationRequest,
    Sampler,
    SamplingParams,
)
from mtrl_local.scoring import RewardFn, Scorer, apply_reward
from mtrl_local.task import Task
from mtrl_local.trajectory import Trajectory

logger = logging.getLogger(__name__)


@dataclass
class RolloutStats:
    """Counters of one :meth:`RolloutEngine.run` (logged by callers)."""

    episodes: int = 0
    failed: int = 0
    turns: int = 0
    sampled_tokens: int = 0
    generate_calls: int = 0
    seconds: float = 0.0
    #: Summed :attr:`Trajectory.counters` (truncated_turns, malformed_tool_calls, …).
    counters: Counter[str] = field(default_factory=Counter)

    @property
    def tokens_per_s(self) -> float:
        """Sampled tokens per wall-clock second (``perf/rollout_tokens_per_s``)."""
        return self.sampled_tokens / self.seconds if self.seconds > 0 else 0.0


def episode_key(case_id: str, sample_index: int) -> str:
    """The sampler key of an episode: unique within a run, the same in every run."""
    return f"{case_id}#{sample_index}"


#: One episode to run: (output index, case, sample index, sampler key).
Job = tuple[int, Any, int, str]
#: An episode in flight and its output index.
Active = tuple[int, EpisodeRun]


@dataclass
class _Call:
    """The state of one :meth:`RolloutEngine.run` call."""

    task: Task
    params: SamplingParams
    max_turns: int
    seed: int
    version: int
    reward_fn: RewardFn | None
    scorer: Scorer | None
    jobs: deque[Job]
    out: list[Trajectory | None] = field(default_factory=list)
    active: list[Active] = field(default_factory=list)
    #: Every started, unfinished episode (teardown in ``finally`` walks this, not ``active``).
    live: dict[int, EpisodeRun] = field(default_factory=dict)
    stats: RolloutStats = field(default_factory=RolloutStats)
    bar: Any = None


def _jobs(cases: Sequence[Any], n_samples: int) -> deque[Job]:
    """Every (case, sample) in case-major order, each with a unique sampler key."""
    jobs: deque[Job] = deque()
    seen: Counter[str] = Counter()
    for case in cases:
        for s in range(n_samples):
            key = episode_key(case.case_id, s)
            seen[key] += 1
            if seen[key] > 1:  # the same case listed twice: keep keys unique
                key = f"{key}~{seen[key] - 1}"
            jobs.append((len(jobs), case, s, key))
    return jobs


def _log_stats(task_name: str, stats: RolloutStats) -> None:
    logger.info(
        "rollout %s: %d episodes (%d failed), %d turns, %d tokens in %.1fs (%.0f tok/s), "
        "%d generate calls",
        task_name,
        stats.episodes,
        stats.failed,
        stats.turns,
        stats.sampled_tokens,
        stats.seconds,
        stats.tokens_per_s,
        stats.generate_calls,
    )


class RolloutEngine:
    """Runs episodes of a task against a :class:`Sampler`, all turns batched."""

    def __init__(
        self,
        sampler: Sampler,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch: int = 64,
        progress: bool = True,
        tool_limits: ToolLimits | None = None,
        chat_format: ChatFormat | str = "auto",
    ) -> None:
        """``tool_limits`` override the environments' own tool timeout and output cap;
        ``chat_format`` is how the model writes tool calls (:mod:`mtrl_local.chat_formats`)."""
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.codec = ChatCodec(tokenizer, chat_format)
        self.max_batch = max_batch
        self.progress = progress
        self.tool_limits = tool_limits or ToolLimits()
        self.eos_token_id: int = sampler.eos_token_id
        #: Counters of the last :meth:`run`.
        self.stats = RolloutStats()

    def run(
        self,
        task: Task,
        cases: Sequence[Any],
        *,
        n_samples: int = 1,
        sampling: SamplingParams,
        max_turns: int | None = None,
        seed: int = 0,
        policy_version: int | None = None,
        reward_fn: RewardFn | None = None,
        scorer: Scorer | None = None,
    ) -> list[Trajectory]:
        """One trajectory per (case, sample), in that order (case-major).

        ``seed`` seeds the environments (every sample of a case faces the same world, which is
        what group-relative advantages compare) and, unless ``sampling.seed`` is set, the sampler;
        the trainer should pass a new seed each step. ``policy_version`` defaults to the sampler's.
        ``reward_fn(messages, ground_truth) -> RewardResult`` fills ``reward`` and ``metrics``;
        ``scorer(messages, ground_truth)`` fills ``strict`` (the strict scorer, handed in by the
        caller: the engine applies it once per episode and everything downstream reads it).
        """

        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        call = _Call(
            task=task,
            params=sampling if sampling.seed is not None else replace(sampling, seed=seed),
            max_turns=max_turns or task.max_turns,
            seed=seed,
            version=self.sampler.policy_version if policy_version is None else policy_version,
            reward_fn=reward_fn,
            scorer=scorer,
            jobs=_jobs(cases, n_samples),
        )
        call.out = [None] * len(call.jobs)
        call.bar = tqdm(
            total=len(call.jobs), desc=f"rollout {task.name}", disable=not self.progress
        )
        self.stats = call.stats
        started = time.perf_counter()
        try:
            while call.jobs or call.active:
                self._admit(call)
                batch, requests = self._requests(call)
                if batch:
                    self._generate(call, batch, requests)
                else:
                    call.active = []
        finally:
            # Teardown whatever happened: every environment still open is closed, every
            # sampler state released (a no-op for the finished ones).
            for run in call.live.values():
                run.episode.abort("error")
                self.sampler.release(run.key)
            call.bar.close()
            call.stats.seconds = time.perf_counter() - started
        _log_stats(task.name, call.stats)
        return [t for t in call.out if t is not None]

    # -- the batch -------------------------------------------------------------------------------
    def _admit(self, call: _Call) -> None:
        """Start episodes until ``max_batch`` are active (one that fails to start finishes)."""
        while call.jobs and len(call.active) < self.max_batch:
            index, case, s, key = call.jobs.popleft()
            run = EpisodeRun.start(
                call.task,
                case,
                self.codec,
                sample_index=s,
                key=key,
                seed=call.seed,
                max_turns=call.max_turns,
                version=call.version,
                tool_limits=self.tool_limits,
            )
            call.live[index] = run
            if run.traj.failed:
                self._finish(call, index, run, "error")
            else:
                call.active.append((index, run))

    def _requests(self, call: _Call) -> tuple[list[Active], list[GenerationRequest]]:
        """This turn's request of every active episode that still has room in the context."""
        batch: list[Active] = []
        requests: list[GenerationRequest] = []
        for index, run in call.active:
            room = run.room(self.sampler.max_context_len)
            if room is not None and room < 1:
                run.traj.counters["context_overflow"] += 1
                run.episode.abort("aborted")
                self._finish(call, index, run, "length")
                continue
            budget = None if room is None else min(room, call.params.max_tokens)
            requests.append(GenerationRequest(run.key, run.traj.input_ids, budget))
            batch.append((index, run))
        return batch, requests

    def _generate(
        self,
        call: _Call,
        batch: list[Active],
        requests: list[GenerationRequest],
    ) -> None:
        """One ``generate`` call for the whole batch; each episode steps its environment."""
        results = self.sampler.generate(requests, call.params)
        call.stats.generate_calls += 1
        if len(results) != len(batch):
            raise RuntimeError(f"sampler returned {len(results)} results for {len(batch)}")
        call.active = []
        for (index, run), result in zip(batch, results, strict=True):
            call.stats.sampled_tokens += len(result.token_ids)
            reason = run.advance(result, self.codec, self.sampler.max_context_len)
            if run.episode.done or run.traj.failed:
                self._finish(call, index, run, reason)
            else:
                call.active.append((index, run))

    def _finish(self, call: _Call, index: int, run: EpisodeRun, reason: str | None = None) -> None:
        """Close the episode, fill the trajectory's outcome, score it once."""
        call.live.pop(index, None)
        traj, ep = run.traj, run.episode
        ep.close()
        self.sampler.release(run.key)
        traj.messages = list(ep.messages)
        traj.done_reason = reason or ep.stats.done_reason
        traj.tool_calls, traj.tool_errors = ep.stats.tool_calls, ep.stats.tool_errors
        traj.counters = {k: int(v) for k, v in traj.counters.items() if v}
        if traj.messages:
            if call.scorer is not None:
                traj.strict = call.scorer(traj.messages, traj.ground_truth)
            if call.reward_fn is not None:
                traj.reward, traj.metrics = apply_reward(
                    call.reward_fn, traj.messages, traj.ground_truth
                )
        call.out[index] = traj
        call.stats.episodes += 1
        call.stats.failed += int(traj.failed)
        call.stats.turns += traj.n_turns
        call.stats.counters.update(traj.counters)
        call.bar.update(1)


__all__ = ["RolloutEngine", "RolloutStats", "episode_key"]
