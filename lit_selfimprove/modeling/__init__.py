"""Models and tokenizers: loading, quantization, LoRA and FSDP2 sharding, one concern per file.

* :mod:`~lit_selfimprove.modeling.loading`: hub id / folder / ``builtin:NAME`` / ``gguf:SPEC`` ->
  Hugging Face causal LM and tokenizer; the trained model with float32 master weights and its
  frozen references; the dropout-free loss forward.
* :mod:`~lit_selfimprove.modeling.precision`: dtype names and the half-precision training check.
* :mod:`~lit_selfimprove.modeling.quantization`: bitsandbytes settings and their config.
* :mod:`~lit_selfimprove.modeling.lora`: peft LoRA settings, adapters, their reference and merge.
* :mod:`~lit_selfimprove.modeling.sharding`: FSDP2 ``fully_shard`` over the decoder layers.

The names below are the package's API: import them from ``lit_selfimprove.modeling``.
"""

from lit_selfimprove.modeling.loading import (
    DROPOUT_ATTRIBUTES,
    FLASH_ATTENTION,
    check_attn_implementation,
    dropout_disabled,
    frozen_copy,
    load_causal_lm,
    load_frozen,
    load_tokenizer,
    load_trained_model,
    quantized_copy,
)
from lit_selfimprove.modeling.lora import (
    LORA_UNSUPPORTED,
    AdapterDisabledReference,
    adapter_state,
    check_lora,
    check_lora_targets,
    is_peft,
    load_adapter_state,
    lora_config,
    lora_layers,
    merge_adapters_into_base,
    merged_state_dict,
    save_pretrained_merged,
    wrap_with_lora,
)
from lit_selfimprove.modeling.precision import (
    HALF_DTYPES,
    HALF_TRAINING_WARNING,
    half_trainable_parameters,
    is_half,
    parse_dtype,
    warn_if_half_trainable,
)
from lit_selfimprove.modeling.quantization import (
    QUANTIZATIONS,
    bnb_config,
    bnb_config_kwargs,
    check_quantization,
)
from lit_selfimprove.modeling.sharding import decoder_layers, shard_model

__all__ = [
    "DROPOUT_ATTRIBUTES",
    "FLASH_ATTENTION",
    "HALF_DTYPES",
    "HALF_TRAINING_WARNING",
    "LORA_UNSUPPORTED",
    "QUANTIZATIONS",
    "AdapterDisabledReference",
    "adapter_state",
    "bnb_config",
    "bnb_config_kwargs",
    "check_attn_implementation",
    "check_lora",
    "check_lora_targets",
    "check_quantization",
    "decoder_layers",
    "dropout_disabled",
    "frozen_copy",
    "half_trainable_parameters",
    "is_half",
    "is_peft",
    "load_adapter_state",
    "load_causal_lm",
    "load_frozen",
    "load_tokenizer",
    "load_trained_model",
    "lora_config",
    "lora_layers",
    "merge_adapters_into_base",
    "merged_state_dict",
    "parse_dtype",
    "quantized_copy",
    "save_pretrained_merged",
    "shard_model",
    "warn_if_half_trainable",
    "wrap_with_lora",
]
