"""bitsandbytes quantization: which ``quantization:`` settings are valid and the
``transformers.BitsAndBytesConfig`` they load with.

A quantization is ``"4bit"``, ``"8bit"`` (LLM.int8()) or a dict of ``BitsAndBytesConfig`` kwargs.
bitsandbytes quantizes weights as they load, so a quantized model is always loaded
(:func:`~lit_selfimprove.modeling.load_causal_lm`); a quantized copy of weights in memory goes
through a folder (:func:`~lit_selfimprove.modeling.quantized_copy`).
"""

from __future__ import annotations

from typing import Any

import torch

from lit_selfimprove.modeling.precision import parse_dtype

QUANTIZATIONS = ("4bit", "8bit")


def check_quantization(quantization: str | dict[str, Any] | None) -> None:
    """Fail at start-up for a quantization that cannot be loaded: an unknown name (``ValueError``
    naming the valid ones) or no bitsandbytes installed (``ImportError``). ``None`` passes."""
    if not quantization:
        return
    if isinstance(quantization, str) and quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {QUANTIZATIONS}, a dict of BitsAndBytesConfig kwargs or None, "
            f"got {quantization!r}"
        )
    if not isinstance(quantization, (str, dict)):
        raise ValueError(f"quantization must be a str, a dict or None, got {type(quantization).__name__}")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("quantization needs bitsandbytes: pip install 'lit-selfimprove[gpu]'")


def bnb_config_kwargs(
    quantization: str | dict[str, Any], dtype: str | torch.dtype | None = "float32"
) -> dict[str, Any]:
    """``transformers.BitsAndBytesConfig`` kwargs of a quantization: ``"4bit"`` is
    ``load_in_4bit`` (bitsandbytes' default FP4 type) computing in ``dtype``, ``"8bit"``
    ``load_in_8bit`` (LLM.int8()); a dict is passed as it is (e.g. QLoRA's
    ``{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}``). On the bundled tiny models FP4 kept
    the log-probs closer than NF4 (mean |delta| per token 0.12 vs 0.35 nats, tests/test_bitsandbytes.py)."""
    check_quantization(quantization)
    if isinstance(quantization, dict):
        return dict(quantization)
    if quantization == "8bit":
        return {"load_in_8bit": True}
    compute = parse_dtype(dtype)
    compute = compute if isinstance(compute, torch.dtype) else torch.float32
    return {"load_in_4bit": True, "bnb_4bit_compute_dtype": compute}


def bnb_config(quantization: str | dict[str, Any], dtype: str | torch.dtype | None = "float32"):
    """The ``transformers.BitsAndBytesConfig`` of a quantization (:func:`bnb_config_kwargs`)."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise ImportError("quantization needs bitsandbytes: pip install 'lit-selfimprove[gpu]'") from err
    return BitsAndBytesConfig(**bnb_config_kwargs(quantization, dtype))
