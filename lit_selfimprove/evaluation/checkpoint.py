"""The model to evaluate, read from a path: a Hugging Face folder, a hub id, a ``builtin:NAME`` tiny
model, or a Lightning checkpoint of ``SuffixPolicyDPO`` / ``StudentRLVR`` (weights under ``policy.``)
or ``NextTokenLM`` (under ``model.``): a ``.ckpt`` file, or the folder of a distributed (FSDP2)
checkpoint. The architecture comes from the checkpoint's ``model`` hyper-parameter (only its config
is read), the weights from the checkpoint; LoRA adapters are merged into the base weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lit_selfimprove.evaluation.lm_eval_adapter import LMEvalError

MODEL_ATTRIBUTES = ("policy", "model")  # SuffixPolicyDPO / StudentRLVR, NextTokenLM


def is_lightning_checkpoint(path: str | Path) -> bool:
    """A ``.ckpt`` file, or a distributed checkpoint folder (Lightning's ``meta.pt`` + shards)."""
    p = Path(str(path)).expanduser()
    return p.suffix == ".ckpt" or (p.is_dir() and (p / "meta.pt").is_file() and (p / ".metadata").is_file())


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's dict, on the CPU (a folder of shards is gathered into one)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():  # ModelParallelStrategy (FSDP2) writes a folder of shards
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _architecture(hp: dict[str, Any], tokenizer: str | None) -> torch.nn.Module:
    """The checkpoint's model with random weights: from the config of ``hp["model"]`` (nothing but
    the config is read), or ``NextTokenLM``'s ``model_config`` (a Llama trained from scratch)."""
    if hp.get("model"):
        from transformers import AutoConfig, AutoModelForCausalLM

        from lit_selfimprove.assets import resolve_model

        config = AutoConfig.from_pretrained(resolve_model(hp["model"]))
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if hp.get("model_config"):
        from lit_selfimprove.modules.next_token import NextTokenLM

        module = NextTokenLM(model=None, tokenizer=tokenizer, model_config=dict(hp["model_config"]))
        module.configure_model()
        return module.model
    raise LMEvalError("the checkpoint's hyper-parameters name neither `model` nor `model_config`")


def _model_from_checkpoint(path: Path) -> tuple[torch.nn.Module, str | None]:
    """``(model, tokenizer name)`` from a Lightning checkpoint of a module with a ``policy`` or
    ``model`` attribute; LoRA adapters are merged into the base weights."""
    ckpt = _read_checkpoint(path)
    hp = dict(ckpt.get("hyper_parameters") or {})
    state = ckpt.get("state_dict") or {}
    attr = next((a for a in MODEL_ATTRIBUTES if any(k.startswith(a + ".") for k in state)), None)
    if attr is None:
        heads = sorted({k.split(".")[0] for k in state})
        raise LMEvalError(
            f"{path}: no `policy.` or `model.` weights in the checkpoint (found {heads[:6]}): not a "
            "SuffixPolicyDPO / StudentRLVR / NextTokenLM checkpoint"
        )
    if hp.get("quantization"):
        raise LMEvalError(f"{path}: a policy trained with `quantization` cannot be read back here")
    tokenizer = hp.get("tokenizer") or hp.get("model")
    model = _architecture(hp, tokenizer)
    if hp.get("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **dict(hp["lora"])))
    weights = {k[len(attr) + 1 :]: v for k, v in state.items() if k.startswith(attr + ".")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise LMEvalError(
            f"{path}: the `{attr}.` weights do not fit {hp.get('model') or 'model_config'} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if hp.get("lora"):
        model = model.merge_and_unload()
    if tokenizer is None:
        raise LMEvalError(f"{path}: no tokenizer in the checkpoint's hyper-parameters; pass --tokenizer")
    return model, tokenizer


def load_eval_model(
    path: str,
    tokenizer: str | None = None,
    dtype: str = "float32",
    device: str | torch.device | None = None,
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode on ``device`` (default: CUDA when available) from an HF
    folder / hub id / ``builtin:NAME`` or a Lightning checkpoint (see the module docstring)."""
    from lit_selfimprove.modeling import load_causal_lm, load_tokenizer, parse_dtype

    if is_lightning_checkpoint(path):
        model, tok_name = _model_from_checkpoint(Path(str(path)).expanduser())
        torch_dtype = parse_dtype(dtype)
        if isinstance(torch_dtype, torch.dtype):
            model.to(torch_dtype)
    else:
        model, tok_name = load_causal_lm(path, dtype=dtype), path
    tok = load_tokenizer(tokenizer or tok_name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()
    return model, tok
