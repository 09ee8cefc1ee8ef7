"""The settings groups of :class:`~lit_selfimprove.modules.suffix_policy_dpo.SuffixPolicyDPO`.

Each group is one argument of the module and one mapping under ``model.init_args`` in YAML::

    candidates: {num_rollouts: 8, include_suffix: true}
    objective: {loss: dpo, beta: 0.1}
    optim: {lr: 1.0e-4, warmup_steps: 10, grad_clip: 1.0}
    validation: {temperature: 1.0}
    judge_health: {fail_after_steps: 3}

LightningCLI builds each dataclass from its mapping (an unknown key is an error, ``--help`` lists the
fields, ``--model.init_args.candidates.num_rollouts=4`` sets one field) and the module keeps it as an
attribute of the same name (``module.candidates.num_rollouts``); its hparams hold the plain dict
(``dataclasses.asdict``), so checkpoints load with ``weights_only`` and ``hparams.yaml`` rebuilds the
module. The model's own arguments (``model``, ``dtype``, ``quantization``, ``lora``, ...) stay flat on the
module, as on :class:`~lit_selfimprove.modules.student_rlvr.StudentRLVR`. Every field is validated when
its group is built, so a bad value fails at start-up, not at the first step that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lit_selfimprove.modules._shared import check_at_least_one, check_optimizer

__all__ = [
    "GROUPS",
    "CandidateConfig",
    "JudgeHealthConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "ValidationConfig",
]


@dataclass
class CandidateConfig:
    """What each prefix's candidates are and how the policy's rollouts are sampled (``candidates:``).

    The candidate columns are, in this order: the K rollouts, the original suffix, the rewrite
    (:attr:`sources`). The judge scores them all; chosen = best, rejected = worst."""

    # K policy rollouts per prefix (paper: 16; 0: suffix vs rewrite only)
    num_rollouts: int = 16
    # the document's original suffix is a candidate
    include_suffix: bool = True
    # the rewriter's version of the suffix is a candidate (tokenized after its prefix, cut to the batch's
    # suffix length); needs the module's ``rewriter``
    include_rewrite: bool = False
    # rollout length in tokens (None: the batch's suffix length N)
    max_new_tokens: int | None = None
    # sampling temperature of the rollouts (paper: 1.0; 0: greedy)
    temperature: float = 1.0
    # nucleus threshold of the rollouts (paper: 1.0)
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.num_rollouts < 0:
            raise ValueError(f"num_rollouts must be >= 0, got {self.num_rollouts}")
        if len(self.sources) < 2:
            raise ValueError(
                "a preference needs at least two candidates per prefix: num_rollouts + include_suffix + "
                f"include_rewrite is {len(self.sources)}"
            )
        check_at_least_one(max_new_tokens=self.max_new_tokens)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def sources(self) -> list[str]:
        """The source of each candidate column: K ``rollout``, then ``suffix``, then ``rewrite``."""
        return (
            ["rollout"] * self.num_rollouts
            + ["suffix"] * self.include_suffix
            + ["rewrite"] * self.include_rewrite
        )


@dataclass
class ObjectiveConfig:
    """What the policy learns from each prefix's chosen (and rejected) candidate (``objective:``)."""

    # ``dpo``: chosen vs rejected, against a frozen reference (the initial policy); ``rf_nll``:
    # reward-filtered NLL on the chosen candidate, also where all candidates tie (no reference is kept)
    loss: Literal["dpo", "rf_nll"] = "dpo"
    # DPO temperature (not stated in the paper); not used by ``rf_nll``
    beta: float = 0.1

    def __post_init__(self) -> None:
        losses = ("dpo", "rf_nll")
        if self.loss not in losses:
            raise ValueError(f"loss must be one of {losses}, got {self.loss!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


@dataclass
class OptimConfig:
    """The policy update: AdamW, its learning-rate schedule, clipping and micro-batches (``optim:``)."""

    # AdamW peak learning rate (paper, continual pretraining: 5e-6)
    lr: float = 5e-6
    # AdamW weight decay
    weight_decay: float = 0.0
    # linear warmup over this many optimizer steps, then cosine decay over ``trainer.max_steps``
    warmup_steps: int = 100
    # cosine floor as a fraction of ``lr`` (paper: 0.1)
    min_lr_ratio: float = 0.1
    # ``adamw`` (torch), ``adamw8bit`` (bitsandbytes' 8-bit AdamW: optimizer states in 8 bits; CPU or
    # GPU) or ``paged_adamw8bit`` (CUDA only); see :func:`~lit_selfimprove.modules._shared.adamw`
    optimizer: str = "adamw"
    # gradient-norm clipping (None or 0: no clipping)
    grad_clip: float | None = 1.0
    # prefixes (pairs) per forward/backward (None: the whole batch at once)
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        if self.lr < 0 or self.weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got {self.lr} and {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 or None, got {self.grad_clip}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")


@dataclass
class ValidationConfig:
    """The one sampled continuation per held-out prefix that validation judges against its suffix
    (``validation:``)."""

    # sampling temperature (0: greedy)
    temperature: float = 1.0
    # continuation length in tokens (None: ``candidates.max_new_tokens``, else the batch's suffix length)
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        check_at_least_one(max_new_tokens=self.max_new_tokens)


@dataclass
class JudgeHealthConfig:
    """When a judge that gives nothing usable warns and stops the run (``judge_health:``).

    A step is bad when more than ``max_unparseable_frac`` of the judge's verdicts cannot be parsed
    (``stats["unparseable"] / stats["calls"]``, summed over ranks) or more than ``max_skipped_frac``
    of its prefixes are skipped (no pair / no scored candidate: nothing learned from them). The first
    bad step after good ones warns on the console (the judge's class, the shares, its last unparseable
    reply and the expected format when it exposes them). A healthy run never comes near the defaults."""

    # the share of unparseable verdicts above which a step is bad
    max_unparseable_frac: float = 0.9
    # the share of skipped prefixes above which a step is bad
    max_skipped_frac: float = 0.9
    # this many bad steps in a row stop the run with a RuntimeError saying why (None: only warn)
    fail_after_steps: int | None = 20

    def __post_init__(self) -> None:
        if not (0 <= self.max_unparseable_frac <= 1 and 0 <= self.max_skipped_frac <= 1):
            raise ValueError(
                "max_unparseable_frac and max_skipped_frac must be in [0, 1], got "
                f"{self.max_unparseable_frac} and {self.max_skipped_frac}"
            )
        if self.fail_after_steps is not None and self.fail_after_steps < 1:
            raise ValueError(f"fail_after_steps must be >= 1 or None, got {self.fail_after_steps}")


GROUPS = ("candidates", "objective", "optim", "validation", "judge_health")
"""The module's arguments that are settings groups, in the order of its signature."""
