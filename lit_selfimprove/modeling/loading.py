"""The one place where models and tokenizers are loaded.

Every module takes any Hugging Face causal LM by hub id or local folder (the bundled tiny models are
``builtin:tiny-student`` / ``builtin:tiny-teacher``; ``gguf:SPEC`` is converted once,
:mod:`lit_selfimprove.gguf`) and loads it here: dtype, ``attn_implementation`` (``sdpa``, ``eager``,
``flash_attention_2``), bitsandbytes quantization and LoRA adapters all go through
:func:`load_causal_lm`. A model that will be trained comes from :func:`load_trained_model` (float32
master weights, its frozen KL / DPO reference, FSDP2 sharding); the frozen references themselves
(:func:`frozen_copy`, :func:`load_frozen`, :func:`quantized_copy`) and the dropout-free loss
forward (:func:`dropout_disabled`) are here too.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from lit_selfimprove.assets import resolve
from lit_selfimprove.modeling.lora import AdapterDisabledReference, wrap_with_lora
from lit_selfimprove.modeling.precision import is_half, parse_dtype
from lit_selfimprove.modeling.quantization import bnb_config
from lit_selfimprove.modeling.sharding import shard_model


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
    quantization: str | dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    device_map: str | dict | None = None,
) -> torch.nn.Module:
    """Load a causal LM from a hub id or a local folder.

    Args:
        name_or_path: hub id, local folder, or ``builtin:NAME`` for a bundled tiny model.
        dtype: ``float32`` (use it on CPU), ``bfloat16``, ``float16`` or ``auto``.
        attn_implementation: passed to ``from_pretrained``; ``None``: transformers' default
            (``sdpa``). ``flash_attention_2`` needs the ``flash-attn`` extra and a CUDA device
            (checked first: :func:`check_attn_implementation`).
        quantization: ``"4bit"``, ``"8bit"`` (LLM.int8()) or kwargs of
            ``transformers.BitsAndBytesConfig`` (e.g. ``{"load_in_4bit": true}``), see
            :func:`~lit_selfimprove.modeling.quantization.bnb_config_kwargs`; needs bitsandbytes
            (``gpu`` or ``dev`` extra; runs on CPU too).
        lora: kwargs of ``peft.LoraConfig`` (e.g. ``{"r": 16, "target_modules": "all-linear"}``);
            needs ``peft``; modules check them when constructed
            (:func:`~lit_selfimprove.modeling.lora.check_lora`).
        device_map: passed to ``from_pretrained`` (e.g. ``{"": "cuda:1"}``: a quantized model is
            quantized where it is placed and cannot always be moved afterwards).
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
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(resolve(name_or_path), **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        model = wrap_with_lora(model, lora)
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


def load_frozen(
    name_or_path: str,
    dtype: str | torch.dtype | None = "float32",
    attn_implementation: str | None = None,
    quantization: str | dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """A frozen eval-mode model loaded from ``name_or_path`` (a quantized KL / DPO reference).

    ``quantization`` (``"4bit"``, ``"8bit"`` or ``BitsAndBytesConfig`` kwargs) quantizes the linear
    layers as they load, on ``device`` (``None``: the CPU); embeddings, norms and the LM head stay
    in ``dtype``.
    """
    device_map = {"": str(device or "cpu")} if quantization else None
    ref = load_causal_lm(
        name_or_path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        quantization=quantization,
        device_map=device_map,
    )
    ref.eval()
    ref.requires_grad_(False)
    if not quantization and device is not None:
        ref.to(device)
    return ref


def quantized_copy(
    model: torch.nn.Module,
    quantization: str | dict[str, Any],
    dtype: str | torch.dtype | None = "float32",
    device: torch.device | str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """A frozen, bitsandbytes-quantized copy of an in-memory model (or of ``state_dict`` in its
    architecture): written with ``save_pretrained`` to a temporary folder (deleted on return) and
    loaded back with :func:`load_frozen`. bitsandbytes quantizes weights as they load, so a copy of
    trained weights goes through a folder; it costs one write and read of the float weights."""
    import tempfile

    if hasattr(model, "peft_config"):
        raise ValueError(
            "quantized_copy takes a plain transformers model, not a peft one: with LoRA the reference "
            "is the base model with the adapters disabled"
        )
    with tempfile.TemporaryDirectory(prefix="lit-selfimprove-ref-") as folder:
        model.save_pretrained(folder, state_dict=state_dict)
        return load_frozen(
            folder,
            dtype=dtype,
            attn_implementation=getattr(model.config, "_attn_implementation", None),
            quantization=quantization,
            device=device,
        )


def load_trained_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = "float32",
    attn_implementation: str | None = None,
    quantization: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    reference: bool = False,
    device_mesh=None,
    ref_quantization: str | dict[str, Any] | None = None,
    ref_device: torch.device | str | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """A model that an optimizer will train, with its optional frozen reference: ``(model, ref)``.

    The trained model always holds float32 master weights, whatever ``dtype`` says: an AdamW step
    of ~1e-5 is below half the bfloat16 spacing for weights larger than ~0.0025, so on bfloat16
    weights most updates round away. ``dtype`` is the *compute* dtype: under FSDP2
    (``device_mesh``) the shards stay float32 and ``fully_shard`` computes in ``dtype`` with
    float32 gradient reduction (``MixedPrecisionPolicy``); elsewhere use the Trainer's
    ``precision: bf16-mixed`` (autocast). The frozen reference (``reference=True``: KL / DPO) is
    stored in ``dtype``: a copy of the loaded model, or with ``ref_quantization`` (``"4bit"``,
    ``"8bit"``, ``BitsAndBytesConfig`` kwargs) the same weights loaded again from ``name_or_path``,
    quantized on ``ref_device`` (bitsandbytes quantizes as weights load). A quantized reference is
    not sharded under FSDP2: every rank holds it whole. With ``lora`` (``peft.LoraConfig`` kwargs) only
    the adapters train and the reference is the same model with its adapters disabled
    (:class:`AdapterDisabledReference`): no second copy.
    """
    model = load_causal_lm(
        name_or_path,
        dtype="float32",
        attn_implementation=attn_implementation,
        quantization=quantization,
        lora=lora,
    )
    model.train()  # from_pretrained returns eval mode
    ref = None
    if reference and lora:  # the same model with its adapters disabled: no second copy
        ref = AdapterDisabledReference(model)
    elif reference and ref_quantization:
        ref = load_frozen(name_or_path, dtype, attn_implementation, ref_quantization, ref_device)
    elif reference:
        ref = frozen_copy(model, dtype)
    if device_mesh is not None:  # ModelParallelStrategy: FSDP2
        compute = parse_dtype(dtype) if is_half(dtype) else None
        shard_model(model, device_mesh, param_dtype=compute)
        if ref is not None and not ref_quantization and not lora:
            shard_model(ref, device_mesh)
    return model, ref


# float attributes through which transformers' attention / MLP code applies dropout functionally
# (``dropout=self.attention_dropout if self.training else 0.0``), next to its nn.Dropout modules
DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "hidden_dropout", "activation_dropout", "dropout")


@contextmanager
def dropout_disabled(model: torch.nn.Module):
    """Run ``model`` without dropout but in its own mode: every dropout module (peft's ``lora_dropout``
    included) gets ``p = 0`` and every float dropout rate of :data:`DROPOUT_ATTRIBUTES` is 0.0;
    both are restored on exit.

    Why: the RL and DPO losses compare the policy's log-probs with those of the sampler and of the
    reference, which run in eval mode (no dropout); with dropout in the loss forward the ratio is
    noise at step 0 and the KL is not 0 (as TRL's ``disable_dropout``). Unlike ``model.eval()`` the
    model stays in train mode, so what depends on it (gradient checkpointing) keeps working; run the
    backward inside too, as gradient checkpointing reruns the forward then."""
    from torch.nn.modules.dropout import _DropoutNd  # nn.Dropout, Dropout1d/2d/3d, AlphaDropout

    saved: list[tuple[torch.nn.Module, str, float]] = []
    for module in model.modules():
        if isinstance(module, _DropoutNd):
            saved.append((module, "p", module.p))
            continue
        for name in DROPOUT_ATTRIBUTES:
            value = module.__dict__.get(name)
            if isinstance(value, float) and value > 0:
                saved.append((module, name, value))
    try:
        for module, name, _ in saved:
            setattr(module, name, 0.0)
        yield model
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
