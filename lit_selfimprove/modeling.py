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

    from lit_selfimprove.assets import resolve_model

    name_or_path = resolve_model(name_or_path)  # a missing local path: FileNotFoundError, not a hub error

    tok = AutoTokenizer.from_pretrained(resolve(name_or_path))
    tok.padding_side = padding_side
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


FLASH_ATTENTION = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def check_attn_implementation(attn_implementation: str | None) -> None:
    """Fail at start-up, not mid-run, when the attention kernel asked for cannot run here.

    ``None`` is transformers' default (``sdpa`` where the architecture has it, else ``eager``).
    ``flash_attention_2`` / ``_3`` need their package (the ``flash-attn`` extra, CUDA only) and a
    CUDA GPU; anything else is checked by ``from_pretrained`` itself.
    """
    package = FLASH_ATTENTION.get(attn_implementation or "")
    if package is None:
        return
    import importlib.util

    missing = []
    if importlib.util.find_spec(package) is None:
        missing.append(
            f"the {package} package (pip install 'lit-selfimprove[flash-attn]', CUDA machines only)"
        )
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if missing:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} needs {' and '.join(missing)}; "
            "use 'sdpa' (the default) on this machine"
        )


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
        attn_implementation: passed to ``from_pretrained``; ``None``: transformers' default
            (``sdpa``). ``flash_attention_2`` needs the ``flash-attn`` extra and a CUDA device
            (checked first: :func:`check_attn_implementation`).
        quantization: kwargs of ``transformers.BitsAndBytesConfig`` (e.g.
            ``{"load_in_4bit": true}``); needs the ``gpu`` extra.
        lora: kwargs of ``peft.LoraConfig`` (e.g. ``{"r": 16, "target_modules": "all-linear"}``);
            needs ``peft``.
    """
    from transformers import AutoModelForCausalLM

    from lit_selfimprove.assets import resolve_model

    name_or_path = resolve_model(name_or_path)  # a missing local path: FileNotFoundError, not a hub error

    check_attn_implementation(attn_implementation)
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


def frozen_copy(model: torch.nn.Module, dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """A frozen eval-mode deep copy (KL reference): never in an optimizer, no grads.

    ``dtype`` (e.g. ``bfloat16``) casts the copy's floating-point weights: a frozen model takes no
    optimizer step, so it may live in half precision.
    """
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    torch_dtype = parse_dtype(dtype)
    if isinstance(torch_dtype, torch.dtype) and torch_dtype != torch.float32:
        ref.to(torch_dtype)
    return ref


HALF_DTYPES = (torch.bfloat16, torch.float16)


def is_half(dtype: str | torch.dtype | None) -> bool:
    """Whether ``dtype`` names bfloat16 or float16."""
    return parse_dtype(dtype) in HALF_DTYPES


def load_trained_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = "float32",
    attn_implementation: str | None = None,
    quantization: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    reference: bool = False,
    device_mesh=None,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """A model that an optimizer will train, with its optional frozen reference: ``(model, ref)``.

    The trained model always holds float32 master weights, whatever ``dtype`` says: an AdamW step
    of ~1e-5 is below half the bfloat16 spacing for weights larger than ~0.0025, so on bfloat16
    weights most updates round away. ``dtype`` is the *compute* dtype: under FSDP2
    (``device_mesh``) the shards stay float32 and ``fully_shard`` computes in ``dtype`` with
    float32 gradient reduction (``MixedPrecisionPolicy``); elsewhere use the Trainer's
    ``precision: bf16-mixed`` (autocast). The frozen reference (``reference=True``: KL / DPO) is
    stored in ``dtype``.
    """
    model = load_causal_lm(
        name_or_path,
        dtype="float32",
        attn_implementation=attn_implementation,
        quantization=quantization,
        lora=lora,
    )
    model.train()  # from_pretrained returns eval mode
    ref = frozen_copy(model, dtype) if reference else None
    if device_mesh is not None:  # ModelParallelStrategy: FSDP2
        compute = parse_dtype(dtype) if is_half(dtype) else None
        shard_model(model, device_mesh, param_dtype=compute)
        if ref is not None:
            shard_model(ref, device_mesh)
    return model, ref


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


def shard_model(
    model: torch.nn.Module, device_mesh, param_dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (ModelParallelStrategy).

    ``param_dtype`` (e.g. ``torch.bfloat16``): compute in that dtype over float32 shards, with
    float32 gradient reduction (``MixedPrecisionPolicy``); ``None`` computes in the shards' dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = (
        device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    )
    kwargs = {}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = getattr(getattr(model, "model", model), "layers", None)
    for layer in layers or []:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model
