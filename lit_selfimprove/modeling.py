"""The one place where models and tokenizers are loaded.

Every module takes any Hugging Face causal LM by hub id or local folder (the bundled tiny
models are ``builtin:tiny-student`` / ``builtin:tiny-teacher``) and loads it here: dtype,
``attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``), bitsandbytes
quantization and LoRA adapters all go through :func:`load_causal_lm`.
"""

from __future__ import annotations

from contextlib import contextmanager
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
            :func:`bnb_config_kwargs`; needs bitsandbytes (``gpu`` or ``dev`` extra; runs on CPU too).
        lora: kwargs of ``peft.LoraConfig`` (e.g. ``{"r": 16, "target_modules": "all-linear"}``);
            needs ``peft``; modules check them when constructed (:func:`check_lora`).
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
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as err:
            raise ImportError("quantization needs bitsandbytes: pip install 'lit-selfimprove[gpu]'") from err
        kwargs["quantization_config"] = BitsAndBytesConfig(**bnb_config_kwargs(quantization, dtype))
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(resolve(name_or_path), **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        try:
            from peft import get_peft_model
        except ImportError as err:
            raise ImportError("lora needs peft: pip install peft") from err
        model = get_peft_model(model, lora_config(lora))
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
    layers = decoder_layers(model)
    if not layers:
        import warnings

        warnings.warn(
            f"shard_model found no decoder layers in {type(model).__name__}: only the root is sharded, so "
            "every forward all-gathers the whole model (no memory saving from FSDP2)",
            UserWarning,
            stacklevel=2,
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a causal LM, each FSDP2's unit of sharding: ``model.model.layers`` of a
    transformers model, looked up under the base model of a peft (LoRA) model (whose ``.model`` is
    the ``*ForCausalLM``, one level above the layers); else the modules of the classes transformers
    lists in ``_no_split_modules`` (e.g. ``GPT2Block``)."""
    base = model.get_base_model() if is_peft(model) else model
    layers = getattr(getattr(base, "model", base), "layers", None)
    if layers is not None:
        return list(layers)
    classes = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in classes]
