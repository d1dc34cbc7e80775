"""Episodes of the rollout server: each one's exact token history, built only by appending ids.

An OpenAI-style agent resends the whole conversation on every call. Re-tokenising it would train
on ids the sampler never produced (BPE merges across turn boundaries, a client that reformats
JSON, …), so the server never does: it keeps, per episode, the conversation it has seen
(``wire``: each message normalised the way it was sent or returned) next to the token history
(prompt ids, sampled ids with their logprobs, glue). A new request must repeat ``wire`` as its
prefix; only the messages after it are encoded, with
:meth:`~mtrl_local.chat_codec.ChatCodec.encode_continuation`, exactly as the rollout engine
appends tool results.

What a client may do to the history, and what we do about it:

* append tool/user messages (the normal case): encoded and appended, mask 0;
* append an assistant message we did not sample (a canned reply): context only, mask 0, counted;
* answer with another of the ``n`` choices of the last turn: that choice's ids replace the first's;
* resend the history without our last reply (a retry): the last turn is rolled back and resampled;
* anything else — an edited, reordered or dropped earlier message, changed tools: the history was
  rewritten. The episode is marked failed (``counters["history_mismatch"]``) so the trainer skips
  it, and the agent is still served, from a fresh encoding that nothing is trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from typing import Any

from transformers import PreTrainedTokenizerBase

from mtrl_local.chat_codec import ChatCodec
from mtrl_local.chat_formats import HERMES
from mtrl_local.errors import UserError
from mtrl_local.scoring import Scorer
from mtrl_local.server.auth import EpisodeKeys
from mtrl_local.server.messages import (
    Choice,
    EpisodeError,
    Message,
    encodable,
    make_choice,
    message_text,
    normalise,
    tools_key,
)
from mtrl_local.server.records import (
    FAILED,
    FINISHED,
    RUNNING,
    EpisodeRecord,
    TurnPlan,
    check_finite_report,
    to_trajectory,
)
from mtrl_local.trajectory import Trajectory, TurnSpan

logger = logging.getLogger(__name__)


class EpisodeRegistry:
    """All episodes of a server, behind one lock (the event loop and the trainer both use it)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.codec = ChatCodec(tokenizer)
        if self.codec.format is not HERMES:
            # Replies are turned into OpenAI tool_calls by reading <tool_call> blocks.
            raise UserError(
                f"rollout server: the model's chat format is {self.codec.format.name}; the server "
                "reads tool calls in the hermes format only"
            )
        self.eos_token_id = eos_token_id
        self._episodes: dict[str, EpisodeRecord] = {}
        self._lock = threading.RLock()
        self._serial = 0
        self._group_sizes: Counter[str] = Counter()
        #: Each live episode's bearer key (an agent reaches its own episode only).
        self.keys = EpisodeKeys()
        #: Server-wide counters (history mismatches, timeouts, …), logged by the trainer.
        self.stats: Counter[str] = Counter()

    # -- lifecycle ---------------------------------------------------------------------------------
    def assign(self, record: EpisodeRecord) -> EpisodeRecord:
        """Register a trainer-made episode and issue ``record.key``, for the agent that runs it."""
        with self._lock:
            if record.episode_id in self._episodes:
                raise ValueError(f"episode {record.episode_id} exists")
            record.assigned = True
            record.key = self.keys.issue(record.episode_id)
            self._episodes[record.episode_id] = record
            return record

    def start(
        self,
        episode_id: str | None,
        *,
        task: str | None = None,
        case_id: str | None = None,
        group_id: str | None = None,
        seed: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> EpisodeRecord:
        """Claim an assigned episode, or open one of the agent's own (with a new key)."""
        with self._lock:
            if episode_id is not None:
                rec = self._episodes.get(episode_id)
                if rec is None:
                    raise EpisodeError(404, f"unknown episode '{episode_id}'", "episode_not_found")
                if rec.done:
                    raise EpisodeError(
                        409, f"episode '{episode_id}' is {rec.state}", "episode_closed"
                    )
                rec.state = RUNNING
                rec.touched = time.monotonic()
                return rec
            self._serial += 1
            nonce = hashlib.blake2b(str(time.time_ns()).encode(), digest_size=3).hexdigest()
            new_id = f"ep-{self._serial:06d}-{nonce}"
            rec = EpisodeRecord(
                new_id,
                task=task,
                case_id=case_id,
                group_id=group_id,
                seed=seed or 0,
                metadata=dict(metadata or {}),
                state=RUNNING,
                key=self.keys.issue(new_id),
            )
            if group_id is not None:
                rec.sample_index = self._group_sizes[group_id]
                self._group_sizes[group_id] += 1
            self._episodes[new_id] = rec
            return rec

    def get(self, episode_id: str) -> EpisodeRecord:
        with self._lock:
            rec = self._episodes.get(episode_id)
            if rec is None:
                raise EpisodeError(
                    404,
                    f"unknown episode '{episode_id}': start it with POST /v1/episodes",
                    "episode_not_found",
                )
            return rec

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._episodes)

    def forget(self, episode_id: str) -> None:
        """Drop an episode and revoke its key."""
        with self._lock:
            self._episodes.pop(episode_id, None)
            self.keys.revoke(episode_id)

    def fail(self, episode_id: str, reason: str) -> bool:
        """Fail an unfinished episode (agent crashed, timed out); ``False`` if already done."""
        with self._lock:
            rec = self._episodes.get(episode_id)
            if rec is None or rec.done:
                return False
            rec.state, rec.failure, rec.busy = FAILED, reason, False
            self.stats[f"failed/{reason.split(':')[0]}"] += 1
            logger.info("episode %s failed: %s", episode_id, reason)
            return True

    def expire(self, idle_s: float) -> list[str]:
        """Fail every running episode silent for more than ``idle_s`` seconds since its last
        request (an agent that hangs without reporting). An episode not yet claimed is not
        idle — its agent may still be starting; the launcher's wall-clock limit covers it."""
        now = time.monotonic()
        with self._lock:
            stale = [
                r.episode_id
                for r in self._episodes.values()
                if r.state == RUNNING and not r.busy and now - r.touched > idle_s
            ]
        return [i for i in stale if self.fail(i, f"timeout: no request or report for {idle_s:g}s")]

    # -- turns -------------------------------------------------------------------------------------
    def prepare(
        self, episode_id: str, messages: list[Message], tools: list[dict[str, Any]] | None
    ) -> TurnPlan:
        """Match ``messages`` against the recorded history and build the context to sample from."""
        with self._lock:
            rec = self.get(episode_id)
            if rec.done:
                raise EpisodeError(409, f"episode '{episode_id}' is {rec.state}", "episode_closed")
            if rec.busy:
                raise EpisodeError(
                    409, f"episode '{episode_id}' has a request in flight", "episode_busy"
                )
            if messages[-1]["role"] == "assistant":
                raise EpisodeError(
                    400, "the last message is an assistant reply; append a tool or user message"
                )
            rec.state = RUNNING
            rec.touched = time.monotonic()
            if rec.rewritten:
                return self._detached(rec, messages, tools)
            if not rec.input_ids:
                return self._first(rec, messages, tools)
            if tools_key(tools) != rec.tools:
                return self._mismatch(rec, messages, tools, "the tools changed")
            wire = [normalise(m) for m in messages]
            j = rec.last_index
            if 0 <= j < len(wire) and wire[:j] == rec.wire[:j] and wire[j] != rec.wire[j]:
                alt = next((a for a in rec.alternates if a.wire == wire[j]), None)
                if alt is not None:
                    self._swap(rec, alt)
            n = len(rec.wire)
            if wire[:n] == rec.wire and len(wire) > n:
                new = messages[n:]
                glue = [self.eos_token_id] if rec.last is not None and rec.last.needs_eos else []
                more = glue + self.codec.encode_continuation(encodable(new))
                rec._append(more, None)
                rec.wire.extend(wire[n:])
                rec.messages.extend(encodable(new))
                rec.counters["injected_assistant"] += sum(m["role"] == "assistant" for m in new)
                rec.last, rec.alternates = None, []
                rec.busy = True
                return TurnPlan(rec.episode_id, rec.episode_id, list(rec.input_ids))
            if len(wire) == j and j >= 0 and wire == rec.wire[:j] and rec.turns:
                # A retry without our last reply: roll that turn back and sample it again.
                turn = rec.turns.pop()
                rec._truncate(turn.start)
                del rec.wire[j:], rec.messages[j:]
                rec.versions.pop()
                rec.last, rec.alternates, rec.last_index = None, [], -1
                rec.counters["rollbacks"] += 1
                rec.busy = True
                return TurnPlan(rec.episode_id, rec.episode_id, list(rec.input_ids))
            first = next(
                (i for i, (a, b) in enumerate(zip(wire, rec.wire, strict=False)) if a != b),
                min(len(wire), n),
            )
            return self._mismatch(rec, messages, tools, f"message {first} differs from the record")

    def _first(
        self, rec: EpisodeRecord, messages: list[Message], tools: list[dict[str, Any]] | None
    ) -> TurnPlan:
        prompt = self.codec.encode_prompt(encodable(messages), tools)
        rec.prompt_len = len(prompt)
        rec._append(prompt, None)
        rec.tools = tools_key(tools)
        rec.wire = [normalise(m) for m in messages]
        rec.messages = encodable(messages)
        if rec.group_id is None:
            # Group the agent's own episodes by prompt: same prompt ids, same group.
            digest = hashlib.blake2b(json.dumps(prompt).encode(), digest_size=6).hexdigest()
            rec.group_id = f"prompt-{digest}"
            rec.sample_index = self._group_sizes[rec.group_id]
            self._group_sizes[rec.group_id] += 1
        rec.busy = True
        return TurnPlan(rec.episode_id, rec.episode_id, list(rec.input_ids))

    def _mismatch(
        self,
        rec: EpisodeRecord,
        messages: list[Message],
        tools: list[dict[str, Any]] | None,
        why: str,
    ) -> TurnPlan:
        logger.warning(
            "episode %s: the client rewrote its history (%s); it will not be trained on",
            rec.episode_id,
            why,
        )
        rec.rewritten = True
        rec.counters["history_mismatch"] += 1
        rec.failure = f"history_mismatch: {why}"
        self.stats["history_mismatch"] += 1
        return self._detached(rec, messages, tools)

    def _detached(
        self, rec: EpisodeRecord, messages: list[Message], tools: list[dict[str, Any]] | None
    ) -> TurnPlan:
        rec.messages = encodable(messages)
        rec.busy = True
        context = self.codec.encode_prompt(encodable(messages), tools)
        return TurnPlan(rec.episode_id, f"{rec.episode_id}!detached", context, detached=True)

    def _swap(self, rec: EpisodeRecord, alt: Choice) -> None:
        """The agent continued with another of the last turn's choices: record that one instead."""
        turn = rec.turns[-1]
        rec._truncate(turn.start)
        rec._append(alt.ids, alt.logprobs)
        rec.turns[-1] = TurnSpan(
            turn.start, len(rec.input_ids), alt.finish, tool_calls=alt.tool_calls
        )
        rec.wire[rec.last_index] = alt.wire
        rec.messages[rec.last_index] = alt.display()
        old = rec.last
        rec.last = alt
        rec.alternates = [a for a in rec.alternates if a is not alt] + ([old] if old else [])
        rec.counters["other_choice"] += 1

    def commit(self, plan: TurnPlan, choices: list[Choice], version: int) -> None:
        """Record choice 0 of a sampled turn (the others wait in case the agent picks one)."""
        with self._lock:
            rec = self._episodes.get(plan.episode_id)
            if rec is None:
                return
            rec.busy = False
            rec.touched = time.monotonic()
            if rec.done or plan.detached or not choices:
                if plan.detached and choices and not rec.done:
                    rec.messages.append(choices[0].display())
                return
            first = choices[0]
            start = len(rec.input_ids)
            rec._append(first.ids, first.logprobs)
            rec.turns.append(
                TurnSpan(start, len(rec.input_ids), first.finish, tool_calls=first.tool_calls)
            )
            rec.versions.append(version)
            rec.wire.append(first.wire)
            rec.messages.append(first.display())
            rec.last_index = len(rec.wire) - 1
            rec.last, rec.alternates = first, list(choices[1:])
            rec.counters["truncated_turns"] += int(first.finish == "length" and not first.stop_cut)
            rec.counters["malformed_tool_calls"] += first.malformed_calls
            rec.counters["stop_string_cuts"] += int(first.stop_cut)

    def abandon(self, plan: TurnPlan, why: str) -> None:
        """Generation failed (a server-side error): the episode's history has a context with no
        turn after it, so it cannot be trained on; fail it rather than guess."""
        with self._lock:
            rec = self._episodes.get(plan.episode_id)
            if rec is not None:
                rec.busy = False
                self.fail(plan.episode_id, f"generation error: {why}")

    # -- rewards -----------------------------------------------------------------------------------
    def report(
        self,
        episode_id: str,
        reward: float | list[float],
        metrics: dict[str, float],
        done_reason: str | None,
        close: bool,
    ) -> EpisodeRecord:
        """Record the agent's reward (finite, one value or one per model turn) and metrics."""
        check_finite_report(reward, metrics)
        with self._lock:
            rec = self.get(episode_id)
            if rec.done:
                raise EpisodeError(409, f"episode '{episode_id}' is {rec.state}", "episode_closed")
            if isinstance(reward, list) and len(reward) != len(rec.turns):
                raise EpisodeError(
                    400,
                    f"reward has {len(reward)} per-turn values but the episode has "
                    f"{len(rec.turns)} model turns",
                )
            rec.reward = list(reward) if isinstance(reward, list) else float(reward)
            rec.metrics = {str(k): float(v) for k, v in metrics.items()}
            rec.done_reason = done_reason or rec.done_reason
            rec.touched = time.monotonic()
            if close:
                self._close(rec)
            return rec

    def close(self, episode_id: str, reason: str | None = None) -> EpisodeRecord:
        with self._lock:
            rec = self.get(episode_id)
            if rec.done:
                return rec
            rec.done_reason = reason or rec.done_reason
            if rec.reward is None:
                self.fail(episode_id, "closed without a reward")
            else:
                self._close(rec)
            return rec

    def _close(self, rec: EpisodeRecord) -> None:
        if rec.rewritten:
            rec.state = FAILED
            self.stats["failed/history_mismatch"] += 1
        elif not rec.turns:
            rec.state, rec.failure = FAILED, "no model turn"
            self.stats["failed/no_turn"] += 1
        else:
            rec.state = FINISHED
        rec.busy = False

    # -- what the trainer takes --------------------------------------------------------------------
    def trajectory(
        self, episode_id: str, default_version: int = 0, scorer: Scorer | None = None
    ) -> Trajectory:
        """The episode as the trainer trains on it (failed ones are kept, flagged, for counting);
        ``scorer`` (the strict scorer, handed in by the batch source) fills ``strict``."""
        with self._lock:
            return to_trajectory(self.get(episode_id), default_version, scorer)


__all__ = [
    "Choice",
    "EpisodeError",
    "EpisodeRecord",
    "EpisodeRegistry",
    "TurnPlan",
    "encodable",
    "make_choice",
    "message_text",
    "normalise",
]
