"""The built-in sampler at paper size: micro-batches, last-position prefill logits, compute-dtype KV."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_selfimprove.generation import (
    BuiltinSampler,
    GenerationConfig,
    attach_backend,
    detach_backend,
    generate,
)
from lit_selfimprove.generation import sampler as sampler_mod
from lit_selfimprove.generation.backend import make_backend
from lit_selfimprove.generation.llama_decode import LlamaDecoder
from lit_selfimprove.generation.sampler import kv_bytes_per_token

PROMPTS = [f"Q: {1234 + i * 97}+{56 + i * 13 * i}\nA: " for i in range(5)]  # different lengths: padding


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
        attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def batches(monkeypatch):
    """The rows of every micro-batch the sampler decodes (the lean and the forward decoder)."""
    rows = []

    class Lean(LlamaDecoder):
        def __init__(self, model, prompt_ids, *args):
            rows.append(prompt_ids.shape[0])
            super().__init__(model, prompt_ids, *args)

    class Forward(sampler_mod._ForwardDecoder):
        def __init__(self, model, prompt_ids, *args):
            rows.append(prompt_ids.shape[0])
            super().__init__(model, prompt_ids, *args)

    monkeypatch.setattr(sampler_mod, "LlamaDecoder", Lean)
    monkeypatch.setattr(sampler_mod, "_ForwardDecoder", Forward)
    return rows


def _generate(model, tok, sampler, prompts, **kw):
    attach_backend(model, sampler)
    try:
        return generate(model, tok, prompts, **kw)
    finally:
        detach_backend(model)


@pytest.mark.parametrize("lean", [True, False])
def test_micro_batches_give_each_row_its_own_greedy_completion(lean, student, tok, batches):
    ro = _generate(student, tok, BuiltinSampler(lean=lean, max_batch_rows=3), PROMPTS, num_samples=2,
                   max_new_tokens=12, temperature=0.0)  # fmt: skip
    assert batches == [3, 3, 3, 1]  # 10 rows in micro-batches of at most 3
    assert len(ro) == 10 and ro.completion_ids.shape == ro.completion_mask.shape == (10, 12)
    assert ro.prompt_ids.shape[0] == 10 and ro.finished.shape == (10,)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(student, tok, [prompt], max_new_tokens=12, temperature=0.0)
        n = int(alone.completion_mask.sum())
        for row in (2 * i, 2 * i + 1):
            assert ro.texts[row] == alone.texts[0]
            assert ro.completion_ids[row, :n].tolist() == alone.completion_ids[0, :n].tolist()
            assert int(ro.completion_mask[row].sum()) == n and bool(ro.finished[row]) == bool(
                alone.finished[0]
            )
            assert (ro.completion_ids[row, n:] == tok.pad_token_id).all()  # right-padded to the longest


def test_micro_batched_seeded_sampling_repeats(student, tok, batches):
    def sample(seed):
        return _generate(student, tok, BuiltinSampler(max_batch_rows=4), PROMPTS[:3], num_samples=3,
                         max_new_tokens=10, generator=torch.Generator().manual_seed(seed))  # fmt: skip

    a, b, c = sample(7), sample(7), sample(8)
    assert batches == [3, 3, 3] * 3  # 9 rows: three micro-batches of 3, not 4 + 4 + 1
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert torch.equal(a.completion_mask, b.completion_mask) and torch.equal(a.finished, b.finished)
    assert a.texts != c.texts


def test_the_kv_budget_sizes_the_micro_batches(student, tok, batches):
    cfg = student.config
    per_token = (
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    )
    assert kv_bytes_per_token(student, lean=True) == per_token == 4096  # float32, 4 layers x 4 heads x 32
    sampler = BuiltinSampler()
    assert sampler.rows_per_batch(student, rows=256, length=1324, lean=True) == 256  # tiny: one batch
    length = 10 + 20
    budget = BuiltinSampler(max_batch_kv_gb=4 * per_token * length / 2**30)  # room for 4 rows of 30
    assert budget.rows_per_batch(student, rows=10, length=length, lean=True) == 4
    assert budget.rows_per_batch(student, rows=10, length=length + 1, lean=True) == 3
    assert BuiltinSampler(max_batch_kv_gb=1e-9).rows_per_batch(student, 10, 30, True) == 1  # at least one
    # from the config: make_backend hands the settings to the sampler
    made = make_backend(GenerationConfig(max_batch_rows=5, max_batch_kv_gb=2.0))
    assert (made.max_batch_rows, made.max_batch_kv_gb) == (5, 2.0)
    ro = _generate(student, tok, budget, PROMPTS, num_samples=2, max_new_tokens=20, temperature=0.0)
    assert len(ro) == 10 and max(batches) <= 4


def test_calls_that_fit_keep_one_batch(student, tok, batches):
    """The default budget leaves the tiny models' calls (dozens of rows) in one batch: their samples
    are those of the sampler before micro-batching existed."""
    ro = generate(student, tok, PROMPTS * 13, num_samples=5, max_new_tokens=8, temperature=0.0)
    assert len(ro) == 325 and batches == [325]


def test_ranks_run_as_many_micro_batches_as_the_busiest(monkeypatch, student, tok, batches):
    """Under sync_ranks a rank with fewer micro-batches than another decodes one-row stand-ins until
    the other is done: the same number of forward passes on every rank."""
    others = {"micro_batches": 2.0}
    seen = []

    def all_reduce_max(values, device=None):  # the other rank's count of micro-batches
        seen.append(values.item())
        return torch.maximum(values, torch.full_like(values, others["micro_batches"]))

    monkeypatch.setattr(sampler_mod, "all_reduce_max", all_reduce_max)
    monkeypatch.setattr(sampler_mod, "any_rank", lambda flag, device: True)  # the other rank's rows go on
    forwards = []
    hook = student.register_forward_hook(lambda *a: forwards.append(1))

    def sample():
        forwards.clear()
        batches.clear()
        return _generate(student, tok, BuiltinSampler(lean=False, max_batch_rows=2), PROMPTS[:2], num_samples=2,
                         max_new_tokens=8, generator=torch.Generator().manual_seed(0), sync_ranks=True)  # fmt: skip

    try:
        same = sample()
        assert batches == [2, 2] and len(forwards) == 2 * 8  # prefill + 7 steps each
        others["micro_batches"] = 4.0
        synced = sample()
    finally:
        hook.remove()
    assert seen == [2.0, 2.0]  # this rank's count went into the reduction
    assert batches == [2, 2, 1, 1]  # its two micro-batches, then two one-row stand-ins
    assert len(forwards) == 4 * 8  # as many forward passes as the rank with 4 micro-batches
    # the stand-ins' outputs are dropped and they draw no random numbers: this rank's rows are its own
    assert synced.completion_ids.shape == (4, 8)
    assert torch.equal(synced.completion_ids, same.completion_ids) and synced.texts == same.texts


@pytest.mark.parametrize("lean", [True, False])
def test_the_prefill_computes_the_last_positions_logits_only(lean, student, tok):
    shapes = []
    hook = student.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.logits.shape)))
    try:
        ro = _generate(student, tok, BuiltinSampler(lean=lean), PROMPTS[:3], num_samples=2, max_new_tokens=4,
                       temperature=0.0)  # fmt: skip
    finally:
        hook.remove()
    assert ro.prompt_ids.shape[1] > 1
    assert shapes[0] == (6, 1, student.config.vocab_size)  # not [6, prompt length, V]
    assert all(s[1] == 1 for s in shapes)


def test_models_without_logits_to_keep_get_a_plain_forward():
    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, **kwargs):
            raise NotImplementedError

    class Older(Plain):
        def forward(self, input_ids, num_logits_to_keep=0):  # transformers 4.45-4.49
            raise NotImplementedError

    assert sampler_mod._last_logits_kwarg(Plain()) == {}
    assert sampler_mod._last_logits_kwarg(Older()) == {"num_logits_to_keep": 1}
    assert sampler_mod._last_logits_kwarg(_tiny_llama()) == {"logits_to_keep": 1}


def test_kv_buffers_take_the_compute_dtype_under_autocast():
    model = _tiny_llama()  # float32 weights, bf16 autocast: bf16-mixed training
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dec = LlamaDecoder(model, ids, mask, max_new_tokens=3)
        assert {k.dtype for k in dec.keys} == {v.dtype for v in dec.values} == {torch.bfloat16}
        assert kv_bytes_per_token(model, lean=True) == 2 * 2 * 2 * 16 * 2
        assert kv_bytes_per_token(model, lean=False) == 2 * 2 * 2 * 16 * 4  # the model's own cache: fp32 keys
        # the cast buffers give the model's own logits, bitwise
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        assert torch.equal(dec.logits, out.logits[:, -1])
        cache = out.cache
        for _ in range(3):
            nxt = torch.randint(3, 100, (3,), generator=g)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                        cache=cache)  # fmt: skip
            cache = out.cache
            assert torch.equal(dec.step(nxt), out.logits[:, -1])
    with torch.no_grad():  # without autocast: the weights' dtype
        assert LlamaDecoder(model, ids, mask[:, :5], max_new_tokens=1).keys[0].dtype == torch.float32
