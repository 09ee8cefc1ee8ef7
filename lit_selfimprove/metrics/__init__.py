"""Metrics for self-improving language models."""

from lit_selfimprove.metrics.pass_at_k import PassAtK, pass_at_k

__all__ = ["PassAtK", "pass_at_k"]
