"""The hyper-parameters of one RLVR update (:class:`RLVRConfig`, tensors-only).

The update itself, which samples and scores, is :func:`lit_selfimprove.loops.rlvr.rlvr_step`;
its steps 4-5 are :func:`lit_selfimprove.loops.policy_update.policy_gradient_update`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from lit_selfimprove.rl.advantages import compute_advantages
from lit_selfimprove.rl.micro_batch import UpdateConfig


@dataclass
class RLVRConfig:
    """Hyper-parameters of one RLVR update (defaults: SOAR's student settings).

    A typed settings group: ``StudentRLVR(rl=...)`` takes it as ``rl:`` in YAML (and
    ``TeacherMetaRL(inner=...)`` a subclass as ``inner:``); the ``Literal`` fields are checked by
    LightningCLI at parse time and listed by ``--help``."""

    group_size: int = 32
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    advantage: Literal["rloo", "grpo", "dr_grpo"] = "rloo"
    loss_aggregation: Literal["token", "sequence", "fixed"] = "token"
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    ppo_epochs: int = 1
    kl_coef: float = 0.001
    kl_estimator: Literal["k3", "k1", "k2"] = "k3"
    micro_batch_size: int | None = None
    max_grad_norm: float | None = 1.0
    # micro-batches of rows of similar length, their all-padding columns not computed (see UpdateConfig)
    trim_padding: bool = False
    # keep ranks generating in lockstep (needed when the policy is sharded); ``None``: on under
    # torch.distributed. SOAR's inner students are unsharded and differ per rank: ``False``.
    sync_ranks: bool | None = None

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group advantages, got {self.group_size}")
        if self.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        compute_advantages(torch.zeros(1, 2), self.advantage)  # validates the name

    def update_config(self) -> UpdateConfig:
        """Steps 4-5 (:func:`~lit_selfimprove.loops.policy_update.policy_gradient_update`): micro-batches
        weighted by this rank's units (each rank's loss is its own batch's mean)."""
        names = [f.name for f in fields(UpdateConfig) if f.name != "all_ranks"]
        return UpdateConfig(**{name: getattr(self, name) for name in names})
