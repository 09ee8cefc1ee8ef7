"""Sampling from a Hugging Face causal LM into a :class:`Rollouts` batch.

A short KV-cached loop instead of ``model.generate``: it has far less per-token overhead on
small models, draws every random number from one ``torch.Generator`` (seeded runs repeat
exactly), and can keep all ranks stepping together (FSDP needs every rank to run the same
number of forward passes).

At paper scale (256 rows x 1,024 new tokens of a 3B model beside its training state) one batch
would not fit a GPU: a call's rows are decoded in micro-batches whose KV cache fits a budget
(``GenerationConfig.max_batch_rows`` / ``max_batch_kv_gb``), and the prefill keeps only the last
position's logits.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from lit_selfimprove.distributed import all_reduce_max, any_rank, initialized
from lit_selfimprove.generation.backend import DEFAULT_MAX_BATCH_KV_GB, backend_of
from lit_selfimprove.generation.llama_decode import LlamaDecoder, _unwrap, compute_dtype
from lit_selfimprove.generation.llama_decode import supports as supports_lean


@dataclass
class Rollouts:
    """Prompts (left-padded) and their sampled completions (right-padded).

    Row ``i`` of the completions belongs to prompt ``i // num_samples`` of the call.
    """

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, C]
    completion_mask: torch.Tensor  # [B, C] 1 for generated tokens, EOS included
    texts: list[str]  # decoded completions, special tokens removed
    finished: torch.Tensor  # [B] bool: ended with EOS (False: cut at max_new_tokens)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, completion_mask)`` of prompt + completion, [B, P + C]."""
        input_ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1)
        completion_mask = torch.cat([torch.zeros_like(self.prompt_mask), self.completion_mask], dim=1)
        return input_ids, attention_mask, completion_mask

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def select(self, rows: list[int]) -> Rollouts:
        """The given rows of this batch."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        return Rollouts(
            self.prompt_ids[idx],
            self.prompt_mask[idx],
            self.completion_ids[idx],
            self.completion_mask[idx],
            [self.texts[i] for i in rows],
            self.finished[idx],
        )

    @staticmethod
    def cat(parts: list[Rollouts], pad_id: int) -> Rollouts:
        """Stack batches: prompts re-left-padded, completions re-right-padded (one part: itself)."""
        if len(parts) == 1:
            return parts[0]
        width_p = max(p.prompt_ids.shape[1] for p in parts)
        width_c = max(p.completion_ids.shape[1] for p in parts)

        def pad(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
            extra = width - t.shape[1]
            return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

        return Rollouts(
            torch.cat([pad(p.prompt_ids, width_p, pad_id, True) for p in parts]),
            torch.cat([pad(p.prompt_mask, width_p, 0, True) for p in parts]),
            torch.cat([pad(p.completion_ids, width_c, pad_id, False) for p in parts]),
            torch.cat([pad(p.completion_mask, width_c, 0, False) for p in parts]),
            [t for p in parts for t in p.texts],
            torch.cat([p.finished for p in parts]),
        )


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.2x names the KV cache argument ``cache``; older ones ``past_key_values``."""
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _last_logits_kwarg(model: torch.nn.Module) -> dict:
    """``{"logits_to_keep": 1}`` where the model's forward takes it (``num_logits_to_keep`` in
    transformers 4.45-4.49), ``{}`` otherwise: the prefill then computes the logits of the last
    prompt position only instead of ``[rows, prompt, vocabulary]`` of them (15 GiB at paper scale)."""
    try:
        params = inspect.signature(_unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _get_cache(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_token_prompts(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenized LEFT-padded prompts, checked and moved to ``device``."""
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty [B, P] tensor, got {tuple(prompt_ids.shape)}")
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError("prompt_mask must have the shape of prompt_ids")
    # left padding: the next token of every row is sampled from the last column
    if not bool((prompt_mask[:, -1] != 0).all()):
        raise ValueError("prompt_ids must be LEFT-padded (every row's last column a real token)")
    return prompt_ids.to(device).long(), prompt_mask.to(device).long()


def _tokenize_prompts(
    tokenizer, prompts: list[str], device: torch.device, max_prompt_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """String prompts tokenized LEFT-padded on ``device``."""
    enc = tokenizer(
        list(prompts),
        return_tensors="pt",
        padding=True,
        padding_side="left",
        truncation=max_prompt_tokens is not None,
        max_length=max_prompt_tokens,
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


class _ForwardDecoder:
    """Decoding through the model's own forward and cache: any causal LM (the fallback of
    :class:`~lit_selfimprove.generation.llama_decode.LlamaDecoder`, same interface)."""

    def __init__(self, model, prompt_ids, prompt_mask, max_new_tokens: int) -> None:
        self.model = model
        self.mask = prompt_mask
        self.positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        self.cache_arg = _cache_kwarg(model)
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=self.positions,
            use_cache=True,
            **_last_logits_kwarg(model),
        )
        self.cache, self.logits = _get_cache(out), out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions[:, -1:] + 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions,
            use_cache=True,
            **{self.cache_arg: self.cache},
        )
        self.cache = _get_cache(out)
        return out.logits[:, -1]


def _decode(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    eos: torch.Tensor,
    pad_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    sync_ranks: bool,
    lean: bool,
    dummy: bool = False,
    group: int = 1,
    compact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KV-cached sampling loop: ``(completion_ids, completion_mask, finished)`` for the prompt rows.

    Rows that hit EOS are padded with ``pad_id`` (mask 0) while the others go on; with ``sync_ranks`` the
    loop runs until every rank is done. ``dummy``: the rows count as done from the start and draw no
    random numbers (a rank with fewer micro-batches than another runs these to keep stepping with it).

    Lean decoder only: ``group`` > 1 says the rows come in runs of ``group`` copies of one prompt,
    prefilled once per run (their caches repeated); ``compact`` drops finished rows from the decode
    batch (sampling then draws random numbers for the unfinished rows only: a seeded call repeats, but
    its samples differ from the uncompacted loop's; greedy tokens equal them up to rounding).
    """
    rows = prompt_ids.shape[0]
    if lean and group > 1:
        dec = LlamaDecoder(model, prompt_ids[::group], prompt_mask[::group], max_new_tokens, repeats=group)
    else:
        dec = (LlamaDecoder if lean else _ForwardDecoder)(model, prompt_ids, prompt_mask, max_new_tokens)
    compact = compact and lean
    logits = dec.logits
    done = torch.full((rows,), dummy, dtype=torch.bool, device=logits.device)
    active = torch.arange(rows, device=logits.device)  # rows in the decode batch (all unless compact)
    tokens, alive = [], []
    for step in range(max_new_tokens):
        if dummy:
            sampled = torch.full_like(active, pad_id)
        else:
            sampled = _sample_next(logits, temperature, top_p, generator)
        alive.append(~done)
        if compact:
            nxt = torch.full_like(done, pad_id, dtype=torch.long)
            nxt[active] = sampled
        else:
            nxt = sampled
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done = done | torch.isin(nxt, eos)
        if step == max_new_tokens - 1:
            break
        local_done = bool(done.all())
        if (sync_ranks and not any_rank(not local_done, logits.device)) or (not sync_ranks and local_done):
            break
        if compact:
            keep = (~done[active]).nonzero().squeeze(-1)
            if len(keep) == 0:  # all done here, other ranks not: one stand-in row keeps stepping
                keep = keep.new_zeros(1)
            if len(keep) < len(active):
                dec.keep(keep)
                active = active[keep]
        logits = dec.step(nxt[active] if compact else nxt)
    return torch.stack(tokens, dim=1), torch.stack(alive, dim=1).long(), done


def kv_bytes_per_token(model: torch.nn.Module, lean: bool) -> int | None:
    """Bytes of KV cache one row takes per position (all layers, keys and values), from the model's
    config; ``None`` when the config does not say (an unknown architecture: no micro-batching).

    The element size is the compute dtype's for the lean decoder (it stores keys and values cast), for
    the model's own cache FSDP2's compute dtype or else the parameters' (whose keys leave the rotary
    embedding in the parameters' dtype, float32 under autocast).
    """
    config = getattr(_unwrap(model), "config", None)
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config

    def first(*names):
        values = [getattr(config, n, None) for n in names]
        return next((v for v in values if isinstance(v, int) and v > 0), None)

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    kv_heads = first("num_key_value_heads", "multi_query_group_num") or heads
    head_dim = first("head_dim") or (first("hidden_size", "n_embd") // heads if heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    param = next(model.parameters())
    dtype = compute_dtype(param.device, param.dtype) if lean else _fsdp_param_dtype(model) or param.dtype
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def _fsdp_param_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype FSDP2 (``fully_shard``) computes a model in (its ``MixedPrecisionPolicy``), if any."""
    get_state = getattr(model, "_get_fsdp_state", None)
    try:
        policy = getattr(get_state(), "_mp_policy", None) if callable(get_state) else None
    except Exception:  # a private API: whatever changes there, the parameters' dtype is the fallback
        return None
    return getattr(policy, "param_dtype", None)


def _split(rows: int, per_batch: int) -> list[tuple[int, int]]:
    """``[start, end)`` of ``ceil(rows / per_batch)`` micro-batches of (nearly) equal size."""
    count = math.ceil(rows / per_batch)
    size = math.ceil(rows / count)
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def _trim_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row of a micro-batch (a shorter cache)."""
    first = int(mask.any(0).long().argmax())
    return ids[:, first:], mask[:, first:]


class BuiltinSampler:
    """The package's own sampler (the default backend): a KV-cached loop over the model itself.

    Every random number comes from the call's ``torch.Generator``, so a seeded run repeats
    exactly; ``sync_ranks`` keeps sharded models' ranks stepping together.

    A call's rows (prompts x samples) are decoded in micro-batches when they would not fit together:
    of ``max_batch_rows`` rows, or (``None``) as many as fit in ``max_batch_kv_gb`` of KV cache. A call
    that fits in one batch samples exactly as before micro-batching existed; one split into several
    draws its random numbers micro-batch after micro-batch (a seeded call still repeats exactly, but
    its rows differ from the one-batch samples). Under ``sync_ranks`` every rank runs as many
    micro-batches as the rank with the most (a sharded model's forward passes are collectives).

    Args:
        lean: decode Llama-architecture models with
            :class:`~lit_selfimprove.generation.llama_decode.LlamaDecoder` (static KV buffers, no
            per-step transformers overhead) where it applies; its logits are bitwise those of the
            model's own forward. ``False``: always the model's forward.
        max_batch_rows: the most rows decoded together (``None``: sized by ``max_batch_kv_gb``).
        max_batch_kv_gb: the KV cache budget of one micro-batch in GiB, when ``max_batch_rows`` is
            ``None``.
        compact_finished: drop rows that ended with EOS from the decode batch (their KV cache rows
            freed), so the remaining steps compute only the unfinished rows. Lean decoder only. Off by
            default: samples then differ from the uncompacted loop's at the same seed (random numbers
            are drawn for the unfinished rows only; a seeded run still repeats exactly).
        shared_prefill: prefill each prompt once for its ``num_samples`` samples and repeat its KV
            cache, instead of prefilling ``num_samples`` identical rows. Lean decoder only. Off by
            default (its logits may round differently from the per-row prefill's).
    """

    # (class defaults too: subclasses need not call __init__)
    lean: bool = True
    max_batch_rows: int | None = None
    max_batch_kv_gb: float = DEFAULT_MAX_BATCH_KV_GB
    compact_finished: bool = False
    shared_prefill: bool = False

    def __init__(
        self,
        lean: bool = True,
        max_batch_rows: int | None = None,
        max_batch_kv_gb: float = DEFAULT_MAX_BATCH_KV_GB,
        compact_finished: bool = False,
        shared_prefill: bool = False,
    ) -> None:
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1 or None, got {max_batch_rows}")
        if not max_batch_kv_gb > 0:
            raise ValueError(f"max_batch_kv_gb must be > 0, got {max_batch_kv_gb}")
        self.lean = lean
        self.max_batch_rows = max_batch_rows
        self.max_batch_kv_gb = max_batch_kv_gb
        self.compact_finished = compact_finished
        self.shared_prefill = shared_prefill

    def rows_per_batch(self, model: torch.nn.Module, rows: int, length: int, lean: bool) -> int:
        """How many of ``rows`` rows of ``length`` positions (prompt + new tokens) to decode together."""
        if self.max_batch_rows is not None:
            return min(rows, self.max_batch_rows)
        per_token = kv_bytes_per_token(model, lean)
        if per_token is None:
            return rows
        return max(1, min(rows, int(self.max_batch_kv_gb * 2**30 // (per_token * length))))

    def sample(self, model, prompt_ids, prompt_mask, num_samples, eos, pad_id, max_new_tokens,
               temperature, top_p, generator, sync_ranks):  # fmt: skip
        prompt_ids = prompt_ids.repeat_interleave(num_samples, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)
        was_training = model.training
        model.eval()
        try:
            lean = self.lean and supports_lean(model)
            rows = prompt_ids.shape[0]
            per_batch = self.rows_per_batch(model, rows, prompt_ids.shape[1] + max_new_tokens, lean)
            spans = _split(rows, per_batch)
            count = len(spans)
            if sync_ranks:  # every rank runs as many micro-batches (and so forward passes) as the most
                count = int(all_reduce_max(torch.tensor([float(count)]), device=prompt_ids.device).item())
            parts = []
            for i in range(count):
                if i < len(spans):
                    start, end = spans[i]
                    ids, mask = prompt_ids[start:end], prompt_mask[start:end]
                    if len(spans) > 1:  # (rows that fit in one batch are decoded exactly as ever)
                        ids, mask = _trim_left_padding(ids, mask)
                    # one prefill per prompt where the micro-batch holds whole groups of samples
                    whole = start % num_samples == 0 and (end - start) % num_samples == 0
                    group = num_samples if self.shared_prefill and whole else 1
                    parts.append(_decode(model, ids, mask, eos, pad_id, max_new_tokens, temperature,
                                         top_p, generator, sync_ranks, lean, group=group,
                                         compact=self.compact_finished))  # fmt: skip
                else:  # this rank is out of rows: a one-row stand-in keeps it stepping with the others
                    _decode(model, prompt_ids[-1:], prompt_mask[-1:], eos, pad_id, max_new_tokens,
                            temperature, top_p, generator, sync_ranks, lean, dummy=True,
                            compact=self.compact_finished)  # fmt: skip
            return _join(parts, pad_id)
        finally:
            if was_training:
                model.train()


def _join(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The micro-batches' ``(completion_ids, completion_mask, finished)`` stacked, completions
    right-padded to the longest."""
    if len(parts) == 1:
        return parts[0]
    width = max(ids.shape[1] for ids, _, _ in parts)
    pad = torch.nn.functional.pad
    return (
        torch.cat([pad(ids, (0, width - ids.shape[1]), value=pad_id) for ids, _, _ in parts]),
        torch.cat([pad(mask, (0, width - mask.shape[1]), value=0) for _, mask, _ in parts]),
        torch.cat([done for _, _, done in parts]),
    )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str] | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    sync_ranks: bool | None = None,
    max_prompt_tokens: int | None = None,
    prompt_ids: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> Rollouts:
    """Sample ``num_samples`` completions per prompt (``temperature=0`` is greedy) with the
    backend attached to ``model`` (:func:`~lit_selfimprove.generation.attach_backend`; default:
    the built-in sampler).

    Prompts are strings (tokenized here) or, instead, already tokenized LEFT-padded
    ``prompt_ids`` / ``prompt_mask`` ``[B, P]`` tensors: a data module that cut documents
    into token windows passes them as they are, since re-tokenizing their decoded text need
    not give the same tokens (``max_prompt_tokens`` does not apply to them).

    Generation stops at EOS. Under torch.distributed, ``sync_ranks`` (default: on when a
    process group is initialised) keeps every rank generating until all ranks are done,
    so sharded models see matching collectives. Uses ``no_grad`` (not inference mode):
    the prompt tensors are later fed to forward passes with gradients.
    """
    if (prompts is None) == (prompt_ids is None):
        raise ValueError("generate() needs either prompts or prompt_ids (not both)")
    if prompts is not None and not prompts:
        raise ValueError("generate() needs at least one prompt")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError("num_samples and max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    if sync_ranks is None:
        sync_ranks = initialized()
    if prompt_ids is not None:
        prompt_ids, prompt_mask = _check_token_prompts(prompt_ids, prompt_mask, device)
    else:
        prompt_ids, prompt_mask = _tokenize_prompts(tokenizer, prompts, device, max_prompt_tokens)
    eos_ids = tokenizer.eos_token_id
    eos = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids), device=device)
    pad_id = tokenizer.pad_token_id

    completion_ids, completion_mask, done = backend_of(model).sample(
        model, prompt_ids, prompt_mask, num_samples, eos, pad_id, max_new_tokens, temperature, top_p,
        generator, sync_ranks,
    )  # fmt: skip
    texts = tokenizer.batch_decode(
        completion_ids.masked_fill(completion_mask == 0, pad_id), skip_special_tokens=True
    )
    return Rollouts(
        prompt_ids.repeat_interleave(num_samples, dim=0),
        prompt_mask.repeat_interleave(num_samples, dim=0),
        completion_ids,
        completion_mask,
        texts,
        done,
    )
