"""Token-level policy losses, KL penalties and preference losses (pure torch, no Lightning).

Shapes: ``[B, T]`` per-token tensors with a ``[B, T]`` mask (1 = token counts, 0 = padding / prompt).
Masks may be bool, int or float; float masks act as per-token weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AGGREGATION_MODES",
    "KL_ESTIMATORS",
    "aggregate_loss",
    "dpo_loss",
    "kl_penalty",
    "masked_mean",
    "nll_loss",
    "policy_gradient_loss",
]

AGGREGATION_MODES = ("token", "sequence", "fixed")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    return mask.to(device=like.device, dtype=dtype)


def _masked_values(values: Tensor, mask: Tensor) -> Tensor:
    """``values * mask`` with masked-out entries forced to exactly 0 (so inf/nan there cannot leak)."""
    return values.masked_fill(mask == 0, 0.0) * mask


def _safe_divide(num: Tensor, denom: Tensor) -> Tensor:
    """``num / denom`` where ``denom != 0``, else 0 (keeps the autograd graph of ``num``)."""
    nonzero = denom != 0
    return torch.where(nonzero, num / torch.where(nonzero, denom, torch.ones_like(denom)), num * 0.0)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over entries where ``mask`` is set (weighted by ``mask`` if it is float).

    With ``dim=None`` reduces everything to a scalar; otherwise reduces ``dim``. Where the mask is
    empty the result is 0 (not NaN).
    """
    mask = _float_mask(mask, values)
    masked = _masked_values(values, mask)
    if dim is None:
        return _safe_divide(masked.sum(), mask.sum())
    return _safe_divide(masked.sum(dim=dim), mask.sum(dim=dim))


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str = "token",
    max_tokens: int | None = None,
) -> Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar.

    * ``"token"``: ``sum(per_token * mask) / sum(mask)`` -- mean over all unmasked tokens of the batch
      (DAPO-style token-level aggregation). 0 if the whole mask is empty.
    * ``"sequence"``: mean over sequences of each sequence's token mean (original GRPO). Sequences whose
      mask is empty are *excluded* from the outer mean (they neither contribute 0 nor count). 0 if every
      sequence is empty.
    * ``"fixed"``: ``sum(per_token * mask) / (B * max_tokens)`` -- Dr. GRPO's constant normaliser;
      ``max_tokens`` (typically the generation budget) is required.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must match")
    if per_token.ndim != 2:
        raise ValueError(f"aggregate_loss expects [B, T] inputs, got {tuple(per_token.shape)}")
    fmask = _float_mask(mask, per_token)
    masked = _masked_values(per_token, fmask)
    if mode == "token":
        return _safe_divide(masked.sum(), fmask.sum())
    if mode == "sequence":
        tokens_per_seq = fmask.sum(dim=1)
        seq_means = _safe_divide(masked.sum(dim=1), tokens_per_seq)
        non_empty = (tokens_per_seq != 0).to(seq_means.dtype)
        return _safe_divide((seq_means * non_empty).sum(), non_empty.sum())
    if mode == "fixed":
        if max_tokens is None:
            raise ValueError("aggregate_loss(mode='fixed') requires max_tokens")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        return masked.sum() / (per_token.shape[0] * max_tokens)
    raise ValueError(
        f"Unknown aggregation mode {mode!r}; valid modes: {', '.join(map(repr, AGGREGATION_MODES))}"
    )


def policy_gradient_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
    aggregation: str = "token",
    max_tokens: int | None = None,
) -> tuple[Tensor, dict]:
    """(Clipped) policy-gradient loss.

    ``logprobs``/``old_logprobs``/``mask``: ``[B, T]``; ``advantages``: ``[B]`` (broadcast over tokens).

    * No clipping (``clip_eps_low is None``): ``ratio = exp(logprobs - old_logprobs)`` if
      ``old_logprobs`` is given (importance weight, unclipped), else ``exp(logprobs - logprobs.detach())``
      (value 1, gradient ``grad logprobs``; plain REINFORCE). Per-token loss ``-A * ratio``.
    * Clipping: ``ratio = exp(logprobs - old_logprobs)`` (``old_logprobs`` defaults to
      ``logprobs.detach()``), per-token loss ``-min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)``;
      ``clip_eps_high`` defaults to ``clip_eps_low`` (asymmetric "clip-higher" when set). Setting only
      ``clip_eps_high`` is an error.

    Returns ``(loss, stats)``; ``stats`` holds detached scalar tensors:
    ``clip_fraction`` (fraction of unmasked tokens where the clipped branch is active, i.e. strictly
    smaller than the unclipped one: ``ratio < 1 - eps_low`` with ``A < 0`` or ``ratio > 1 + eps_high``
    with ``A > 0``; 0.0 when clipping is off), ``clip_low_fraction``, ``clip_high_fraction`` (the two
    parts) and ``ratio_mean`` (masked mean of the ratio).
    """
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must match")
    if old_logprobs is not None and old_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"old_logprobs {tuple(old_logprobs.shape)} must match logprobs {tuple(logprobs.shape)}"
        )
    if advantages.ndim != 1 or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"advantages must have shape [B]={logprobs.shape[0]}, got {tuple(advantages.shape)}")
    if clip_eps_low is None and clip_eps_high is not None:
        raise ValueError("clip_eps_high was given without clip_eps_low")

    adv = advantages.to(logprobs.dtype).unsqueeze(-1)  # [B, 1]
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    ratio = torch.exp(logprobs - old_logprobs.to(logprobs.dtype))

    zero = logprobs.new_zeros(())
    if clip_eps_low is None:
        per_token = -adv * ratio
        clip_low = clip_high = zero
    else:
        eps_low = float(clip_eps_low)
        eps_high = float(clip_eps_low if clip_eps_high is None else clip_eps_high)
        if eps_low < 0 or eps_high < 0:
            raise ValueError(f"clip epsilons must be non-negative, got low={eps_low}, high={eps_high}")
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
        per_token = -torch.minimum(unclipped, clipped)
        with torch.no_grad():
            low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(logprobs.dtype)
            high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(logprobs.dtype)
            clip_low = masked_mean(low, mask)
            clip_high = masked_mean(high, mask)

    loss = aggregate_loss(per_token, mask, mode=aggregation, max_tokens=max_tokens)
    with torch.no_grad():
        stats = {
            "clip_fraction": (clip_low + clip_high).detach(),
            "clip_low_fraction": clip_low.detach(),
            "clip_high_fraction": clip_high.detach(),
            "ratio_mean": masked_mean(ratio.detach(), mask),
        }
    return loss, stats


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from sampled-token log-probs (Schulman's estimators).

    * ``"k1"``: ``logp - ref``
    * ``"k2"``: ``0.5 * (logp - ref) ** 2``
    * ``"k3"``: ``exp(ref - logp) - (ref - logp) - 1`` (non-negative, unbiased; used by GRPO)
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if estimator == "k3":
        delta = ref_logprobs - logprobs
        return torch.exp(delta) - delta - 1.0
    raise ValueError(
        f"Unknown KL estimator {estimator!r}; valid names: {', '.join(map(repr, KL_ESTIMATORS))}"
    )


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, dict]:
    """Sigmoid DPO loss on ``[B]`` sequence log-prob sums.

    ``loss = mean(-logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))))``. Stats (detached scalars):
    ``reward_chosen`` = mean ``beta * (pi_c - ref_c)``, ``reward_rejected`` = mean ``beta * (pi_r - ref_r)``,
    ``margin`` = mean of ``reward_chosen - reward_rejected``, ``accuracy`` = fraction of pairs with
    chosen reward strictly greater than rejected reward.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    logits = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        stats = {
            "reward_chosen": chosen_rewards.detach().mean(),
            "reward_rejected": rejected_rewards.detach().mean(),
            "margin": logits.detach().mean(),
            "accuracy": (chosen_rewards > rejected_rewards).to(logits.dtype).mean(),
        }
    return loss, stats


def nll_loss(
    logprobs: Tensor,
    mask: Tensor,
    aggregation: str = "token",
    max_tokens: int | None = None,
) -> Tensor:
    """Negative log-likelihood of the masked tokens: ``aggregate_loss(-logprobs, mask, aggregation)``."""
    return aggregate_loss(-logprobs, mask, mode=aggregation, max_tokens=max_tokens)
