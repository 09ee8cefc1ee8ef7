"""The one place where models and tokenizers are loaded.

Every module takes any Hugging Face causal LM by hub id or local folder (the bundled tiny
models are ``builtin:tiny-student`` / ``builtin:tiny-teacher``) and loads it here: dtype,
``attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``), bitsandbytes
quantization and LoRA adapters all go through :func:`load_causal_lm`.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_selfimprove.assets import resolve

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


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    """Load a tokenizer with left padding (generation) and a pad token (falls back to EOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name_or_path))
    tok.padding_side = padding_side
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name_or_path: str,
    dtype: str | torch.dtype | None = "float32",
    attn_implementation: str | None = None,
    quantization: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """Load a causal LM from a hub id or a local folder.

    Args:
        name_or_path: hub id, local folder, or ``builtin:NAME`` for a bundled tiny model.
        dtype: ``float32`` (use it on CPU), ``bfloat16``, ``float16`` or ``auto``.
        attn_implementation: passed to ``from_pretrained`` (``flash_attention_2`` needs the
            ``gpu`` extra and a CUDA device).
        quantization: kwargs of ``transformers.BitsAndBytesConfig`` (e.g.
            ``{"load_in_4bit": true}``); needs the ``gpu`` extra.
        lora: kwargs of ``peft.LoraConfig`` (e.g. ``{"r": 16, "target_modules": "all-linear"}``);
            needs ``peft``.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as err:
            raise ImportError("quantization needs bitsandbytes: pip install 'lit-selfimprove[gpu]'") from err
        kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
    model = AutoModelForCausalLM.from_pretrained(resolve(name_or_path), **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise ImportError("lora needs peft: pip install peft") from err
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen eval-mode deep copy (KL reference): never in an optimizer, no grads."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def shard_model(model: torch.nn.Module, device_mesh) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (ModelParallelStrategy)."""
    from torch.distributed.fsdp import fully_shard

    mesh = (
        device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    )
    layers = getattr(getattr(model, "model", model), "layers", None)
    for layer in layers or []:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
