"""The multi-turn rollout engine: every active episode's next turn in one batched decode.

Token in, token out (DESIGN §3). An episode's trajectory is built only by appending ids: the
encoded prompt, then per turn the sampled ids exactly as the backend returned them (``loss_mask``
1, the behaviour logprobs) and the ids of the tool results and template glue
(:func:`~mtrl_local.chat.encode_continuation`, mask 0). The sampled ids are decoded only to drive
the environment; the decoded text is never encoded again.

The loop: start episodes until ``max_batch`` are active; ask the backend for one turn of all of them
in a single ``generate`` call; step each environment with its turn's text; finished episodes leave
(their environment is closed and their backend state released), the others get their tool results
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mtrl_local.chat import FINAL_CLOSE, encode_continuation, encode_prompt
from mtrl_local.env import Environment, Episode, StepResult, has_final_response
from mtrl_local.env.base import ERROR_PREFIX
from mtrl_local.rollout.backend import (
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from mtrl_local.trajectory import Trajectory, TurnSpan

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., Any]


class RolloutTask(Protocol):
    """What the engine needs from a task (``sopbench.Task`` is one)."""

    name: str

    def make_env(self) -> Environment: ...

    @property
    def max_turns(self) -> int: ...


@dataclass
class RolloutStats:
    """Counters of one :meth:`RolloutEngine.run` (logged by callers; see DESIGN §9)."""

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
    """The backend key of an episode: unique within a run, the same in every run."""
    return f"{case_id}#{sample_index}"


@dataclass
class _Running:
    """An episode in flight: its environment driver and the trajectory being built."""

    key: str
    episode: Episode
    traj: Trajectory


class RolloutEngine:
    """Runs episodes of a task against a :class:`GenerationBackend`, all turns batched."""

    def __init__(
        self,
        backend: GenerationBackend,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch: int = 64,
        progress: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.progress = progress
        self.eos_token_id: int = backend.eos_token_id
        #: Counters of the last :meth:`run`.
        self.stats = RolloutStats()

    def run(
        self,
        task: RolloutTask,
        cases: Sequence[Any],
        *,
        n_samples: int = 1,
        sampling: SamplingParams,
        max_turns: int | None = None,
        seed: int = 0,
        policy_version: int | None = None,
        reward_fn: RewardFunction | None = None,
    ) -> list[Trajectory]:
        """One trajectory per (case, sample), in that order (case-major).

        ``seed`` seeds the environments (every sample of a case faces the same world, which is
        what group-relative advantages compare) and, unless ``sampling.seed`` is set, the sampler;
        the trainer should pass a new seed each step. ``policy_version`` defaults to the backend's.
        ``reward_fn(messages, ground_truth) -> RewardResult`` fills ``reward`` and ``metrics``;
        ``strict`` is always the strict scorer's.
        """
        from rewards.strict import strict_score

        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        params = sampling if sampling.seed is not None else replace(sampling, seed=seed)
        turns_cap = max_turns or task.max_turns
        version = self.backend.policy_version if policy_version is None else policy_version
        self.stats = stats = RolloutStats()
        started = time.perf_counter()

        jobs: deque[tuple[int, Any, int, str]] = deque()
        seen: Counter[str] = Counter()
        for case in cases:
            for s in range(n_samples):
                key = episode_key(case.case_id, s)
                seen[key] += 1
                if seen[key] > 1:  # the same case listed twice: keep keys unique
                    key = f"{key}~{seen[key] - 1}"
                jobs.append((len(jobs), case, s, key))
        out: list[Trajectory | None] = [None] * len(jobs)
        active: list[tuple[int, _Running]] = []
        #: Every started, unfinished episode (teardown in ``finally`` walks this, not ``active``).
        live: dict[int, _Running] = {}
        bar = tqdm(total=len(jobs), desc=f"rollout {task.name}", disable=not self.progress)

        def finish(index: int, run: _Running, reason: str | None = None) -> None:
            live.pop(index, None)
            traj, ep = run.traj, run.episode
            ep.close()
            self.backend.release(run.key)
            traj.messages = list(ep.messages)
            traj.done_reason = reason or ep.stats.done_reason
            traj.tool_calls, traj.tool_errors = ep.stats.tool_calls, ep.stats.tool_errors
            traj.counters = {k: int(v) for k, v in traj.counters.items() if v}
            if traj.messages:
                traj.strict = strict_score(traj.messages, traj.ground_truth)
                if reward_fn is not None:
                    result = reward_fn(traj.messages, traj.ground_truth)
                    traj.reward, traj.metrics = result[0], dict(result[1])
            out[index] = traj
            stats.episodes += 1
            stats.failed += int(traj.failed)
            stats.turns += traj.n_turns
            stats.counters.update(traj.counters)
            bar.update(1)

        try:
            while jobs or active:
                while jobs and len(active) < self.max_batch:
                    index, case, s, key = jobs.popleft()
                    run = self._start(task, case, s, key, seed, turns_cap, version)
                    live[index] = run
                    if run.traj.failed:
                        finish(index, run, "error")
                    else:
                        active.append((index, run))
                requests: list[GenerationRequest] = []
                batch: list[tuple[int, _Running]] = []
                for index, run in active:
                    room = self._room(run.traj)
                    if room is not None and room < 1:
                        run.traj.counters["context_overflow"] += 1
                        run.episode.abort("aborted")
                        finish(index, run, "length")
                        continue
                    budget = None if room is None else min(room, params.max_tokens)
                    requests.append(GenerationRequest(run.key, run.traj.input_ids, budget))
                    batch.append((index, run))
                if not batch:
                    active = []
                    continue
                results = self.backend.generate(requests, params)
                stats.generate_calls += 1
                if len(results) != len(batch):
                    raise RuntimeError(f"backend returned {len(results)} results for {len(batch)}")
                active = []
                for (index, run), result in zip(batch, results, strict=True):
                    stats.sampled_tokens += len(result.token_ids)
                    reason = self._advance(run, result)
                    if run.episode.done or run.traj.failed:
                        finish(index, run, reason)
                    else:
                        active.append((index, run))
        finally:
            # Teardown whatever happened: every environment still open is closed, every
            # backend state released (a no-op for the finished ones).
            for run in live.values():
                run.episode.abort("error")
                self.backend.release(run.key)
            bar.close()
            stats.seconds = time.perf_counter() - started
        logger.info(
            "rollout %s: %d episodes (%d failed), %d turns, %d tokens in %.1fs (%.0f tok/s), "
            "%d generate calls",
            task.name,
            stats.episodes,
            stats.failed,
            stats.turns,
            stats.sampled_tokens,
            stats.seconds,
            stats.tokens_per_s,
            stats.generate_calls,
        )
        return [t for t in out if t is not None]

    # -- one episode ---------------------------------------------------------------------------
    def _start(
        self,
        task: RolloutTask,
        case: Any,
        sample_index: int,
        key: str,
        seed: int,
        max_turns: int,
        version: int,
    ) -> _Running:
        """Open the environment and encode the prompt; a failure gives a ``failed`` trajectory."""
        traj = Trajectory(
            task=task.name,
            case_id=case.case_id,
            split=getattr(case, "split", ""),
            ground_truth=dict(getattr(case, "ground_truth", {}) or {}),
            group_id=f"{case.case_id}",
            sample_index=sample_index,
            seed=seed,
            policy_version=version,
        )
        traj.counters = Counter()
        env: Environment | None = None
        try:
            env = task.make_env()
            episode = Episode(env, case, seed=seed, max_turns=max_turns)
            messages = episode.reset()
            prompt = encode_prompt(self.tokenizer, messages, env.tool_schemas())
        except Exception:
            logger.warning("episode %s: environment failed to start", key, exc_info=True)
            if env is not None:
                env.close()
            traj.failed = True
            dummy = Episode(_ClosedEnv(), case, seed=seed, max_turns=max_turns)
            return _Running(key, dummy, traj)
        traj.prompt_len = len(prompt)
        self._append(traj, prompt, None)
        return _Running(key, episode, traj)

    def _advance(self, run: _Running, result: GenerationResult) -> str | None:
        """Append one sampled turn, step the environment, append its answer.

        Returns a ``done_reason`` override (``length``, ``error``) or ``None``.
        """
        traj, ep = run.traj, run.episode
        ids = list(result.token_ids)
        if len(result.logprobs) != len(ids):
            raise RuntimeError("backend returned logprobs and token ids of different lengths")
        start = len(traj.input_ids)
        self._append(traj, ids, list(result.logprobs))
        span = TurnSpan(start, len(traj.input_ids), result.finish_reason)
        traj.turns.append(span)
        stopped = result.finish_reason == "stop"
        if not stopped:
            traj.counters["truncated_turns"] += 1
        text_ids = ids[:-1] if stopped and ids and ids[-1] == self.eos_token_id else ids
        text = str(self.tokenizer.decode(text_ids, skip_special_tokens=False))
        try:
            step = ep.step(text)
        except Exception:
            logger.warning(
                "episode %s: environment failed at turn %d", run.key, len(traj.turns), exc_info=True
            )
            span.finish_reason = "error"
            traj.failed = True
            ep.abort("error")
            return "error"
        self._count(traj, span, text, step)
        if step.done:
            return None
        glue = [] if stopped else [self.eos_token_id]  # close a cut turn (not sampled: mask 0)
        more = glue + encode_continuation(self.tokenizer, step.messages)
        room = self._room(traj)
        if room is not None and len(more) >= room:
            # No room for the tool results and one more token: end here, inside the window.
            traj.counters["context_overflow"] += 1
            ep.abort("aborted")
            return "length"
        self._append(traj, more, None)
        return None

    def _count(self, traj: Trajectory, span: TurnSpan, text: str, step: StepResult) -> None:
        span.tool_calls = len(step.results)
        span.tool_errors = sum(r.error for r in step.results)
        c = traj.counters
        for r in step.results:
            if r.name == "?":
                c["malformed_tool_calls"] += 1
            elif r.error and r.content.startswith(f"{ERROR_PREFIX}unknown tool"):
                c["unknown_tools"] += 1
        if has_final_response(text):
            close = text.rfind(FINAL_CLOSE)
            if close < 0:
                c["unclosed_final"] += 1
            elif text[close + len(FINAL_CLOSE) :].strip():
                c["text_after_final"] += 1

    def _append(self, traj: Trajectory, ids: list[int], logprobs: list[float] | None) -> None:
        traj.input_ids.extend(ids)
        traj.loss_mask.extend([0 if logprobs is None else 1] * len(ids))
        traj.behaviour_logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))

    def _room(self, traj: Trajectory) -> int | None:
        limit = self.backend.max_context_len
        return None if limit is None else limit - len(traj.input_ids)


class _ClosedEnv(Environment):
    """Stand-in environment of an episode that failed to start (nothing to tear down)."""

    def initial_messages(self, case: Any) -> list[dict[str, Any]]:
        return []


def summarize(trajectories: Sequence[Trajectory]) -> Mapping[str, float]:
    """The ``rollout/*`` metrics of DESIGN §9 that the trajectories alone determine."""
    n = len(trajectories)
    if n == 0:
        return {}
    ok = [t for t in trajectories if not t.failed]
    turns = [s for t in ok for s in t.turns]
    resp = [s.n_tokens for s in turns]
    return {
        "rollout/turns/mean": sum(t.n_turns for t in ok) / max(len(ok), 1),
        "rollout/turns/max_turns_frac": sum(t.done_reason == "max_turns" for t in ok)
        / max(len(ok), 1),
        "rollout/tokens/response_mean": sum(resp) / max(len(resp), 1),
        "rollout/tokens/response_max": float(max(resp, default=0)),
        "rollout/truncated_frac": sum(t.truncated for t in ok) / max(len(ok), 1),
        "rollout/completion_rate": sum(t.completed for t in ok) / max(len(ok), 1),
        "rollout/failure_rate": (n - len(ok)) / n,
        "rollout/tool_calls/mean": sum(t.tool_calls for t in ok) / max(len(ok), 1),
        "rollout/tool_errors_frac": sum(t.tool_errors for t in ok)
        / max(sum(t.tool_calls for t in ok), 1),
    }


__all__ = ["RolloutEngine", "RolloutStats", "RolloutTask", "episode_key", "summarize"]
