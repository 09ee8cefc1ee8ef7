"""SOAR teacher math on tensors (no Lightning): RLOO advantages over the ``g`` datasets and the
Intrinsic-T learnability reward. Parsing teacher completions into (question, answer) pairs is
:mod:`lit_selfimprove.loops.teacher_pairs`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_selfimprove.rl.advantages import rloo_advantages

__all__ = ["learnability", "learnability_per_question", "teacher_advantages"]


def teacher_advantages(dataset_rewards: Tensor | Sequence[float]) -> Tensor:
    """RLOO over the ``g`` datasets: ``A_k = R_k - mean_{j != k} R_j`` (a ``[g]`` tensor)."""
    rewards = torch.as_tensor(dataset_rewards, dtype=torch.float32)
    if rewards.ndim != 1:
        raise ValueError(f"dataset_rewards must be a [g] vector, got shape {tuple(rewards.shape)}")
    return rloo_advantages(rewards.unsqueeze(0)).squeeze(0)


def learnability_per_question(success_rates: Tensor | Sequence[float]) -> Tensor:
    """Intrinsic-T reward per question: ``0`` if ``s == 0`` (never solved) else ``1 - s``."""
    s = torch.as_tensor(success_rates, dtype=torch.float32)
    return torch.where(s == 0, torch.zeros_like(s), 1.0 - s)


def learnability(success_rates: Tensor | Sequence[float]) -> float:
    """Intrinsic-T dataset reward: the mean of :func:`learnability_per_question` (0 for no questions)."""
    values = learnability_per_question(success_rates)
    return float(values.mean()) if values.numel() else 0.0
