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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lit_selfimprove.generation import Rollouts, generate
from lit_selfimprove.rl.advantages import compute_advantages, zero_std_fraction
from lit_selfimprove.rl.logprobs import sequence_logprobs
from lit_selfimprove.rl.losses import aggregate_loss, kl_penalty, policy_gradient_loss


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
    # 4. old-policy and reference log-probs
    input_ids, attention_mask, completion_mask = rollouts.sequences()
    token_mask = completion_mask[:, 1:].float()
    rows = input_ids.shape[0]
    mb = cfg.micro_batch_size or rows
    chunks = [slice(i, min(i + mb, rows)) for i in range(0, rows, mb)]
    # with one epoch the old policy is the current one: its log-probs are the detached current
    # ones (policy_gradient_loss's default), so a second forward would only repeat work
    need_old = cfg.ppo_epochs > 1
    with torch.no_grad():
        old_logps = _logps(policy, input_ids, attention_mask, completion_mask, chunks) if need_old else None
        ref_logps = (
            _logps(ref_model, input_ids, attention_mask, completion_mask, chunks)
            if cfg.kl_coef > 0 and ref_model is not None
            else None
        )
    # 5. loss and step; a micro-batch's loss is weighted by its share of what the aggregation averages
    # over (tokens, sequences or rows), so the gradient is the full batch's whatever the micro-batch size
    policy.train()
    total = _units(token_mask, cfg.loss_aggregation).clamp(min=1)
    sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0}
    for _ in range(cfg.ppo_epochs):
        for sl in chunks:
            logps = sequence_logprobs(policy, input_ids[sl], attention_mask[sl], completion_mask[sl])
            mask = token_mask[sl]
            weight = _units(mask, cfg.loss_aggregation) / total
            pg, pg_stats = policy_gradient_loss(
                logps,
                old_logps[sl] if old_logps is not None else None,
                advantages[sl],
                mask,
                clip_eps_low=cfg.clip_eps_low,
                clip_eps_high=cfg.clip_eps_high,
                aggregation=cfg.loss_aggregation,
                max_tokens=cfg.max_new_tokens,
            )
            loss = pg
            if ref_logps is not None:
                kl = aggregate_loss(
                    kl_penalty(logps, ref_logps[sl], cfg.kl_estimator),
                    mask,
                    cfg.loss_aggregation,
                    cfg.max_new_tokens,
                )
                loss = loss + cfg.kl_coef * kl
                sums["kl"] += float(kl.detach() * weight)
            backward(loss * weight)
            sums["loss"] += float(loss.detach() * weight)
            sums["clip_fraction"] += float(pg_stats["clip_fraction"] * weight)
        if clip is not None and cfg.max_grad_norm:
            clip(cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
    lengths = rollouts.lengths.float()
    stats = {
        "reward": float(rewards.mean()),
        "accuracy": float(correct.float().mean()),
        "zero_std_frac": float(zero_std_fraction(grouped)),
        "completion_len": float(lengths.mean()),
        "truncated_frac": float((~rollouts.finished).float().mean()),
        **{k: v / cfg.ppo_epochs for k, v in sums.items()},
    }
    return stats, rollouts, rewards


def _units(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """What ``aggregate_loss(..., aggregation)`` averages over: tokens, non-empty sequences or rows."""
    if aggregation == "token":
        return mask.sum()
    if aggregation == "sequence":
        return (mask.sum(-1) > 0).sum().to(mask.dtype)
    return mask.new_tensor(float(mask.shape[0]))


def _logps(model, input_ids, attention_mask, completion_mask, chunks) -> torch.Tensor:
    model_was_training = model.training
    model.eval()
    out = torch.cat(
        [sequence_logprobs(model, input_ids[s], attention_mask[s], completion_mask[s]) for s in chunks]
    )
    model.train(model_was_training)
    return out
