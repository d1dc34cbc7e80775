"""Training rewards built on the strict scorer, lenient counter-examples, and reward audits.

A reward is a function of the shape :class:`mtrl_local.scoring.RewardFn`; the strict scorer it is
audited against is :func:`mtrl_local.scoring.strict_score`.
"""

from rewards.dense import (
    dense_reward,
    dense_reward_per_turn,
    dense_strict_reward,
    per_turn_rewards,
    strict_reward,
)

__all__ = [
    "dense_reward",
    "dense_reward_per_turn",
    "dense_strict_reward",
    "per_turn_rewards",
    "strict_reward",
]
