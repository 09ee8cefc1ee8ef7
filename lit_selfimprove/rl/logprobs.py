"""Memory-friendly per-token log-probabilities (pure torch, no Lightning)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_position_ids", "selective_log_softmax", "sequence_logprobs"]


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """``torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]`` without a full copy.

    ``logits``: ``[..., V]``; ``index``: ``logits.shape[:-1]`` (integer token ids).

    ``logits.gather(index) - logsumexp(logits)`` over chunks of positions (at most ~64M logits a
    chunk), so no full ``[B, T, V]`` log-softmax is materialised. float32 / float64 keep their
    dtype; bf16 / fp16 chunks are upcast, so the output is **float32** (more accurate ratios /
    KL downstream).
    """
    if index.shape != logits.shape[:-1]:
        raise ValueError(
            f"index shape {tuple(index.shape)} must equal logits.shape[:-1]={tuple(logits.shape[:-1])}"
        )
    if logits.ndim == 1:
        return selective_log_softmax(logits.unsqueeze(0), index.unsqueeze(0)).squeeze(0)
    index = index.long()
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_index = index.reshape(-1)
    # rows per chunk: bounded so a chunk's float32 temporaries stay under ~64M elements
    rows = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    out = []
    for start in range(0, flat_logits.shape[0], rows):
        chunk = flat_logits[start : start + rows]
        if chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.float()
        picked = chunk.gather(-1, flat_index[start : start + rows, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out).reshape(index.shape)


_CHUNK_ELEMENTS = 1 << 26


def compute_position_ids(attention_mask: Tensor) -> Tensor:
    """Position ids for left-padded inputs: ``(attention_mask.cumsum(-1) - 1).clamp(min=0)``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    position_ids: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-token log-probs of ``input_ids[:, 1:]`` under a causal LM, for completion tokens only.

    Runs ``model(input_ids=..., attention_mask=..., position_ids=...)`` (a Hugging Face causal LM; inputs
    may be left-padded; ``position_ids`` default to :func:`compute_position_ids`), scales
    ``logits[:, :-1]`` by ``1 / temperature`` and returns ``[B, T-1]`` log-probs of the next tokens,
    zeroed wherever ``completion_mask[:, 1:]`` is 0. All positions are computed (no assumption that the
    completion starts in the same column for every row).

    ``chunk_size``: if set, the batch is split into row chunks of at most that many rows, each run as a
    separate forward pass (bounds activation/logit memory of a single forward). The autograd graph is
    kept, so a single ``backward()`` by the caller reaches all chunks.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError("input_ids, attention_mask and completion_mask must have the same [B, T] shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if position_ids is None:
        position_ids = compute_position_ids(attention_mask)

    batch_size, seq_len = input_ids.shape
    if batch_size == 0 or seq_len < 2:
        return torch.zeros(batch_size, max(seq_len - 1, 0), device=input_ids.device)
    # Only positions that predict a completion token need logits: with left-padded prompts
    # followed by completions that is a suffix of the sequence, so ask the model for just those
    # (``logits_to_keep``) and skip the LM head over the prompt.
    active = (completion_mask[:, 1:] != 0).any(0).nonzero()
    first = int(active[0]) if len(active) else seq_len - 1
    keep = seq_len - first  # logits of positions first .. T-1; the last one predicts nothing
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    step = batch_size if chunk_size is None else chunk_size
    chunks = []
    for start in range(0, batch_size, step):
        sl = slice(start, start + step)
        ids = input_ids[sl]
        outputs = model(
            input_ids=ids, attention_mask=attention_mask[sl], position_ids=position_ids[sl], **kwargs
        )
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        logits = logits[:, -keep:-1] if keep > 1 else logits[:, :0]
        if temperature != 1.0:
            logits = logits / temperature
        part = selective_log_softmax(logits, ids[:, first + 1 :])
        chunks.append(torch.nn.functional.pad(part, (first, 0)))
        del outputs, logits
    logps = torch.cat(chunks, dim=0)
    keep_mask = completion_mask[:, 1:].to(device=logps.device) != 0
    return torch.where(keep_mask, logps, torch.zeros_like(logps))


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    if hasattr(model, "get_base_model"):  # peft (LoRA) passes extra kwargs on to its base model
        model = model.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
