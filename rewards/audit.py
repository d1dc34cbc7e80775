"""Reward audit: is a training reward ever more lenient than the evaluation? (docs/design.md, "The
loop" and "Rewards and the strict scorer")

Plain functions, no pytest: the built-in audit set (``pytest --pyargs rewards.audits``) is a thin
layer over them, and a script or notebook can call them directly. Every check returns a
:class:`CheckResult` (or :class:`RolloutsReport`) whose ``problems`` say what went wrong, per case.

Two families of checks:

- **Reference-based.** From each reference episode (the scripted expert's, strict score 1.0) we
  build *lenient variants* by rewriting its final assistant turn, each paired with a *strict twin*:
  the episode that gets the same credit under a strict reading but carries no bait. The rule is
  ``reward(variant) ≤ reward(twin) + 1e-9``: a reward may be stricter than the evaluation, never
  more lenient. Around that: references get the maximum, no answer and malformed JSON get the
  minimum, rewards are deterministic, bounded, and monotone in the number of correct fields.
- **Rollouts-based.** Over recorded episodes (real model outputs, or the noisy expert's), the share
  that the reward credits as a success (``reward ≥ success_threshold``) while the strict scorer
  gives 0 must stay under a bound. The offending episodes are returned so they can be read.

Per-turn rewards (a list) are reduced to the trajectory's return with
:func:`mtrl_local.scoring.scalar`.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtrl_local.scoring import Message, RewardFn, RewardResult, Scorer, scalar, strict_score
from rewards.variants import (
    VARIANT_KINDS,
    Reference,
    lenient_variants,
    plainly_wrong,
    scored_episodes,
    with_answer,
)

#: Slack for float comparisons (sums of per-field credits are not exact).
TOL = 1e-9


# -- scoring ---------------------------------------------------------------------------------------
def reward_value(result: Any) -> float:
    """The scalar return of whatever a reward function gave back.

    A :class:`RewardResult` (or ``(reward, metrics)`` tuple), a float, or a per-turn list — the
    list summed with :func:`mtrl_local.scoring.scalar`.
    """
    if isinstance(result, RewardResult) or (isinstance(result, tuple) and len(result) == 2):
        result = result[0]
    if isinstance(result, (list, int, float)) and not isinstance(result, bool):
        return scalar(result if isinstance(result, list) else float(result))
    raise TypeError(f"a reward function returned {type(result).__name__}, expected RewardResult")


def score(reward_fn: RewardFn, messages: Sequence[Message], truth: Mapping[str, Any]) -> float:
    """``reward_fn`` on one episode, as a scalar."""
    return reward_value(reward_fn(messages, truth))


# -- reference-based checks ------------------------------------------------------------------------
@dataclass
class CheckResult:
    """What one check looked at and what it found wrong (empty ``problems`` = passed)."""

    name: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self, limit: int = 20) -> str:
        """Human-readable summary, the first ``limit`` problems listed."""
        head = f"{self.name}: {len(self.problems)} problem(s) in {self.checked} checked"
        lines = [head, *(f"  {p}" for p in self.problems[:limit])]
        if len(self.problems) > limit:
            lines.append(f"  … and {len(self.problems) - limit} more")
        return "\n".join(lines)


def _refs(episodes: Iterable[Any]) -> list[Reference]:
    return [Reference.of(e) for e in episodes]


def check_variants(reward_fn: RewardFn, episodes: Iterable[Any], kind: str) -> CheckResult:
    """``reward(variant) ≤ reward(twin) + TOL`` for every variant of ``kind`` of every reference."""
    if kind not in VARIANT_KINDS:
        known = ", ".join(VARIANT_KINDS)
        raise ValueError(f"unknown variant kind '{kind}' (expected one of {known})")
    res = CheckResult(f"lenient variant '{kind}'")
    for ref in _refs(episodes):
        for p in lenient_variants(ref, (kind,)):
            res.checked += 1
            rv = score(reward_fn, p.variant, p.ground_truth)
            rt = score(reward_fn, p.twin, p.ground_truth)
            if rv > rt + TOL:
                res.problems.append(
                    f"case {p.case_id} {p.kind} {p.detail}: reward {rv:.4f} > strict twin {rt:.4f}"
                )
    return res


def check_reference_maximum(
    reward_fn: RewardFn, episodes: Iterable[Any], strict_scorer: Scorer = strict_score
) -> CheckResult:
    """References: strict 1.0, all the same reward, and ≥ every episode built from them."""
    res = CheckResult("reference episodes get the maximum")
    refs = _refs(episodes)
    ref_rewards = {r.case_id: score(reward_fn, r.messages, r.ground_truth) for r in refs}
    top = max(ref_rewards.values(), default=0.0)
    for ref in refs:
        res.checked += 1
        s = strict_scorer(ref.messages, ref.ground_truth)
        if s != 1.0:
            res.problems.append(f"case {ref.case_id}: reference scores {s} under the strict scorer")
        r = ref_rewards[ref.case_id]
        if abs(r - top) > TOL:
            res.problems.append(f"case {ref.case_id}: reference reward {r:.4f} != max {top:.4f}")
        for label, msgs in scored_episodes(ref)[1:]:
            res.checked += 1
            other = score(reward_fn, msgs, ref.ground_truth)
            if other > r + TOL:
                res.problems.append(
                    f"case {ref.case_id}: {label} rewarded {other:.4f} > reference {r:.4f}"
                )
    return res


def check_no_answer_minimum(reward_fn: RewardFn, episodes: Iterable[Any]) -> CheckResult:
    """No answer and malformed JSON score ≤ every other episode scored (across all cases)."""
    res = CheckResult("no answer / malformed JSON get the minimum")
    bottom: list[tuple[str, float]] = []
    others: list[tuple[str, float]] = []
    for ref in _refs(episodes):
        for label, msgs in scored_episodes(ref):
            r = score(reward_fn, msgs, ref.ground_truth)
            is_bottom = label in ("no answer", "malformed JSON")
            (bottom if is_bottom else others).append((f"case {ref.case_id} {label}", r))
    if not others:
        return res
    low_label, low = min(others, key=lambda t: t[1])
    for label, r in bottom:
        res.checked += 1
        if r > low + TOL:
            res.problems.append(f"{label}: reward {r:.4f} > {low:.4f} ({low_label})")
    return res


def check_determinism(reward_fn: RewardFn, episodes: Iterable[Any]) -> CheckResult:
    """Same reward twice and on a deep copy; the episode is not modified by scoring."""
    res = CheckResult("determinism")
    for ref in _refs(episodes):
        for label, msgs in scored_episodes(ref):
            res.checked += 1
            before = copy.deepcopy(msgs)
            first = reward_fn(msgs, ref.ground_truth)
            second = reward_fn(msgs, ref.ground_truth)
            third = reward_fn(copy.deepcopy(msgs), copy.deepcopy(ref.ground_truth))
            vals = [_raw(first), _raw(second), _raw(third)]
            if not (vals[0] == vals[1] == vals[2]):
                res.problems.append(f"case {ref.case_id} {label}: rewards differ {vals}")
            if msgs != before:
                res.problems.append(f"case {ref.case_id} {label}: scoring modified the messages")
    return res


def _raw(result: Any) -> Any:
    """The reward part of a result as given (a float or per-turn list), for exact comparison."""
    if isinstance(result, tuple) and len(result) == 2:
        return result[0]
    return result


def check_bounded(reward_fn: RewardFn, episodes: Iterable[Any]) -> CheckResult:
    """Every reward finite and within [no-answer minimum, reference maximum]."""
    res = CheckResult("bounded")
    scored: list[tuple[str, float]] = []
    lo, hi = math.inf, -math.inf
    for ref in _refs(episodes):
        for label, msgs in scored_episodes(ref):
            r = score(reward_fn, msgs, ref.ground_truth)
            scored.append((f"case {ref.case_id} {label}", r))
            if label == "reference":
                hi = max(hi, r)
            elif label in ("no answer", "malformed JSON"):
                lo = min(lo, r)
    for label, r in scored:
        res.checked += 1
        if not math.isfinite(r):
            res.problems.append(f"{label}: reward is {r}")
        elif not lo - TOL <= r <= hi + TOL:
            res.problems.append(f"{label}: reward {r:.4f} outside [{lo:.4f}, {hi:.4f}]")
    return res


def check_monotone(
    reward_fn: RewardFn, episodes: Iterable[Any], orders: int = 3, seed: int = 0
) -> CheckResult:
    """From every field wrong, correcting fields one at a time never lowers the reward.

    ``orders`` seeded random orders of correction per reference.
    """
    res = CheckResult("monotone in correct fields")
    for ref in _refs(episodes):
        answer = ref.answer
        keys = [k for k in ref.ground_truth if k in answer]
        wrong = plainly_wrong(ref.ground_truth)
        rng = random.Random(f"{seed}:{ref.case_id}")
        for o in range(orders):
            order = keys[:]
            rng.shuffle(order)
            current = {**answer, **{k: wrong for k in keys}}
            prev = score(reward_fn, with_answer(ref.messages, current), ref.ground_truth)
            for n, key in enumerate(order, 1):
                res.checked += 1
                current[key] = answer[key]
                r = score(reward_fn, with_answer(ref.messages, current), ref.ground_truth)
                if r < prev - TOL:
                    res.problems.append(
                        f"case {ref.case_id} order {o}: correcting '{key}' ({n}/{len(order)}) "
                        f"lowered the reward {prev:.4f} -> {r:.4f}"
                    )
                prev = r
    return res


# -- rollouts-based check --------------------------------------------------------------------------
@dataclass(frozen=True)
class Offender:
    """A recorded episode the reward credits as a success while the strict scorer gives 0."""

    task: str
    case_id: str
    line: int
    reward: float
    strict: float

    def __str__(self) -> str:
        return (
            f"{self.task} case {self.case_id} (line {self.line}): "
            f"reward {self.reward:.4f}, strict {self.strict:g}"
        )


@dataclass
class RolloutsReport:
    """Reward-vs-strict disagreement over a set of recorded episodes."""

    total: int
    offenders: list[Offender]
    bound: float
    threshold: float

    @property
    def share(self) -> float:
        return len(self.offenders) / self.total if self.total else 0.0

    @property
    def ok(self) -> bool:
        return self.share <= self.bound + TOL

    def report(self, limit: int = 25) -> str:
        head = (
            f"{len(self.offenders)}/{self.total} episodes ({self.share:.1%}) get reward >= "
            f"{self.threshold:g} where the strict scorer gives 0 (bound {self.bound:.1%})"
        )
        lines = [head, *(f"  {o}" for o in self.offenders[:limit])]
        if len(self.offenders) > limit:
            lines.append(f"  … and {len(self.offenders) - limit} more")
        return "\n".join(lines)


def check_rollouts(
    reward_fn: RewardFn,
    rows: Iterable[Mapping[str, Any]],
    bound: float = 0.02,
    threshold: float = 1.0,
    strict_scorer: Scorer = strict_score,
) -> RolloutsReport:
    """Score recorded episodes with the reward and the strict scorer (recomputed, not read).

    ``rows`` are rollout records (:mod:`mtrl_local.rollout_files`: ``messages``,
    ``ground_truth``; optional ``task``, ``case_id``, ``_line``). An offender: strict 0 and
    ``reward ≥ threshold``.
    """
    offenders: list[Offender] = []
    total = 0
    for i, row in enumerate(rows, 1):
        total += 1
        truth = row["ground_truth"]
        strict = strict_scorer(row["messages"], truth)
        reward = score(reward_fn, row["messages"], truth)
        if strict == 0.0 and reward >= threshold - TOL:
            offenders.append(
                Offender(
                    str(row.get("task", "?")),
                    str(row.get("case_id", "?")),
                    int(row.get("_line", i)),
                    reward,
                    strict,
                )
            )
    return RolloutsReport(total, offenders, bound, threshold)
