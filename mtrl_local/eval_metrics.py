"""What an evaluation measures: unbiased pass@k and the summary of a set of trajectories.

Pure functions over :class:`~mtrl_local.trajectory.Trajectory` objects (no model, no I/O), shared
by the evaluation harness (:mod:`mtrl_local.evaluate`), the trainer's periodic validation and the
dashboard. Success for pass@k is ``strict ≥ success_threshold`` per sample, the strict score the
engine recorded on the trajectory (``None``, an episode that never ran, scores 0); the same
estimator on the reward is ``reward_pass_at_k``.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtrl_local import metrics as M
from mtrl_local.env.actions import has_final_response, parse_answer, parse_tool_calls
from mtrl_local.scoring import field_matches, normalize, scalar
from mtrl_local.task import Task
from mtrl_local.trajectory import Trajectory


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` successes: ``1 − C(n−c, k) / C(n, k)``.

    The probability that at least one of ``k`` samples drawn without replacement from the ``n``
    succeeds (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"). Computed as
    ``1 − Π_{i=n−c+1}^{n} (1 − k/i)``, which never forms the binomials (they overflow floats for
    large n).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    >>> round(pass_at_k(8, 2, 2), 6) == round(1 - 15 / 28, 6)
    True
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a success
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# -- metrics ---------------------------------------------------------------------------------------
def _assistant_turns(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(m.get("role") == "assistant" for m in messages)


def first_turn_tool_call_ok(messages: Sequence[Mapping[str, Any]], tool_names: set[str]) -> bool:
    """The first assistant turn is a well-formed call: it parses, names existing tools, no errors.

    Read from the messages (the tool results that follow it must not be ``error: …``), so it
    means the same for engine trajectories and hand-written ones, in any chat format: the calls
    are the turn's ``tool_calls`` as the episode read them (a malformed one left an error result),
    or, for a message without that key, its ``<tool_call>`` blocks. A first turn that answers
    directly is not a tool call.
    """
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        text = str(message.get("content") or "")
        if has_final_response(text):
            return False
        names = _call_names(message, text)
        if not names or any(name not in tool_names for name in names):
            return False
        for reply in messages[i + 1 :]:
            if reply.get("role") != "tool":
                break
            if str(reply.get("content", "")).startswith("error: "):
                return False
        return True
    return False


def _call_names(message: Mapping[str, Any], text: str) -> list[str | None]:
    """The tool names an assistant turn called (``None`` for a malformed call)."""
    if "tool_calls" not in message:
        return [c.name if c.error is None else None for c in parse_tool_calls(text)]
    names: list[str | None] = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, Mapping) else None
        holder = function if isinstance(function, Mapping) else call
        name = holder.get("name") if isinstance(holder, Mapping) else None
        names.append(name if isinstance(name, str) else None)
    return names


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(
    trajectories: Sequence[Trajectory],
    task: Task,
    success_threshold: float = 1.0,
    n_samples: int = 1,
) -> dict[str, Any]:
    """The evaluation metrics of ``trajectories`` (a pure function: nothing is run or mutated).

    ``task`` supplies the tool names (for the first-turn check) and the output fields (the order of
    ``field_acc_by_field``). Trajectories are grouped into cases by ``case_id``; pass@k is the mean
    over cases of :func:`pass_at_k` for k in ``{1, n_samples}`` (k capped at a case's sample count).

    Keys: ``n_cases``, ``n_samples``, ``n_trajectories``, ``tsr``, ``pass_at_1``,
    ``pass_at_<n>``, ``reward_pass_at_1``, ``reward_pass_at_<n>``, ``reward_mean``, ``reward_std``,
    ``completion_rate``, ``field_acc``, ``field_acc_by_field``, ``turns_mean``,
    ``max_turns_frac``, ``tool_calls_mean``, ``tool_errors_frac``, ``truncated_frac``,
    ``failure_rate``, ``first_turn_tool_call_frac``, ``reward_strict_disagree_frac``,
    ``reward_over_strict_frac``, ``done_reasons``, ``counters`` (the engine's per-trajectory
    counters summed: malformed tool calls, unknown tools…), ``per_case``, ``outcome_field``,
    ``tsr_by_outcome``
    (with the task's ``outcome_field``: ``{value: {"trajectories": n, "tsr": …}}`` per
    ground-truth value, most common first; otherwise ``{}``).

    Scores (TSR, pass@k, completion, field accuracy, reward) are over all trajectories, an
    environment failure scoring 0; behaviour statistics (turns, tool calls, truncation) are over
    the trajectories whose environment did not fail, like the engine's ``rollout/*`` metrics.
    """
    if not trajectories:
        raise ValueError("summarize: no trajectories")
    samples = _read_samples(trajectories, {t.name for t in task.make_env().tools})
    summary: dict[str, Any] = {
        "n_cases": len(samples.cases),
        "n_samples": n_samples,
        "n_trajectories": len(trajectories),
    }
    summary.update(_scores(samples, success_threshold, n_samples, list(task.output_fields)))
    summary.update(_behaviour(trajectories))
    summary["outcome_field"] = task.outcome_field
    summary["tsr_by_outcome"] = _tsr_by_outcome(trajectories, samples.strict, task)
    summary["per_case"] = _per_case(samples, success_threshold)
    return summary


@dataclass
class _Samples:
    """What the summary reads off each trajectory, in trajectory order."""

    strict: list[float] = field(default_factory=list)
    rewards: list[float | None] = field(default_factory=list)
    completed: list[float] = field(default_factory=list)
    field_acc: list[float] = field(default_factory=list)
    by_field: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    first_ok: list[float] = field(default_factory=list)
    #: case_id -> indices into the lists above
    cases: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def case_pass(self, success: list[bool], k: int) -> float:
        """Mean over cases of the unbiased pass@k (k capped at a case's sample count)."""
        return _mean(
            [
                pass_at_k(len(ix), sum(success[j] for j in ix), min(k, len(ix)))
                for ix in self.cases.values()
            ]
        )


def _read_samples(trajectories: Sequence[Trajectory], tool_names: set[str]) -> _Samples:
    out = _Samples()
    for i, traj in enumerate(trajectories):
        answer = parse_answer(traj.messages)
        matches = field_matches(answer, traj.ground_truth)
        out.strict.append(traj.strict or 0.0)
        out.rewards.append(None if traj.reward is None else scalar(traj.reward))
        out.completed.append(float(answer is not None))
        out.field_acc.append(_mean([float(v) for v in matches.values()]))
        for key, ok in matches.items():
            out.by_field[key].append(float(ok))
        out.first_ok.append(float(first_turn_tool_call_ok(traj.messages, tool_names)))
        out.cases[traj.case_id or traj.group_id].append(i)
    return out


def _scores(
    samples: _Samples, success_threshold: float, n_samples: int, fields: list[str]
) -> dict[str, Any]:
    """Scores over every trajectory (an environment failure scores 0): TSR, pass@k on the
    strict score and on the reward, completion, field accuracy, reward/strict agreement."""
    ks = sorted({1, n_samples})
    ok_strict = [s >= success_threshold for s in samples.strict]
    ok_reward = [r is not None and r >= success_threshold for r in samples.rewards]
    scored = [r for r in samples.rewards if r is not None]
    scored_ix = [i for i, r in enumerate(samples.rewards) if r is not None]

    def over_scored(pred: Callable[[int], bool]) -> float | None:
        return _mean([float(pred(i)) for i in scored_ix]) if scored_ix else None

    out: dict[str, Any] = {"tsr": _mean(samples.strict)}
    for k in ks:
        out[f"pass_at_{k}"] = samples.case_pass(ok_strict, k)
    for k in ks:
        out[f"reward_pass_at_{k}"] = samples.case_pass(ok_reward, k) if scored else None
    by_field = samples.by_field
    out |= {
        "reward_mean": statistics.fmean(scored) if scored else None,
        "reward_std": statistics.pstdev(scored) if scored else None,
        "completion_rate": _mean(samples.completed),
        "field_acc": _mean(samples.field_acc),
        "field_acc_by_field": {
            key: _mean(by_field[key]) for key in [*fields, *sorted(set(by_field) - set(fields))]
        },
        "first_turn_tool_call_frac": _mean(samples.first_ok),
        # Over the trajectories that have a reward: does the reward agree with the eval?
        "reward_strict_disagree_frac": over_scored(lambda i: ok_reward[i] != ok_strict[i]),
        "reward_over_strict_frac": over_scored(lambda i: ok_reward[i] and samples.strict[i] == 0.0),
    }
    return out


def _behaviour(trajectories: Sequence[Trajectory]) -> dict[str, Any]:
    """Behaviour over the episodes that ran (as the training ``rollout/*`` metrics are): turns,
    tool use, truncation; plus the failure share, the done reasons and the engine's counters."""
    ran = [t for t in trajectories if not t.failed]
    calls = sum(t.tool_calls for t in ran)
    errors = sum(t.tool_errors for t in ran)
    counters: Counter[str] = Counter()
    for t in trajectories:
        counters.update(t.counters or {})
    return {
        "turns_mean": _mean([t.n_turns or _assistant_turns(t.messages) for t in ran]),
        "max_turns_frac": _mean([float(t.done_reason == "max_turns") for t in ran]),
        "tool_calls_mean": calls / len(ran) if ran else 0.0,
        "tool_errors_frac": errors / calls if calls else 0.0,
        "truncated_frac": _mean([float(t.truncated) for t in ran]),
        "failure_rate": _mean([float(t.failed) for t in trajectories]),
        "done_reasons": dict(Counter(str(t.done_reason) for t in trajectories).most_common()),
        "counters": dict(sorted(counters.items())),
    }


def _per_case(samples: _Samples, success_threshold: float) -> dict[str, dict[str, int]]:
    ok_strict = [s >= success_threshold for s in samples.strict]
    ok_reward = [r is not None and r >= success_threshold for r in samples.rewards]
    return {
        cid: {
            "samples": len(ix),
            "strict_successes": sum(ok_strict[j] for j in ix),
            "reward_successes": sum(ok_reward[j] for j in ix),
        }
        for cid, ix in samples.cases.items()
    }


def _tsr_by_outcome(
    trajectories: Sequence[Trajectory], strict: Sequence[float], task: Task
) -> dict[str, dict[str, float]]:
    """Strict TSR per ground-truth value of ``task.outcome_field`` (most common value first).

    Why: when one outcome is common (42 % of aircraft_inspection's test cases are "ready"), a
    policy can raise TSR by giving that outcome more often without reading the case; this split
    shows it.
    """
    field_name = task.outcome_field
    if not field_name:
        return {}
    groups: dict[str, list[float]] = defaultdict(list)
    for traj, score in zip(trajectories, strict, strict=True):
        if field_name in traj.ground_truth:
            groups[normalize(traj.ground_truth[field_name])].append(score)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {value: {"trajectories": len(v), "tsr": _mean(v)} for value, v in ordered}


def val_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """A summary under the held-out metric names (``val/tsr``, ``val/reward/pass_k_1``, …).

    ``val/reward/pass_k_<k>`` is the reward-based pass@k (the name says reward); the strict one is
    ``val/strict/pass_k_<k>``.
    """
    out = {
        M.VAL_TSR: summary["tsr"],
        M.VAL_COMPLETION_RATE: summary["completion_rate"],
        M.VAL_FIELD_ACC: summary["field_acc"],
    }
    if summary.get("reward_mean") is not None:
        out[M.VAL_REWARD_MEAN] = summary["reward_mean"]
    for key, value in summary.items():
        if value is None:
            continue
        if key.startswith("reward_pass_at_"):
            out[M.val_reward_pass_k(int(key.rsplit("_", 1)[1]))] = value
        elif key.startswith("pass_at_"):
            out[M.val_strict_pass_k(int(key.rsplit("_", 1)[1]))] = value
    return {k: float(v) for k, v in out.items()}
