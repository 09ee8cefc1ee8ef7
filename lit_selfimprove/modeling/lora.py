"""LoRA through peft: checking ``lora:`` settings, wrapping a model, its adapters-disabled reference,
adapter snapshots, and merging the adapters into plain Hugging Face weights.

A ``lora`` setting is a dict of ``peft.LoraConfig`` kwargs; :func:`check_lora` rejects at start-up
what this library cannot run correctly (:data:`LORA_UNSUPPORTED`), and everything that reads or
writes weights (snapshots, promotion, saves, vLLM weight sync) goes through the functions here so
that a LoRA model and a fully fine-tuned one are handled alike.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_selfimprove.assets import resolve


def is_peft(model) -> bool:
    """Whether ``model`` is a peft model (LoRA adapters over a frozen base)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


# peft.LoraConfig settings this library cannot run correctly, with why and what to use instead: they
# train or rewrite weights outside the LoRA A / B matrices, so disabling the adapters does not give
# the initial model back (the KL / DPO reference would move with training) or the merged save
# (:func:`merged_state_dict`) would not compute what the trained model does.
LORA_UNSUPPORTED = {
    "bias": (
        lambda v: v in (None, "none"),
        "trains the base model's own biases: they stay on when the adapters are disabled, so the KL / DPO "
        "reference (the model with its adapters disabled) would move with training; use bias: none, or "
        "fine-tune fully (lora: null) to train the biases",
    ),
    "modules_to_save": (
        lambda v: not v,
        "trains full copies of those modules, which neither the adapters-disabled reference nor the "
        "merged save (it writes the untrained originals) take into account; put LoRA on them instead "
        "(add them to target_modules), or fine-tune fully (lora: null)",
    ),
    "trainable_token_indices": (
        lambda v: not v,
        "trains embedding rows outside the adapters, which the merged save does not write; "
        "fine-tune fully (lora: null) to train the embeddings",
    ),
    "lora_bias": (
        lambda v: not v,
        "adds a bias to LoRA's B matrices, which the merge into the base weights does not fold in; "
        "use lora_bias: false",
    ),
    "use_dora": (
        lambda v: not v,
        "adds DoRA magnitude vectors, which the merge into the base weights does not fold in (a promoted "
        "or saved model would differ from the trained one); use plain LoRA (use_dora: false)",
    ),
    "task_type": (
        lambda v: v in (None, "CAUSAL_LM"),
        "sets another task than the causal LM every model here is; leave task_type out (it is CAUSAL_LM)",
    ),
}


def check_lora(
    lora: dict[str, Any] | None,
    ref_quantization=None,
    what: str = "lora",
    model: str | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Fail at start-up, not after minutes of loading, for LoRA settings that cannot run: not a dict
    of ``peft.LoraConfig`` kwargs, a key ``LoraConfig`` does not have (a typo: ``ValueError`` with
    the closest key), a value peft rejects, a setting listed in :data:`LORA_UNSUPPORTED`, peft
    missing (``ImportError``), a quantized reference next to LoRA (``ValueError``: with LoRA the
    reference is the base model with the adapters disabled, no second model is loaded), or, given
    the ``model`` name or path, ``target_modules`` that name no module of it (checked on its
    config alone: :func:`check_lora_targets`)."""
    if not lora:
        return
    if not isinstance(lora, dict):
        raise ValueError(
            f"{what} must be a dict of peft.LoraConfig kwargs or None, got {type(lora).__name__}"
        )
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ImportError(f"{what} needs peft: pip install 'lit-selfimprove[gpu]' (or pip install peft)")
    if ref_quantization:
        raise ValueError(
            f"{what} and ref_quantization cannot be combined: with LoRA the reference is the same model "
            "with its adapters disabled (no second copy to quantize)"
        )
    _check_lora_keys(lora, what)
    for key, (ok, why) in LORA_UNSUPPORTED.items():
        if key in lora and not ok(lora[key]):
            raise ValueError(f"{what}: {key}={lora[key]!r} is not supported: it {why}")
    lora_config(lora, what)  # the values peft itself checks (e.g. r > 0, a valid init)
    if model is not None:
        check_lora_targets(lora, model, what, trust_remote_code)


def _check_lora_keys(lora: dict[str, Any], what: str) -> None:
    import dataclasses
    import difflib

    from peft import LoraConfig

    fields = sorted(f.name for f in dataclasses.fields(LoraConfig) if f.init)
    for key in lora:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"{what}: unknown peft.LoraConfig key {key!r}; {hint}the keys are {', '.join(fields)}"
            )


def lora_config(lora: dict[str, Any], what: str = "lora"):
    """The ``peft.LoraConfig`` of ``lora`` kwargs for a causal LM; peft's own errors name ``what``."""
    from peft import LoraConfig

    try:
        return LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: peft.LoraConfig rejects {lora}: {err}") from err


def wrap_with_lora(model: torch.nn.Module, lora: dict[str, Any]) -> torch.nn.Module:
    """``model`` with LoRA adapters of ``lora`` (``peft.LoraConfig`` kwargs) over its frozen weights."""
    try:
        from peft import get_peft_model
    except ImportError as err:
        raise ImportError("lora needs peft: pip install peft") from err
    return get_peft_model(model, lora_config(lora))


def check_lora_targets(
    lora: dict[str, Any], name_or_path: str, what: str = "lora", trust_remote_code: bool = False
) -> None:
    """Check ``lora``'s ``target_modules`` against the modules of ``name_or_path`` without loading its
    weights: the model is built from its config on the meta device (no memory, milliseconds for a
    3B model), every entry of a target list must name at least one module (peft itself only fails
    when none does), and peft then wraps that empty model. A config that cannot be read here (e.g. a
    hub id offline) is left to the model's load, which reports it. The global RNG is left as it was."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_selfimprove.assets import resolve_model

    try:
        config = AutoConfig.from_pretrained(
            resolve(resolve_model(name_or_path)), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError):
        return
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # a check leaves the seeded RNG alone
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    targets = lora.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        names = [n for n, _ in model.named_modules() if n]
        missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
            raise ValueError(
                f"{what}: target_modules {missing} name no module of {name_or_path!r}; its module names "
                f"are {', '.join(leaves)} (or use target_modules: all-linear)"
            )
    from peft import get_peft_model

    try:
        with torch.random.fork_rng(devices=[]):
            get_peft_model(model, lora_config(lora, what))
    except ValueError as err:  # e.g. a regex that matches nothing, an unsupported module type
        raise ValueError(f"{what}: {err} (model {name_or_path!r})") from err


class AdapterDisabledReference:
    """The frozen KL / DPO reference of a peft (LoRA) model at no memory cost: the same model run with
    its adapters disabled (``disable_adapter()``), under ``torch.no_grad()`` and in eval mode (the
    model's mode is restored after each call). Callers use it like a frozen model:
    ``ref(input_ids=..., attention_mask=...)``; ``eval`` / ``train`` / ``to`` / ``requires_grad_``
    are no-ops (the wrapped model belongs to its module, which places and trains it)."""

    training = False

    def __init__(self, model: torch.nn.Module):
        if not is_peft(model):
            raise TypeError("AdapterDisabledReference needs a peft model (LoRA adapters)")
        self.model = model

    def forward(self, *args, **kwargs):
        model, was_training = self.model, self.model.training
        model.eval()
        try:
            with torch.no_grad(), model.disable_adapter():
                return model(*args, **kwargs)
        finally:
            model.train(was_training)

    __call__ = forward

    def get_base_model(self) -> torch.nn.Module:
        return self.model.get_base_model()

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def requires_grad_(self, requires_grad: bool = True):
        return self

    def to(self, *args, **kwargs):
        return self


def lora_layers(model: torch.nn.Module):
    """``(name, layer)`` of the LoRA layers of a peft model (names relative to its base model)."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]


def adapter_state(
    model: torch.nn.Module, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """A copy of what training changes: the trainable parameters of a peft model (its adapters),
    else the full ``state_dict`` (``device``: where the copy lives; ``None``: where the weights are)."""
    if is_peft(model):
        items = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    else:
        items = list(model.state_dict().items())
    return {n: t.detach().to(device, copy=True) if device else t.detach().clone() for n, t in items}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an :func:`adapter_state` back in place (a peft model: only its adapters; other keys are
    an error)."""
    if not is_peft(model):
        model.load_state_dict(state)
        return
    params = dict(model.named_parameters())
    unknown = [n for n in state if n not in params]
    if unknown:
        raise KeyError(f"not parameters of the model: {unknown[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def merge_adapters_into_base(model: torch.nn.Module) -> None:
    """Fold the LoRA adapters of a peft model into its base weights in place and zero the adapters'
    ``B`` matrices: the model computes the same function (up to rounding), its adapters now add
    nothing, so the adapters-disabled reference is the merged model and training goes on from it."""
    for _, layer in lora_layers(model):
        for name in list(layer.lora_A):
            if getattr(layer, "use_dora", {}).get(name):
                raise ValueError("merging a DoRA adapter into the base is not supported")
            with torch.no_grad():
                base = layer.get_base_layer()
                base.weight += layer.get_delta_weight(name).to(base.weight.dtype)
                layer.lora_B[name].weight.zero_()


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain transformers ``state_dict`` of a peft model with its adapters merged (base weight +
    delta of every LoRA layer, peft's wrapper names removed): what ``save_pretrained`` of the base
    model writes as a folder that ``AutoModelForCausalLM`` loads without peft. Unchanged weights are
    shared, not copied."""
    base = model.get_base_model()
    state = {
        n.replace(".base_layer.", "."): t
        for n, t in base.state_dict().items()
        if ".lora_" not in n and "modules_to_save" not in n
    }
    for prefix, layer in lora_layers(model):
        if layer.merged:
            continue
        key = f"{prefix}.weight"
        for name in layer.lora_A:
            if name in layer.active_adapters:
                state[key] = state[key] + layer.get_delta_weight(name).to(state[key].dtype)
    return state


def save_pretrained_merged(model: torch.nn.Module, folder, state_dict: dict | None = None) -> None:
    """``save_pretrained`` of a model as a plain Hugging Face folder; a peft model with its adapters
    merged into the weights (:func:`merged_state_dict`), so the folder loads without peft."""
    if is_peft(model):
        model.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(model))
    else:
        model.save_pretrained(folder, state_dict=state_dict)
