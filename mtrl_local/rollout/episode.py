"""One episode in flight in the rollout engine: its environment and the trajectory it builds.

The trajectory is built only by appending ids: the encoded prompt, then per turn the sampled ids
exactly as the sampler returned them (``loss_mask`` 1, with their logprobs) and the ids of the
tool results and template glue (:meth:`~mtrl_local.chat_codec.ChatCodec.encode_continuation`,
mask 0). The sampled ids are decoded only to drive the environment, whose tool calls are read in
the codec's chat format; the decoded text is never encoded again.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from mtrl_local.chat_codec import ChatCodec
from mtrl_local.env import Environment, Episode, StepResult, ToolLimits, has_final_response
from mtrl_local.env.actions import FINAL_CLOSE
from mtrl_local.env.base import ERROR_PREFIX
from mtrl_local.rollout.sampler import GenerationResult
from mtrl_local.task import Task
from mtrl_local.trajectory import Trajectory, TurnSpan

logger = logging.getLogger(__name__)


@dataclass
class EpisodeRun:
    """An episode in flight: its sampler key, its environment driver and its trajectory."""

    key: str
    episode: Episode
    traj: Trajectory

    @classmethod
    def start(
        cls,
        task: Task,
        case: Any,
        codec: ChatCodec,
        *,
        sample_index: int,
        key: str,
        seed: int,
        max_turns: int,
        version: int,
        tool_limits: ToolLimits | None = None,
    ) -> EpisodeRun:
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
            if tool_limits is not None:
                env.set_limits(
                    tool_timeout_s=tool_limits.timeout_s,
                    max_tool_output_chars=tool_limits.max_output_chars,
                )
            episode = Episode(
                env, case, seed=seed, max_turns=max_turns, parse_calls=codec.parse_calls
            )
            messages = episode.reset()
            prompt = codec.encode_prompt(messages, env.tool_schemas())
        except Exception:
            logger.warning("episode %s: environment failed to start", key, exc_info=True)
            if env is not None:
                env.close()
            traj.failed = True
            return cls(key, Episode(_ClosedEnv(), case, seed=seed, max_turns=max_turns), traj)
        traj.prompt_len = len(prompt)
        _append(traj, prompt, None)
        return cls(key, episode, traj)

    def room(self, context_limit: int | None) -> int | None:
        """Tokens left before the model's context window (``None``: unbounded)."""
        return None if context_limit is None else context_limit - len(self.traj.input_ids)

    def advance(
        self,
        result: GenerationResult,
        codec: ChatCodec,
        context_limit: int | None,
    ) -> str | None:
        """Append one sampled turn, step the environment, append its answer.

        Returns a ``done_reason`` override (``length``, ``error``) or ``None``.
        """
        traj, ep = self.traj, self.episode
        ids = list(result.token_ids)
        if len(result.logprobs) != len(ids):
            raise RuntimeError("sampler returned logprobs and token ids of different lengths")
        start = len(traj.input_ids)
        _append(traj, ids, list(result.logprobs))
        span = TurnSpan(start, len(traj.input_ids), result.finish_reason)
        traj.turns.append(span)
        stopped = result.finish_reason == "stop"
        if not stopped:
            traj.counters["truncated_turns"] += 1
        eos = codec.eos_id
        text_ids = ids[:-1] if stopped and ids and ids[-1] == eos else ids
        text = str(codec.tokenizer.decode(text_ids, skip_special_tokens=False))
        try:
            step = ep.step(text)
        except Exception:
            logger.warning(
                "episode %s: environment failed at turn %d",
                self.key,
                len(traj.turns),
                exc_info=True,
            )
            span.finish_reason = "error"
            traj.failed = True
            ep.abort("error")
            return "error"
        _count(traj, span, text, step)
        if step.done:
            return None
        glue = [] if stopped else [int(eos)]  # close a cut turn (not sampled: mask 0)
        more = glue + codec.encode_continuation(step.messages)
        room = self.room(context_limit)
        if room is not None and len(more) >= room:
            # No room for the tool results and one more token: end here, inside the window.
            traj.counters["context_overflow"] += 1
            ep.abort("aborted")
            return "length"
        _append(traj, more, None)
        return None


def _count(traj: Trajectory, span: TurnSpan, text: str, step: StepResult) -> None:
    """The turn's tool use on its span, and what the agent got wrong in the episode's counters."""
    span.tool_calls = len(step.results)
    span.tool_errors = sum(r.error for r in step.results)
    c = traj.counters
    c["tool_timeouts"] += sum(r.timed_out for r in step.results)
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


def _append(traj: Trajectory, ids: list[int], logprobs: list[float] | None) -> None:
    """Sampled ids (with logprobs, loss mask 1) or context ids (mask 0) at the trajectory's end."""
    traj.input_ids.extend(ids)
    traj.loss_mask.extend([0 if logprobs is None else 1] * len(ids))
    traj.behaviour_logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))


class _ClosedEnv(Environment):
    """Stand-in environment of an episode that failed to start (nothing to tear down)."""

    def initial_messages(self, case: Any) -> list[dict[str, Any]]:
        return []
