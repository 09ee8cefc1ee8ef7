"""Dtypes, and the rule that trained weights stay float32.

Every other file of :mod:`lit_selfimprove.modeling` reads a ``dtype`` argument through
:func:`parse_dtype`; the half-precision check (:func:`warn_if_half_trainable`) is what modules run
after setup, because an optimizer step on bfloat16 / float16 weights loses most small updates.
"""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


HALF_DTYPES = (torch.bfloat16, torch.float16)


def is_half(dtype: str | torch.dtype | None) -> bool:
    """Whether ``dtype`` names bfloat16 or float16."""
    return parse_dtype(dtype) in HALF_DTYPES


def half_trainable_parameters(*models: torch.nn.Module | None) -> int:
    """Number of trainable parameters stored in bfloat16 / float16 (0 is the only safe answer)."""
    return sum(
        p.numel()
        for m in models
        if m is not None
        for p in m.parameters()
        if p.requires_grad and p.dtype in HALF_DTYPES
    )


HALF_TRAINING_WARNING = (
    "{what}: {count:,} trainable parameters are stored in {dtype}: optimizer steps on half-precision "
    "weights lose the updates smaller than half the weights' spacing (at lr 1e-5 most AdamW updates "
    "of bfloat16 weights round to nothing, and norm weights near 1.0 never move). Keep float32 "
    "master weights: use `precision: bf16-mixed` (or `32-true` with FSDP2, whose MixedPrecisionPolicy "
    "computes in the module's dtype) instead of `bf16-true` / `16-true`."
)


def warn_if_half_trainable(what: str, *models: torch.nn.Module | None) -> bool:
    """Warn (once per call) when a trained model holds half-precision weights; returns whether it did."""
    count = half_trainable_parameters(*models)
    if not count:
        return False
    import warnings

    dtype = next(p.dtype for m in models if m is not None for p in m.parameters() if p.dtype in HALF_DTYPES)
    warnings.warn(
        HALF_TRAINING_WARNING.format(what=what, count=count, dtype=dtype), UserWarning, stacklevel=2
    )
    return True
