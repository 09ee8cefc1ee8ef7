"""Pure-torch RL math: advantage estimators, policy/KL/DPO losses and log-prob helpers."""

from lit_selfimprove.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    dr_grpo_advantages,
    grpo_advantages,
    rloo_advantages,
    zero_std_fraction,
)
from lit_selfimprove.rl.logprobs import compute_position_ids, selective_log_softmax, sequence_logprobs
from lit_selfimprove.rl.losses import (
    AGGREGATION_MODES,
    KL_ESTIMATORS,
    aggregate_loss,
    dpo_loss,
    kl_penalty,
    masked_mean,
    nll_loss,
    policy_gradient_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATION_MODES",
    "KL_ESTIMATORS",
    "aggregate_loss",
    "compute_advantages",
    "compute_position_ids",
    "dpo_loss",
    "dr_grpo_advantages",
    "grpo_advantages",
    "kl_penalty",
    "masked_mean",
    "nll_loss",
    "policy_gradient_loss",
    "rloo_advantages",
    "selective_log_softmax",
    "sequence_logprobs",
    "zero_std_fraction",
]
