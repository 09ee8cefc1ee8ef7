"""The tensor side of a policy-gradient update: its configuration (:class:`UpdateConfig`), the
units a loss averages over, micro-batch slices and chunked log-probs.

The update itself (backward, clip, step on sampled rollouts, weighted across ranks) is
:func:`lit_selfimprove.loops.policy_update.policy_gradient_update`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_selfimprove.rl.logprobs import sequence_logprobs


@dataclass
class UpdateConfig:
    """How :func:`~lit_selfimprove.loops.policy_update.policy_gradient_update` runs (field names as in
    :class:`~lit_selfimprove.rl.rlvr_config.RLVRConfig`)."""

    loss_aggregation: str = "token"  # token | sequence | fixed (see ``aggregate_loss``)
    max_new_tokens: int | None = None  # the ``fixed`` aggregation's normaliser (the generation budget)
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    ppo_epochs: int = 1  # optimizer steps on the same rollouts
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    micro_batch_size: int | None = None  # rows per forward / backward (``None``: all)
    max_grad_norm: float | None = None  # ``None`` / 0: no clipping
    all_ranks: bool = False  # weigh by the units of all ranks (see loops.policy_update)
    # rows sorted by length into micro-batches, each run without its all-padding columns (less
    # compute when completions end at very different lengths; same loss up to rounding)
    trim_padding: bool = False


def units(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """What ``aggregate_loss(..., aggregation)`` averages over: tokens, non-empty sequences or rows."""
    if aggregation == "token":
        return mask.sum()
    if aggregation == "sequence":
        return (mask.sum(-1) > 0).sum().to(mask.dtype)
    return mask.new_tensor(float(mask.shape[0]))


def micro_batches(rows: int, size: int | None) -> list[slice]:
    """``rows`` cut into slices of ``size`` (``None``: one slice)."""
    size = size or rows
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]


def micro_batch_logprobs(
    model, input_ids, attention_mask, completion_mask, rows: slice, trim: bool = False
) -> torch.Tensor:
    """``sequence_logprobs`` of the ``rows`` of a batch (``[rows, T - 1]``). ``trim``: run the model only on
    the columns where any of those rows has a token (zeros outside; less compute when the rows are of
    similar length and the batch is padded to a longer one)."""
    if not trim:
        return sequence_logprobs(model, input_ids[rows], attention_mask[rows], completion_mask[rows])
    mask = attention_mask[rows]
    cols = mask.any(0).nonzero().squeeze(-1)
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    part = sequence_logprobs(
        model, input_ids[rows, lo:hi], mask[:, lo:hi], completion_mask[rows, lo:hi]
    )  # [rows, hi - lo - 1]: the tokens of columns lo + 1 .. hi - 1
    return torch.nn.functional.pad(part, (lo, input_ids.shape[1] - hi))


def chunked_logprobs(
    model, input_ids, attention_mask, completion_mask, chunks: list[slice], trim: bool = False
) -> torch.Tensor:
    """:func:`micro_batch_logprobs` of ``model`` in eval mode, one micro-batch at a time (mode restored)."""
    model_was_training = model.training
    model.eval()
    out = torch.cat(
        [micro_batch_logprobs(model, input_ids, attention_mask, completion_mask, s, trim) for s in chunks]
    )
    model.train(model_was_training)
    return out
