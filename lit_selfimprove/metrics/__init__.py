"""Metrics for self-improving language models."""

from lit_selfimprove.metrics.pass_at_k import PassAtK, pass_at_k
from lit_selfimprove.metrics.vendi import HashingNgramEmbedding, SentenceEmbedding, VendiScore, vendi_score

__all__ = ["HashingNgramEmbedding", "PassAtK", "SentenceEmbedding", "VendiScore", "pass_at_k", "vendi_score"]
