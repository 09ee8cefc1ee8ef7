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
from lit_selfimprove.rewards.judge_verdict import JudgeVerdictReward, canonical_verdict
from lit_selfimprove.rewards.math_verify import MathVerifyReward, extract_boxed, strip_answer
from lit_selfimprove.rewards.rewrite import RewriteReward, rewrite_answer

__all__ = [
    "JudgeVerdictReward",
    "MathVerifyReward",
    "ParseableReward",
    "Reward",
    "RewriteReward",
    "ScoringReward",
    "StatsReward",
    "canonical_verdict",
    "extract_boxed",
    "parseable_check",
    "pop_reward_stats",
    "rewrite_answer",
    "score_completions",
    "strip_answer",
]
