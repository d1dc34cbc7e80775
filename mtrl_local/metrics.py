"""Metric names and the rollout-side metrics computed from trajectories.

Every name the toolkit logs is written once, here (docs/design.md, "Metrics", has the table), so
the trainer, the run store, MLflow, the diagnostics and the dashboard agree on one spelling.
:func:`rollout_metrics` turns one step's trajectories into the ``rollout/*`` and ``analysis/*``
values; it is pure (no I/O, no torch).

Conventions, chosen so a step's numbers mean the same thing whatever happened in it:

* Trajectories whose environment failed (``failed``) are excluded from training, so every metric
  except ``rollout/failure_rate`` is computed over the others.
* A per-turn reward list counts as its sum (the trajectory's return,
  :func:`mtrl_local.scoring.scalar`).
* A metric with no population (no scored trajectory, no model turn, every group with zero
  advantage) is *absent* from the returned dict rather than 0 or NaN: a 0 would read as a real
  value on a chart and trip the diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from mtrl_local.scoring import scalar
from mtrl_local.trajectory import Trajectory

# -- rollout (training side) -----------------------------------------------------------------------
REWARD_MEAN = "rollout/reward/mean"
REWARD_STD = "rollout/reward/std"
REWARD_ZERO_FRAC = "rollout/reward/zero_frac"
REWARD_VALID_MEAN = "rollout/reward/valid_mean"
TURNS_MEAN = "rollout/turns/mean"
TURNS_MAX_TURNS_FRAC = "rollout/turns/max_turns_frac"
TOKENS_RESPONSE_MEAN = "rollout/tokens/response_mean"
TOKENS_RESPONSE_MAX = "rollout/tokens/response_max"
TRUNCATED_FRAC = "rollout/truncated_frac"
#: Share of rollouts the reward calls a success (≥ success_threshold) while strict scores 0: the
#: reward audit, run live on every step's rollouts.
REWARD_OVER_STRICT_FRAC = "rollout/reward/over_strict_frac"
COMPLETION_RATE = "rollout/completion_rate"
FAILURE_RATE = "rollout/failure_rate"
TOOL_CALLS_MEAN = "rollout/tool_calls/mean"
TOOL_ERRORS_FRAC = "rollout/tool_errors_frac"
#: Dynamic sampling (``dynamic_sampling``): zero-advantage groups sampled and left out of the
#: step's batch, extra rollout rounds run to refill it, and the episodes those rounds sampled.
GROUPS_DROPPED = "rollout/groups_dropped"
REFILL_ROUNDS = "rollout/refill_rounds"
REFILL_EPISODES = "rollout/refill_episodes"
# -- analysis --------------------------------------------------------------------------------------
ZERO_ADV_GROUPS = "analysis/zero_adv_groups"
# -- optimiser -------------------------------------------------------------------------------------
TRAIN_LOSS = "train/loss"
TRAIN_CLIP_FRAC = "train/clip_frac"
TRAIN_IS_RATIO_MEAN = "train/is_ratio_mean"
TRAIN_KL = "train/kl"
TRAIN_ENTROPY = "train/entropy"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_LR = "train/lr"
#: Tokens the update ran through the model (each shared prompt once) and sequences trained on.
TRAIN_TOKENS = "train/tokens"
TRAIN_SEQUENCES = "train/sequences"
#: Means of the ratio πθ/π_old and of the share of tokens whose sampler weight was truncated.
TRAIN_RATIO_MEAN = "train/ratio_mean"
TRAIN_IS_TRUNC_FRAC = "train/is_trunc_frac"
#: Share of loss tokens whose sampler weight was set to 0 (``is_correction`` token_mask or
#: sequence_mask), in place of ``train/is_trunc_frac``.
TRAIN_IS_REJECTED_FRAC = "train/is_rejected_frac"
#: Trajectories left out of the loss as cut by the token budget (``mask_truncated``).
TRAIN_MASKED_TRUNCATED = "train/masked_truncated"
# -- speed -----------------------------------------------------------------------------------------
PERF_STEP_S = "perf/step_s"
PERF_ROLLOUT_TOKENS_PER_S = "perf/rollout_tokens_per_s"
PERF_TRAIN_TOKENS_PER_S = "perf/train_tokens_per_s"
PERF_STALENESS_MEAN = "perf/staleness_mean"
#: Batches the async worker made that were too stale to use (cumulative) and the weights version.
PERF_DROPPED_STALE = "perf/dropped_stale"
PERF_POLICY_VERSION = "perf/policy_version"
# -- bring-your-own agent (the rollout server's batch source) --------------------------------------
AGENT_FAILED_FRAC = "agent/failed_frac"
AGENT_HISTORY_MISMATCH = "agent/history_mismatch"
AGENT_TIMEOUTS = "agent/timeouts"
AGENT_CRASHES = "agent/crashes"
# -- held-out evaluation ---------------------------------------------------------------------------
VAL_REWARD_MEAN = "val/reward/mean"
VAL_REWARD_PASS_K_1 = "val/reward/pass_k_1"
VAL_REWARD_PASS_K_8 = "val/reward/pass_k_8"
VAL_COMPLETION_RATE = "val/completion_rate"
VAL_FIELD_ACC = "val/field_acc"
VAL_TSR = "val/tsr"

ROLLOUT_METRICS: tuple[str, ...] = (
    REWARD_MEAN,
    REWARD_STD,
    REWARD_ZERO_FRAC,
    REWARD_VALID_MEAN,
    TURNS_MEAN,
    TURNS_MAX_TURNS_FRAC,
    TOKENS_RESPONSE_MEAN,
    TOKENS_RESPONSE_MAX,
    TRUNCATED_FRAC,
    COMPLETION_RATE,
    FAILURE_RATE,
    TOOL_CALLS_MEAN,
    TOOL_ERRORS_FRAC,
    ZERO_ADV_GROUPS,
)
TRAIN_METRICS: tuple[str, ...] = (
    TRAIN_LOSS,
    TRAIN_CLIP_FRAC,
    TRAIN_IS_RATIO_MEAN,
    TRAIN_KL,
    TRAIN_ENTROPY,
    TRAIN_GRAD_NORM,
    TRAIN_LR,
)
PERF_METRICS: tuple[str, ...] = (
    PERF_STEP_S,
    PERF_ROLLOUT_TOKENS_PER_S,
    PERF_TRAIN_TOKENS_PER_S,
    PERF_STALENESS_MEAN,
)
VAL_METRICS: tuple[str, ...] = (
    VAL_REWARD_MEAN,
    VAL_REWARD_PASS_K_1,
    VAL_REWARD_PASS_K_8,
    VAL_COMPLETION_RATE,
    VAL_FIELD_ACC,
    VAL_TSR,
)
#: The core names, in the design table's order. :func:`val_reward_pass_k` and
#: :func:`val_strict_pass_k` name pass@k for other k; the store and MLflow accept any name.
ALL_METRICS: tuple[str, ...] = ROLLOUT_METRICS + TRAIN_METRICS + PERF_METRICS + VAL_METRICS


def train_metric(loss_metric: str) -> str:
    """The logged name of a metric a loss reports (``clip_frac`` → ``train/clip_frac``)."""
    return f"train/{loss_metric}"


def val_reward_pass_k(k: int) -> str:
    """Held-out pass@k with success = reward ≥ the threshold (``val/reward/pass_k_<k>``)."""
    return f"val/reward/pass_k_{k}"


def val_strict_pass_k(k: int) -> str:
    """Held-out pass@k with success = strict score ≥ the threshold (``val/strict/pass_k_<k>``)."""
    return f"val/strict/pass_k_{k}"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def trajectory_reward(traj: Trajectory) -> float | None:
    """The scalar return of a trajectory (a per-turn list summed), ``None`` if unscored."""
    return None if traj.reward is None else scalar(traj.reward)


def rollout_metrics(
    trajectories: Sequence[Trajectory],
    zero_adv_groups: Collection[str],
    group_ids: Collection[str] | None = None,
) -> dict[str, float]:
    """One step's ``rollout/*`` metrics and ``analysis/zero_adv_groups``.

    Args:
        trajectories: every rollout the step produced, failed ones included (they are what
            ``rollout/failure_rate`` counts).
        zero_adv_groups: ids of the groups whose advantages are all zero, as the advantage
            estimator decided (:func:`mtrl_local.advantages.batch_advantages`).
        group_ids: the groups of the batch (the denominator of ``analysis/zero_adv_groups``);
            ``None`` takes the ``group_id`` of the non-failed trajectories.

    ``rollout/reward/valid_mean`` averages the rewards of the groups that are *not* in
    ``zero_adv_groups``: the part of the batch that carries gradient. ``rollout/tool_errors_frac``
    is per tool call (errors / calls), ``rollout/tokens/*`` per model turn.
    """
    n = len(trajectories)
    out: dict[str, float] = {}
    if n == 0:
        return out
    ok = [t for t in trajectories if not t.failed]
    out[FAILURE_RATE] = (n - len(ok)) / n
    if not ok:
        return out

    scored = [(t, r) for t in ok if (r := trajectory_reward(t)) is not None]
    if scored:
        rewards = [r for _, r in scored]
        mean = _mean(rewards)
        out[REWARD_MEAN] = mean
        out[REWARD_STD] = math.sqrt(_mean([(r - mean) ** 2 for r in rewards]))
        out[REWARD_ZERO_FRAC] = _mean([float(r == 0.0) for r in rewards])

    zero = set(zero_adv_groups)
    groups = set(group_ids) if group_ids is not None else {t.group_id for t in ok}
    if groups:
        out[ZERO_ADV_GROUPS] = len(groups & zero) / len(groups)
    valid = [r for t, r in scored if t.group_id not in zero]
    if valid:
        out[REWARD_VALID_MEAN] = _mean(valid)

    out[TURNS_MEAN] = _mean([float(t.n_turns) for t in ok])
    out[TURNS_MAX_TURNS_FRAC] = _mean([float(t.done_reason == "max_turns") for t in ok])
    tokens = [float(s.n_tokens) for t in ok for s in t.turns]
    if tokens:
        out[TOKENS_RESPONSE_MEAN] = _mean(tokens)
        out[TOKENS_RESPONSE_MAX] = max(tokens)
    out[TRUNCATED_FRAC] = _mean([float(t.truncated) for t in ok])
    out[COMPLETION_RATE] = _mean([float(t.completed) for t in ok])
    out[TOOL_CALLS_MEAN] = _mean([float(t.tool_calls) for t in ok])
    calls = sum(t.tool_calls for t in ok)
    if calls:
        out[TOOL_ERRORS_FRAC] = sum(t.tool_errors for t in ok) / calls
    return out


def reward_over_strict_frac(
    trajectories: Sequence[Trajectory], success_threshold: float = 1.0
) -> float | None:
    """Share of (non-failed) trajectories with reward ≥ ``success_threshold`` and strict 0.

    The rollouts audit of ``rewards.audit`` applied to training rollouts: a reward that pays for
    what the evaluation rejects is a reward hack, whatever the trends say.
    """
    scored = [
        t for t in trajectories if not t.failed and t.reward is not None and t.strict is not None
    ]
    if not scored:
        return None
    over = sum(
        1
        for t in scored
        if (trajectory_reward(t) or 0.0) >= success_threshold and (t.strict or 0.0) == 0.0
    )
    return over / len(scored)


def perf_metrics(
    *,
    step_s: float,
    new_tokens: int,
    rollout_s: float,
    train_tokens: float,
    train_s: float,
    staleness: int,
    dropped: int,
    policy_version: int,
) -> dict[str, float]:
    """One step's ``perf/*`` metrics from its timings and counters."""
    return {
        PERF_STEP_S: step_s,
        PERF_ROLLOUT_TOKENS_PER_S: new_tokens / max(rollout_s, 1e-9),
        PERF_TRAIN_TOKENS_PER_S: train_tokens / max(train_s, 1e-9),
        PERF_STALENESS_MEAN: float(staleness),
        PERF_DROPPED_STALE: float(dropped),
        PERF_POLICY_VERSION: float(policy_version),
    }
