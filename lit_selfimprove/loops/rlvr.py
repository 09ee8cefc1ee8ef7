"""One RLVR update: sample -> score -> advantage -> loss -> step.

Sampling, scoring and the update (no Lightning): :class:`~lit_selfimprove.modules.StudentRLVR` calls it with
Lightning's ``manual_backward`` / ``clip_gradients``; SOAR's inner loop calls it with a
plain optimizer on a copy of the student. The steps, in order:

1. sample ``group_size`` completions per question (temperature, top_p, stop at EOS);
2. score them with the injected reward (``rewards``, see :mod:`lit_selfimprove.rewards.base`) and plain correctness (``correct``);
3. advantages per group (RLOO by default; GRPO, Dr.GRPO);
4. log-probs of the old policy (only when several epochs need them) and of the
   frozen reference (only when ``kl_coef > 0``);
5. for each epoch and micro-batch: policy-gradient loss (optionally PPO-clipped) plus
   ``kl_coef`` times the k3 KL to the reference, backward; then clip and step.

Steps 4-5 are :func:`~lit_selfimprove.loops.policy_update.policy_gradient_update`, which SOAR's
teacher update shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lit_selfimprove.generation import Rollouts, generate
from lit_selfimprove.loops.policy_update import policy_gradient_update
from lit_selfimprove.rewards.base import Reward, score_completions
from lit_selfimprove.rl.advantages import compute_advantages, zero_std_fraction
from lit_selfimprove.rl.rlvr_config import RLVRConfig

__all__ = ["rlvr_step"]


def rlvr_step(
    policy: torch.nn.Module,
    tokenizer,
    reward: Reward,
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
