"""Sampling backends producing :class:`Rollouts`."""

from lit_selfimprove.generation.sampler import Rollouts, generate

__all__ = ["Rollouts", "generate"]
