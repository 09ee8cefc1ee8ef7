"""The built-in sampler's speed options: dropping finished rows from the decode batch
(``compact_finished``) and one prefill per prompt group (``shared_prefill``).

Greedy decoding must give the same tokens as the plain loop (in float64, so that matrix products
over fewer rows cannot round a near-tie the other way), seeded sampling must repeat, and a finished
row must get nothing after its EOS.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_selfimprove.generation import BuiltinSampler, GenerationConfig, llama_decode, make_backend
from lit_selfimprove.generation import sampler as sampler_mod

PAD = 0
EOS = torch.tensor([7])  # with this model and these prompts, rows end at very different steps
OPTIONS = [
    {"compact_finished": True},
    {"shared_prefill": True},
    {"compact_finished": True, "shared_prefill": True},
]


def _model(dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
        attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def _prompts(n: int = 3, width: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` LEFT-padded prompts of different lengths."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(13, 100, (n, width), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, : 2 * i] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _sample(sampler, model, num_samples=4, temperature=0.0, seed=0, max_new_tokens=40, prompts=None):
    ids, mask = prompts if prompts is not None else _prompts()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return sampler.sample(model, ids, mask, num_samples, EOS, PAD, max_new_tokens, temperature, 1.0,
                              generator, False)  # fmt: skip


def _check_rows_end_at_eos(ids, mask, finished):
    for row_ids, row_mask, done in zip(ids, mask, finished, strict=True):
        n = int(row_mask.sum())
        assert bool((row_mask[:n] == 1).all()) and bool((row_mask[n:] == 0).all())  # a prefix of tokens
        assert bool((row_ids[n:] == PAD).all())  # nothing after the end
        assert not bool(torch.isin(row_ids[: n - 1], EOS).any())  # EOS only as the last token
        assert bool(torch.isin(row_ids[n - 1], EOS)) == bool(done)


@pytest.mark.parametrize("options", OPTIONS)
def test_greedy_texts_equal_the_plain_samplers(options):
    model = _model()
    ref_ids, ref_mask, ref_done = _sample(BuiltinSampler(), model, num_samples=2)
    lengths = ref_mask.sum(-1)
    assert len(set(lengths.tolist())) > 2 and bool(ref_done.any())  # rows end at different steps
    ids, mask, done = _sample(BuiltinSampler(**options), model, num_samples=2)
    assert torch.equal(mask, ref_mask) and torch.equal(done, ref_done)
    assert torch.equal(ids.masked_fill(mask == 0, PAD), ref_ids.masked_fill(ref_mask == 0, PAD))


@pytest.mark.parametrize("options", OPTIONS)
def test_seeded_sampling_repeats_and_stops_at_eos(options):
    model = _model(torch.float32)
    first = _sample(BuiltinSampler(**options), model, temperature=1.0, seed=3)
    second = _sample(BuiltinSampler(**options), model, temperature=1.0, seed=3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    ids, mask, done = first
    assert bool(done.any()) and len(set(mask.sum(-1).tolist())) > 2
    _check_rows_end_at_eos(ids, mask, done)
    other = _sample(BuiltinSampler(**options), model, temperature=1.0, seed=4)
    assert not torch.equal(other[0], ids)  # the seed matters


@pytest.mark.parametrize("options", OPTIONS)
def test_finished_rows_get_nothing_after_eos_greedy(options):
    ids, mask, done = _sample(BuiltinSampler(**options), _model(), num_samples=3)
    assert bool(done.any()) and not bool(done.all())
    _check_rows_end_at_eos(ids, mask, done)


def test_compaction_shrinks_the_decode_batch(monkeypatch):
    sizes = []
    real_step = llama_decode.LlamaDecoder.step

    def step(self, tokens):
        sizes.append(tokens.shape[0])
        assert self.keys[0].shape[0] == tokens.shape[0]  # the KV buffers hold the live rows only
        return real_step(self, tokens)

    monkeypatch.setattr(llama_decode.LlamaDecoder, "step", step)
    _, mask, done = _sample(BuiltinSampler(compact_finished=True), _model(), num_samples=2)
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0] < 6
    # every step decodes exactly the rows still going (those with a token at the next position)
    assert sizes == mask[:, 1 : len(sizes) + 1].sum(0).tolist()
    sizes.clear()
    _sample(BuiltinSampler(), _model(), num_samples=2)
    assert set(sizes) == {6}  # off: the batch keeps its shape


def test_shared_prefill_runs_each_prompt_once(monkeypatch):
    model = _model()
    rows = []
    real_forward = model.forward

    def forward(*args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    _sample(BuiltinSampler(shared_prefill=True), model, num_samples=4)
    assert rows == [3]  # 3 prompts x 4 samples: one prefill of 3 rows (the steps skip forward)
    rows.clear()
    _sample(BuiltinSampler(), model, num_samples=4)
    assert rows == [12]


@pytest.mark.parametrize("max_rows", [4, 3, 5])
def test_micro_batches_with_the_options(max_rows):
    """Micro-batches holding whole groups prefill once per prompt; others (5 rows of groups of 2)
    fall back to one prefill per row; greedy tokens are the plain sampler's either way."""
    model = _model()
    ref = _sample(BuiltinSampler(max_batch_rows=max_rows), model, num_samples=2)
    got = _sample(
        BuiltinSampler(max_batch_rows=max_rows, compact_finished=True, shared_prefill=True),
        model,
        num_samples=2,
    )
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    assert torch.equal(got[0].masked_fill(got[1] == 0, PAD), ref[0].masked_fill(ref[1] == 0, PAD))


def test_non_lean_models_ignore_the_options():
    model = _model()
    ref = _sample(BuiltinSampler(lean=False), model, num_samples=2)
    got = _sample(
        BuiltinSampler(lean=False, compact_finished=True, shared_prefill=True), model, num_samples=2
    )
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)


def test_generation_config_passes_the_options():
    backend = make_backend(GenerationConfig(compact_finished=True, shared_prefill=True))
    assert isinstance(backend, BuiltinSampler) and backend.compact_finished and backend.shared_prefill
    plain = make_backend(GenerationConfig())
    assert not plain.compact_finished and not plain.shared_prefill
    assert sampler_mod.BuiltinSampler.compact_finished is False  # off unless asked for
