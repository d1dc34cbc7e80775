"""A demo run store written by the real writer from the suite's scripted policies.

For the dashboard's tests and for screenshots before a real run exists. Nothing is trained: the
noisy expert of ``aircraft_inspection`` plays the policy, its noise falling with the step so the
curves move like a run that learns. Everything else is the real code path — episodes from
``Task.run_expert``, rewards from ``rewards.dense``, ``rollout/*`` metrics from
:func:`mtrl_local.metrics.rollout_metrics`, val metrics from :func:`mtrl_local.evaluate.summarize`,
findings from :func:`mtrl_local.diagnostics.diagnose`, all through
:class:`~mtrl_local.store.RunStore`.

Seeded on purpose, so each view has something to show: a few truncated turns late in the run
(``truncation_high`` fires), one environment failure, and one trajectory whose reward is 1.0
under ``rewards.examples:lenient_reward`` while the strict scorer gives 0 (right fields under a
wrong tag): the "reward ≠ strict" filter must find it.

``python -m tui.demo runs/demo`` writes one.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mtrl_local import metrics as M
from mtrl_local.advantages import batch_advantages
from mtrl_local.diagnostics import diagnose
from mtrl_local.eval_metrics import summarize, val_metrics
from mtrl_local.scoring import strict_score
from mtrl_local.store import RunStore
from mtrl_local.trajectory import FinishReason, Trajectory, TurnSpan
from rewards.dense import dense_reward_per_turn
from rewards.examples import lenient_reward
from sopbench.aircraft_inspection import AircraftInspection
from sopbench.base import Case, Task

TASK = "aircraft_inspection"
PROMPT_TOKENS = 600
#: Chat-template glue and tool output between two model turns (tokens, made up but plausible).
GLUE_TOKENS = 40


def _turns(messages: list[dict[str, Any]], done_reason: str | None) -> list[TurnSpan]:
    """One span per assistant message, sized like its text (~4 characters a token)."""
    spans, pos = [], PROMPT_TOKENS
    assistant = [m for m in messages if m.get("role") == "assistant"]
    for i, m in enumerate(assistant):
        n = max(1, len(str(m.get("content") or "")) // 4)
        last = i == len(assistant) - 1
        reason: FinishReason = "max_turns" if last and done_reason == "max_turns" else "stop"
        spans.append(TurnSpan(pos, pos + n, reason, tool_calls=len(m.get("tool_calls") or [])))
        pos += n + GLUE_TOKENS
    return spans


def episode(
    task: Task,
    case: Case,
    *,
    noise_rate: float,
    seed: int,
    group_id: str,
    sample_index: int,
    policy_version: int,
    truncate: bool = False,
    fail: bool = False,
) -> Trajectory:
    """One scripted episode as a scored :class:`Trajectory`.

    ``truncate``: the last turn is cut in half, as if it hit ``sampling_max_tokens`` (finish
    reason ``length``). ``fail``: the environment failed after the second turn (unscored).
    """
    ep = task.run_expert(case, seed=seed, noise_rate=noise_rate, noise_seed=seed)
    messages, done = [dict(m) for m in ep.messages], ep.done_reason
    if fail:
        cut = [i for i, m in enumerate(messages) if m["role"] == "assistant"][1]
        messages, done = messages[: cut + 1], "error"
    turns = _turns(messages, done)
    if truncate:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        content = str(messages[last]["content"])
        messages[last] = {"role": "assistant", "content": content[: len(content) // 2]}
        messages = messages[: last + 1]
        turns = _turns(messages, None)
        turns[-1].finish_reason = "length"
        done = "length"
    traj = Trajectory(
        task=task.name,
        case_id=case.case_id,
        split=case.split,
        ground_truth=dict(case.ground_truth),
        prompt_len=PROMPT_TOKENS,
        turns=turns,
        messages=messages,
        done_reason=done,
        tool_calls=sum(t.tool_calls for t in turns),
        tool_errors=ep.tool_errors,
        failed=fail,
        group_id=group_id,
        sample_index=sample_index,
        seed=seed,
        policy_version=policy_version,
    )
    if not fail:
        result = dense_reward_per_turn(messages, case.ground_truth)
        traj.reward, traj.metrics = result.reward, dict(result.metrics)
        traj.strict = strict_score(messages, case.ground_truth)
    return traj


def disagreeing_trajectory(
    task: Task, case: Case, *, group_id: str, policy_version: int
) -> Trajectory:
    """The reference episode with its answer under ``<answer>`` instead of ``<final_response>``,
    scored by the lenient reward: every field right, reward ≥ 1.0, strict 0."""
    ep = task.run_expert(case)
    messages = [dict(m) for m in ep.messages]
    last = messages[-1]
    last["content"] = str(last["content"]).replace("final_response>", "answer>")
    result = lenient_reward(messages, case.ground_truth)
    return Trajectory(
        task=task.name,
        case_id=case.case_id,
        split=case.split,
        ground_truth=dict(case.ground_truth),
        prompt_len=PROMPT_TOKENS,
        turns=_turns(messages, "no_action"),
        messages=messages,
        done_reason="no_action",
        tool_calls=ep.tool_calls,
        reward=result.reward,
        metrics=dict(result.metrics),
        strict=strict_score(messages, case.ground_truth),
        group_id=group_id,
        sample_index=0,
        policy_version=policy_version,
        counters={"wrong_answer_tag": 1},
    )


def noise_at(step: int, steps: int) -> float:
    """The noisy expert's error rate at ``step``: 0.6 at the start, 0.05 at the end."""
    return 0.05 + 0.55 * (1 - step / max(1, steps - 1))


def write_step(
    store: RunStore,
    task: Task,
    step: int,
    steps: int,
    *,
    groups: int = 2,
    group_size: int = 4,
    seed_disagreement: bool = False,
) -> list[Trajectory]:
    """One training step: ``groups × group_size`` episodes, their metrics, perf numbers."""
    cases = task.cases("train")
    noise = noise_at(step, steps)
    trajs = []
    for g in range(groups):
        case = cases[(step * groups + g) % len(cases)]
        for i in range(group_size):
            trajs.append(
                episode(
                    task,
                    case,
                    noise_rate=noise,
                    seed=step * 1000 + g * 10 + i,
                    group_id=f"s{step}g{g}",
                    sample_index=i,
                    policy_version=step,
                    truncate=step >= steps - 6 and g == 0 and i == 0,
                    fail=step == steps // 2 and g == 1 and i == group_size - 1,
                )
            )
    if seed_disagreement:
        case = cases[(step * groups + groups) % len(cases)]
        trajs.append(
            disagreeing_trajectory(task, case, group_id=f"s{step}lenient", policy_version=step)
        )
    zero_groups = batch_advantages(trajs, "group_based").zero_group_ids
    metrics = M.rollout_metrics(trajs, zero_groups)
    tokens = sum(s.n_tokens for t in trajs for s in t.turns)
    metrics.update(
        {
            M.PERF_STEP_S: 42.0 + (step % 3),
            M.PERF_ROLLOUT_TOKENS_PER_S: tokens / 30.0,
            M.PERF_TRAIN_TOKENS_PER_S: tokens / 8.0,
            M.PERF_STALENESS_MEAN: 0.5 if step else 0.0,
            M.TRAIN_LOSS: 0.1 / (1 + step),
            M.TRAIN_LR: 1e-5,
        }
    )
    store.add_trajectories(step, trajs)
    store.log_metrics(step, metrics)
    return trajs


def write_val(store: RunStore, task: Task, step: int, steps: int, n_cases: int = 4) -> None:
    """``val/*`` metrics at ``step`` from :func:`summarize` over val episodes (4 samples each)."""
    trajs = [
        episode(
            task,
            case,
            noise_rate=noise_at(step, steps) * 0.8,
            seed=step * 7919 + c * 31 + i,
            group_id=f"val{c}",
            sample_index=i,
            policy_version=step,
        )
        for c, case in enumerate(task.cases("val")[:n_cases])
        for i in range(4)
    ]
    store.log_metrics(step, val_metrics(summarize(trajs, task, n_samples=4)))


def write_evaluation(store: RunStore, task: Task, step: int, n_cases: int = 6) -> None:
    """A base-vs-tuned evaluation on the test split, as ``evaluate.summarize`` reports it."""
    for label, noise in (("base", 0.6), ("tuned", 0.08)):
        trajs = [
            episode(
                task,
                case,
                noise_rate=noise,
                seed=c * 17 + i,
                group_id=f"test{c}",
                sample_index=i,
                policy_version=0 if label == "base" else step,
            )
            for c, case in enumerate(task.cases("test")[:n_cases])
            for i in range(2)
        ]
        store.add_evaluation(step, "test", label, summarize(trajs, task, n_samples=2))


def write_demo_run(
    run_dir: str | Path, steps: int = 30, *, name: str = "demo", finished: bool = True
) -> RunStore:
    """A whole demo run in ``run_dir`` (must not hold a store yet); returns the open writer."""
    task = AircraftInspection()
    config = {
        "task": TASK,
        "max_steps": steps,
        "max_turns": task.max_turns,
        "num_generations": 4,
        "loss_type": "ppo",
        "async_config": {"max_steps_off_policy": 1},
    }
    store = RunStore.create(run_dir, name, TASK, config)
    store.set_status("running")
    for step in range(steps):
        write_step(store, task, step, steps, seed_disagreement=step == steps - 3)
        if step % 5 == 0 or step == steps - 1:
            write_val(store, task, step, steps)
        store.add_findings(diagnose(store.history()))
    write_evaluation(store, task, steps - 1)
    if finished:
        store.set_status("finished")
    return store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tui.demo", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="where to write the demo run (must not exist yet)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    write_demo_run(args.run_dir, args.steps).close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
