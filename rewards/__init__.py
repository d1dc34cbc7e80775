"""Rewards: parsers, the strict scorer, dense rewards, lenient counter-examples and audits."""

from rewards.dense import dense_reward, dense_reward_per_turn, per_turn_rewards
from rewards.parsing import extract_final_response, final_assistant_text, parse_answer
from rewards.strict import field_matches, normalize, strict_score
from rewards.types import RewardFn, RewardResult, scalar

__all__ = [
    "RewardFn",
    "RewardResult",
    "dense_reward",
    "dense_reward_per_turn",
    "extract_final_response",
    "field_matches",
    "final_assistant_text",
    "normalize",
    "parse_answer",
    "per_turn_rewards",
    "scalar",
    "strict_score",
]
