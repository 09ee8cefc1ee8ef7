"""One RLVR update: sample -> score -> advantage -> loss -> step.

Pure torch (no Lightning): :class:`~lit_selfimprove.modules.StudentRLVR` calls it with
Lightning's ``manual_backward`` / ``clip_gradients``; SOAR's inner loop calls it with a
plain optimizer on a copy of the student. The steps, in order:

1. sample ``group_size`` completions per question (temperature, top_p, stop at EOS);
2. score them with the injected reward (``rewards``) and plain correctness (``correct``);
3. advantages per group (RLOO by default; GRPO, Dr.GRPO);
4. log-probs of the old policy (only when several epochs need them) and of the
   frozen reference (only when ``kl_coef > 0``);
5. for each epoch and micro-batch: policy-gradient loss (optionally PPO-clipped) plus
   ``kl_coef`` times the k3 KL to the reference, backward; then clip and step.

Steps 4-5 are :func:`~lit_selfimprove.rl.policy_update.policy_gradient_update`, which SOAR's
teacher update shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from lit_selfimprove.generation import Rollouts, generate
from lit_selfimprove.rl.advantages import compute_advantages, zero_std_fraction
from lit_selfimprove.rl.policy_update import UpdateConfig, policy_gradient_update


@dataclass
class RLVRConfig:
    """Hyper-parameters of one RLVR update (defaults: SOAR's student settings)."""

    group_size: int = 32
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    advantage: str = "rloo"
    loss_aggregation: str = "token"
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    ppo_epochs: int = 1
    kl_coef: float = 0.001
    kl_estimator: str = "k3"
    micro_batch_size: int | None = None
    max_grad_norm: float | None = 1.0
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
        """Steps 4-5 (:func:`~lit_selfimprove.rl.policy_update.policy_gradient_update`): micro-batches
        weighted by this rank's units (each rank's loss is its own batch's mean)."""
        names = [f.name for f in fields(UpdateConfig) if f.name != "all_ranks"]
        return UpdateConfig(**{name: getattr(self, name) for name in names})


def score_completions(reward: Callable, completions: list[str], answers: list[str], prompts=None):
    """``(rewards, correct)``: rewards from the reward; correctness from its ``score`` method
    when it has one (shaped rewards), else ``rewards > 0`` (binary rewards)."""
    if hasattr(reward, "score"):
        rewards, correct = reward.score(completions, answers)
    else:
        rewards = reward(completions, answers)
        correct = rewards > 0
    return torch.as_tensor(rewards, dtype=torch.float32), torch.as_tensor(correct).bool()


def rlvr_step(
    policy: torch.nn.Module,
    tokenizer,
    reward: Callable,
    prompts: Sequence[str],
    answers: Sequence[str],
    cfg: RLVRConfig,
    optimizer: torch.optim.Optimizer,
    ref_model: torch.nn.Module | None = None,
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    clip: Callable[[float], None] | None = None,
    after_step: Callable[[], None] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, float], Rollouts, torch.Tensor]:
    """Run one RLVR update on ``prompts`` and return ``(stats, rollouts, rewards)``."""
    g = cfg.group_size
    # 1. sample
    rollouts = generate(
        policy,
        tokenizer,
        list(prompts),
        num_samples=g,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        generator=generator,
        sync_ranks=cfg.sync_ranks,
    )
    # 2. score
    expanded = [a for a in answers for _ in range(g)]
    rewards, correct = score_completions(reward, rollouts.texts, expanded)
    # 3. advantages
    device = rollouts.completion_ids.device
    grouped = rewards.view(-1, g)
    advantages = compute_advantages(grouped, cfg.advantage).reshape(-1).to(device)
    # 4.-5. old-policy and reference log-probs, loss, backward, clip and step
    update = policy_gradient_update(
        policy,
        rollouts,
        advantages,
        optimizer,
        cfg.update_config(),
        ref_model=ref_model,
        backward=backward,
        clip=clip,
        after_step=after_step,
    )
    lengths = rollouts.lengths.float()
    stats = {
        "reward": float(rewards.mean()),
        "accuracy": float(correct.float().mean()),
        "zero_std_frac": float(zero_std_fraction(grouped)),
        "completion_len": float(lengths.mean()),
        "truncated_frac": float((~rollouts.finished).float().mean()),
        **{k: update[k] for k in ("loss", "kl", "clip_fraction")},
    }
    return stats, rollouts, rewards
