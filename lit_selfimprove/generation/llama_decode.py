"""A lean decode step for Llama-architecture models, used by the built-in sampler.

On small models the per-token cost of ``model(input_ids, cache=...)`` is Python, not arithmetic:
transformers' output capturing, mask construction and a growing ``DynamicCache`` cost more than
the matrix products of a 1M-parameter model. :class:`LlamaDecoder` runs the same operations, in
the same order, on the model's own weights:

- keys and values go into buffers allocated once for the whole completion (no ``torch.cat`` per
  step), and attention reads a view of their first ``t`` positions;
- the decoder layers are plain function calls, and the attention mask of a step is a slice of one
  mask built up front.

LoRA models (peft) take the same path, their adapters applied as peft applies them. The decoder's
logits are bitwise equal to the model's own forward (``tests/test_llama_decode.py`` checks it on
every step, with and without padding, with grouped-query attention, with LoRA), so a seeded run
samples the same tokens either way. :func:`supports` says when it applies: a ``LlamaForCausalLM``
(bare or under peft) with ``sdpa`` attention, unsharded, unquantized linear layers (plain or
vanilla LoRA) and no hooks, under transformers >= 4.55 (older ones return their KV cache as tuples or
a ``DynamicCache`` without ``layers``); everything else samples through the model's forward.

Memory: the prefill keeps only the last position's logits (``logits_to_keep=1``), and the key/value
buffers hold the compute dtype (the autocast dtype under ``torch.autocast``: keys come out of the
rotary embedding in the parameters' float32 there, which attention casts down anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LlamaDecoder", "compute_dtype", "supports"]

_STATIC_ROPE = {"default", "linear", "llama3"}  # inverse frequencies that do not depend on the length
# the first transformers with the cache layout the decoder reads (``cache.layers[i].keys``); 4.46-4.53
# return tuples or a ``DynamicCache`` of lists (tested: 4.55.4 and 5.x decode, 4.46.3 and 4.53.3 do not)
MIN_TRANSFORMERS = "4.55"


def _transformers_supported() -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(MIN_TRANSFORMERS)


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype matrix products on ``device`` run in: the autocast dtype inside ``torch.autocast``,
    ``dtype`` (the tensors' own) otherwise."""
    if dtype.is_floating_point and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft (LoRA) wrapper; ``model`` itself otherwise."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def _plain_linear(module: torch.nn.Module) -> bool:
    return type(module) is torch.nn.Linear


def _lora_linear(module: torch.nn.Module) -> bool:
    """A peft LoRA ``Linear`` whose forward :func:`_linear` reproduces: vanilla LoRA (no DoRA or
    other variant) over a plain linear layer, adapters enabled, one per call, no dropout at
    sampling time (the sampler runs in eval mode)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return False
    if type(module) is not LoraLinear or not _plain_linear(module.base_layer) or module.disable_adapters:
        return False
    if module.merged:
        return True
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
            return False
        a, b = module.lora_A[name], module.lora_B[name]
        if not (_plain_linear(a) and _plain_linear(b)) or a.weight.dtype != module.base_layer.weight.dtype:
            return False
        if not isinstance(module.lora_dropout[name], (torch.nn.Identity, torch.nn.Dropout)):
            return False
    return True


def _linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a plain linear layer or a LoRA one (peft's ``lora.Linear.forward``, op for
    op, in eval mode)."""
    if type(module) is torch.nn.Linear:
        return F.linear(x, module.weight, module.bias)
    base = module.base_layer
    result = F.linear(x, base.weight, base.bias)
    if module.merged:
        return result
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        a, b = module.lora_A[name], module.lora_B[name]
        result = result + F.linear(F.linear(x, a.weight, a.bias), b.weight, b.bias) * module.scaling[name]
    return result


def supports(model: torch.nn.Module) -> bool:
    """Whether :class:`LlamaDecoder` reproduces ``model``'s forward exactly."""
    try:
        from transformers import LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if not _transformers_supported():  # the model's forward serves older transformers
        return False
    wrapper, model = model, _unwrap(model)
    if type(model) is not LlamaForCausalLM:  # subclasses may change the forward
        return False
    if wrapper is not model and type(wrapper).__name__ not in ("PeftModel", "PeftModelForCausalLM"):
        return False
    cfg = model.config
    rope = getattr(model.model.rotary_emb, "rope_type", None)
    if (
        getattr(cfg, "_attn_implementation", None) != "sdpa"
        or cfg.hidden_act != "silu"
        or getattr(cfg, "attention_bias", False)
        or getattr(cfg, "mlp_bias", False)
        or getattr(cfg, "pretraining_tp", 1) != 1
        or rope not in _STATIC_ROPE
        or len(model.model.layers) != cfg.num_hidden_layers
    ):
        return False
    for module in wrapper.modules():
        if module._forward_hooks or module._forward_pre_hooks:  # FSDP, accelerate offload...
            return False
    if type(model.lm_head) is not torch.nn.Linear or model.lm_head.bias is not None:
        return False
    if type(model.model.embed_tokens) is not torch.nn.Embedding or type(model.model.norm) is not LlamaRMSNorm:
        return False
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        )
        if not all(_plain_linear(lin) or _lora_linear(lin) for lin in linears):  # bitsandbytes, DoRA...
            return False
        if (
            type(layer.input_layernorm) is not LlamaRMSNorm
            or type(layer.post_attention_layernorm) is not LlamaRMSNorm
        ):
            return False
    for param in wrapper.parameters():
        if type(param.data) is not torch.Tensor or not param.dtype.is_floating_point:  # DTensor, quantized
            return False
    return True


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    # transformers' LlamaRMSNorm.forward, op for op
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaDecoder:
    """Prefills LEFT-padded prompt rows and then decodes one token per row and call.

    ``LlamaDecoder(model, prompt_ids, prompt_mask, max_new_tokens).logits`` are the next-token
    logits of every row; :meth:`step` feeds one token per row and returns the next logits. The
    batch keeps its shape from start to end, as in the model's own decoding: matrix products on
    CPU round differently for different numbers of rows, so a batch that dropped its finished rows
    (or prefilled a prompt once for its samples) would no longer be bitwise the same. Both are
    options (the built-in sampler's ``compact_finished`` / ``shared_prefill``): ``repeats`` > 1
    prefills each prompt row once and repeats its cache for ``repeats`` consecutive rows, and
    :meth:`keep` drops rows from the batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_new_tokens: int,
        repeats: int = 1,
    ) -> None:
        self.model = model = _unwrap(model)  # (peft's LoRA layers sit inside the transformers model)
        inner = model.model
        self.layers = list(inner.layers)
        self.head_dim = self.layers[0].self_attn.head_dim
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,  # [rows, 1, V]: the prompt's other positions' logits are never read
        )
        cache = out.get("cache") if out.get("cache") is not None else out.past_key_values
        logits = out.logits
        if repeats > 1:  # each prompt row prefilled once and its cache shared by ``repeats`` rows
            prompt_mask = prompt_mask.repeat_interleave(repeats, dim=0)
            positions = positions.repeat_interleave(repeats, dim=0)
            logits = logits.repeat_interleave(repeats, dim=0)
        rows, width = prompt_mask.shape
        length = width + max_new_tokens
        self.keys, self.values = [], []
        for layer in cache.layers:
            k, v = layer.keys, layer.values  # [rows, kv_heads, width, head_dim]
            if repeats > 1:
                k, v = k.repeat_interleave(repeats, dim=0), v.repeat_interleave(repeats, dim=0)
            # float32 keys under autocast would double the largest allocation of the call; attention
            # casts them to the autocast dtype anyway, so storing them cast gives the same logits
            kb = k.new_empty(rows, k.shape[1], length, k.shape[3], dtype=compute_dtype(k.device, k.dtype))
            vb = v.new_empty(rows, v.shape[1], length, v.shape[3], dtype=compute_dtype(v.device, v.dtype))
            kb[:, :, :width] = k
            vb[:, :, :width] = v
            self.keys.append(kb)
            self.values.append(vb)
            layer.keys = layer.values = None  # the prefill cache's copy is freed now, not at the end
        del cache, out
        self.logits = logits[:, -1]
        # transformers passes no mask to sdpa when no row is padded, a boolean one otherwise
        self.padded = not bool(prompt_mask.all())
        full = torch.ones(rows, length, dtype=torch.bool, device=prompt_mask.device)
        full[:, :width] = prompt_mask.bool()
        self.mask = full[:, None, None, :]
        self.positions = positions[:, -1:]  # [B, 1] position of the last token
        self.length = width  # tokens in the cache
        rope = inner.rotary_emb
        self.inv_freq, self.rope_scaling = rope.inv_freq, rope.attention_scaling

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with only ``rows`` (indices into the current batch, in order): their keys, values,
        mask and positions are copied into smaller buffers and the others' freed. Decoding fewer rows
        gives the same tokens up to rounding (matrix products round differently per row count)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.mask = self.mask.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``[B]``; the next-token logits ``[B, V]``."""
        model, inner = self.model, self.model.model
        t = self.length
        self.length += 1
        self.positions = self.positions + 1
        batch = tokens.shape[0]
        h = inner.embed_tokens(tokens[:, None])
        # LlamaRotaryEmbedding.forward, op for op
        freqs = self.positions[..., None].float() * self.inv_freq.to(device=h.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(dtype=h.dtype).unsqueeze(1)
        sin = (emb.sin() * self.rope_scaling).to(dtype=h.dtype).unsqueeze(1)
        mask = self.mask[..., : t + 1] if self.padded else None
        shape = (batch, 1, -1, self.head_dim)
        for layer, kb, vb in zip(self.layers, self.keys, self.values):
            attn, mlp = layer.self_attn, layer.mlp
            residual = h
            x = _rms_norm(h, layer.input_layernorm)
            q = _linear(attn.q_proj, x).view(shape).transpose(1, 2)
            k = _linear(attn.k_proj, x).view(shape).transpose(1, 2)
            v = _linear(attn.v_proj, x).view(shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            kb[:, :, t : t + 1] = k
            vb[:, :, t : t + 1] = v
            a, _ = _sdpa(attn, q, kb[:, :, : t + 1], vb[:, :, : t + 1], mask, scaling=attn.scaling)
            a = a.reshape(batch, 1, -1).contiguous()
            h = residual + _linear(attn.o_proj, a)
            residual = h
            x = _rms_norm(h, layer.post_attention_layernorm)
            h = residual + _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))
        h = _rms_norm(h, inner.norm)
        return F.linear(h, model.lm_head.weight)[:, -1]


def _sdpa(module, q, k, v, mask, scaling):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=scaling)
