"""Group-relative advantage estimators (pure torch, no Lightning).

All estimators take ``rewards`` of shape ``[num_groups, G]``: ``G`` completions were sampled for each
prompt (a "group") and each received a scalar reward. They return advantages of the same shape, in
floating point (integer/bool rewards are converted to ``torch.get_default_dtype()``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "compute_advantages",
    "dr_grpo_advantages",
    "grpo_advantages",
    "rloo_advantages",
    "zero_std_fraction",
]


def _as_group_rewards(rewards: Tensor, min_group_size: int, name: str) -> Tensor:
    if not isinstance(rewards, Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"{name}: rewards must have shape [num_groups, G], got {tuple(rewards.shape)}")
    if rewards.shape[1] < min_group_size:
        raise ValueError(f"{name}: needs a group size G >= {min_group_size}, got G={rewards.shape[1]}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE Leave-One-Out: ``A_i = r_i - mean_{j != i} r_j = r_i - (sum_g - r_i) / (G - 1)``.

    Equivalently ``A_i = G / (G - 1) * (r_i - mean_g)``. Raises ``ValueError`` when ``G < 2``.
    """
    rewards = _as_group_rewards(rewards, 2, "rloo_advantages")
    group_size = rewards.shape[1]
    total = rewards.sum(dim=1, keepdim=True)
    baseline = (total - rewards) / (group_size - 1)
    return rewards - baseline


def grpo_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """GRPO: ``A_i = (r_i - mean_g) / (std_g + eps)``.

    ``std_g`` is the *unbiased* (Bessel-corrected, ``correction=1``) group standard deviation, i.e.
    ``torch.std``'s default, matching TRL's ``GRPOTrainer``. Groups whose rewards are all equal get
    advantage 0. Raises ``ValueError`` when ``G < 2`` (the unbiased std is undefined).
    """
    rewards = _as_group_rewards(rewards, 2, "grpo_advantages")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)  # unbiased (correction=1)
    return (rewards - mean) / (std + eps)


def dr_grpo_advantages(rewards: Tensor) -> Tensor:
    """Dr. GRPO: ``A_i = r_i - mean_g`` (no std normalisation). Works for any ``G >= 1``."""
    rewards = _as_group_rewards(rewards, 1, "dr_grpo_advantages")
    return rewards - rewards.mean(dim=1, keepdim=True)


ADVANTAGE_ESTIMATORS = {
    "rloo": rloo_advantages,
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
}


def compute_advantages(rewards: Tensor, estimator: str) -> Tensor:
    """Dispatch to ``rloo_advantages`` / ``grpo_advantages`` / ``dr_grpo_advantages`` by name."""
    try:
        fn = ADVANTAGE_ESTIMATORS[estimator]
    except (KeyError, TypeError):
        valid = ", ".join(repr(k) for k in ADVANTAGE_ESTIMATORS)
        raise ValueError(f"Unknown advantage estimator {estimator!r}; valid names: {valid}") from None
    return fn(rewards)


def zero_std_fraction(rewards: Tensor) -> Tensor:
    """Fraction of groups whose rewards are all (exactly) equal, i.e. that carry no learning signal.

    Returns a scalar float tensor; 0.0 for an empty batch (``num_groups == 0``).
    """
    rewards = _as_group_rewards(rewards, 1, "zero_std_fraction")
    if rewards.shape[0] == 0:
        return rewards.new_zeros(())
    all_equal = (rewards == rewards[:, :1]).all(dim=1)
    return all_equal.to(rewards.dtype).mean()
