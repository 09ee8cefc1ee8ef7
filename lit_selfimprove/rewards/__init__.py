"""Rewards for self-improving language models."""

from lit_selfimprove.rewards.base import (
    ParseableReward,
    Reward,
    ScoringReward,
    StatsReward,
    parseable_check,
    pop_reward_stats,
    score_completions,
)
from lit_selfimprove.rewards.math_verify import MathVerifyReward, extract_boxed, strip_answer

__all__ = [
    "MathVerifyReward",
    "ParseableReward",
    "Reward",
    "ScoringReward",
    "StatsReward",
    "extract_boxed",
    "parseable_check",
    "pop_reward_stats",
    "score_completions",
    "strip_answer",
]
