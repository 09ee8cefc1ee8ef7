"""One policy-gradient update on sampled rollouts: the tail of RLVR's step and of SOAR's teacher step.

Pure torch (no Lightning): backward, gradient clipping and what follows the optimizer step are
passed in as callables (Lightning's ``manual_backward`` / ``clip_gradients`` and the LR scheduler's
``step``, or plain ``loss.backward()`` / ``clip_grad_norm_``). In order:

1. log-probs of the old policy (only when several epochs need them) and of the frozen reference
   (only when ``kl_coef > 0``), in micro-batches;
2. for each epoch and micro-batch: policy-gradient loss (optionally PPO-clipped) plus ``kl_coef``
   times the KL to the reference, weighted by the micro-batch's share of what the aggregation
   averages over (tokens, non-empty sequences or rows), backward; then clip, optimizer step,
   ``zero_grad`` and ``after_step``.

The weights make the accumulated gradient the whole batch's whatever the micro-batch size. With
``all_ranks`` the shares are of the units of *every* rank, times the world size (DDP / FSDP average
the ranks' gradients): the loss is then the mean over all ranks' units, not the mean of the ranks'
means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_selfimprove.distributed import all_reduce_sum, world_size
from lit_selfimprove.generation import Rollouts
from lit_selfimprove.modeling import dropout_disabled
from lit_selfimprove.rl.losses import aggregate_loss, kl_penalty, policy_gradient_loss
from lit_selfimprove.rl.micro_batch import (
    UpdateConfig,
    chunked_logprobs,
    micro_batch_logprobs,
    micro_batches,
    units,
)

__all__ = ["UpdateConfig", "policy_gradient_update"]


def _total_units(token_mask: torch.Tensor, cfg: UpdateConfig) -> torch.Tensor:
    local = units(token_mask, cfg.loss_aggregation)
    if not cfg.all_ranks:
        return local.clamp(min=1)
    return all_reduce_sum(local.detach().reshape(1))[0].clamp(min=1.0) / world_size()


def policy_gradient_update(
    policy: torch.nn.Module,
    rollouts: Rollouts,
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    cfg: UpdateConfig,
    ref_model: torch.nn.Module | None = None,
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    clip: Callable[[float], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Update ``policy`` on ``rollouts`` with per-row ``advantages``; returns the per-epoch means of
    the weighted ``loss``, ``kl``, ``clip_fraction`` and ``logp`` (summed completion log-prob per unit)."""
    input_ids, attention_mask, completion_mask = rollouts.sequences()
    advantages = advantages.to(input_ids.device)
    if cfg.trim_padding:  # rows of similar lengths share micro-batches (the loss is a sum over rows)
        order = torch.sort(rollouts.lengths.to(input_ids.device), stable=True).indices
        input_ids, attention_mask = input_ids[order], attention_mask[order]
        completion_mask, advantages = completion_mask[order], advantages[order]
    token_mask = completion_mask[:, 1:].float()
    chunks = micro_batches(input_ids.shape[0], cfg.micro_batch_size)
    total = _total_units(token_mask, cfg)  # with ``all_ranks``: a collective, before any forward
    # no dropout in any forward here: the sampler and the reference run without it (eval mode), and
    # log-probs with dropout would make the ratio and the KL noise (the policy stays in train mode)
    with dropout_disabled(policy):
        # with one epoch the old policy is the current one: its log-probs are the detached current
        # ones (policy_gradient_loss's default), so a second forward would only repeat work
        seqs = (input_ids, attention_mask, completion_mask)
        with torch.no_grad():
            trim = cfg.trim_padding
            old_logps = chunked_logprobs(policy, *seqs, chunks, trim) if cfg.ppo_epochs > 1 else None
            use_ref = cfg.kl_coef > 0 and ref_model is not None
            ref_logps = chunked_logprobs(ref_model, *seqs, chunks, trim) if use_ref else None
        policy.train()
        sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "logp": 0.0}
        for _ in range(cfg.ppo_epochs):
            for sl in chunks:
                logps = micro_batch_logprobs(policy, *seqs, sl, cfg.trim_padding)
                mask = token_mask[sl]
                weight = units(mask, cfg.loss_aggregation) / total
                loss, pg_stats = policy_gradient_loss(
                    logps,
                    old_logps[sl] if old_logps is not None else None,
                    advantages[sl],
                    mask,
                    clip_eps_low=cfg.clip_eps_low,
                    clip_eps_high=cfg.clip_eps_high,
                    aggregation=cfg.loss_aggregation,
                    max_tokens=cfg.max_new_tokens,
                )
                if ref_logps is not None:
                    per_token = kl_penalty(logps, ref_logps[sl], cfg.kl_estimator)
                    kl = aggregate_loss(per_token, mask, cfg.loss_aggregation, cfg.max_new_tokens)
                    loss = loss + cfg.kl_coef * kl
                    sums["kl"] += float(kl.detach() * weight)
                backward(loss * weight)
                sums["loss"] += float(loss.detach() * weight)
                sums["clip_fraction"] += float(pg_stats["clip_fraction"] * weight)
                sums["logp"] += float((logps.detach() * mask).sum() / total)
            if clip is not None and cfg.max_grad_norm:
                clip(cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
    return {k: v / cfg.ppo_epochs for k, v in sums.items()}
