"""Rewards for self-improving language models."""

from lit_selfimprove.rewards.math_verify import MathVerifyReward, extract_boxed, strip_answer

__all__ = ["MathVerifyReward", "extract_boxed", "strip_answer"]
