"""The lean Llama decoder: bitwise the model's own forward, so seeded sampling is unchanged."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_selfimprove.generation import BuiltinSampler, attach_backend, detach_backend, generate
from lit_selfimprove.generation import sampler as sampler_mod
from lit_selfimprove.generation.llama_decode import LlamaDecoder, supports


def _gqa_model(attn: str = "sdpa") -> LlamaForCausalLM:
    """A random Llama with grouped-query attention (4 query heads on 2 key/value heads)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
        attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_supports_plain_llama_only(student):
    assert supports(student)
    assert supports(_gqa_model())
    assert not supports(_gqa_model("eager"))  # its attention is not the sdpa path
    hooked = _gqa_model()
    handle = hooked.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert not supports(hooked)  # hooks (FSDP, peft, offloading) must see every forward
    handle.remove()
    assert supports(hooked)
    wrapped = _gqa_model()
    wrapped.model.layers[1].self_attn.q_proj = torch.nn.Sequential(wrapped.model.layers[1].self_attn.q_proj)
    assert not supports(wrapped)  # a replaced linear (LoRA, quantized) is not read as a plain weight


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("which", ["student", "gqa"])
def test_step_logits_equal_the_model_forward_bitwise(which, padded, student):
    model = student if which == "student" else _gqa_model()
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, 100, (6, 7), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    if padded:
        prompt_mask[0, :3] = 0
        prompt_mask[4, :1] = 0
        prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    steps = 12
    with torch.no_grad():
        dec = LlamaDecoder(model, prompt_ids, prompt_mask, steps)
        ids, mask = prompt_ids, prompt_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # (the prefill's logits as the sampler's forward path computes them: the last position only)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache, ref = out.cache, out.logits[:, -1]
        assert torch.equal(dec.logits, ref)
        for step in range(steps):
            nxt = torch.randint(3, 100, (ids.shape[0],), generator=g)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                        cache=cache)  # fmt: skip
            cache, ref = out.cache, out.logits[:, -1]
            assert torch.equal(dec.step(nxt), ref), f"step {step}"


def _sample(model, tok, lean, prompts, seed, **kw):
    attach_backend(model, BuiltinSampler(lean=lean))
    try:
        return generate(model, tok, prompts, generator=torch.Generator().manual_seed(seed), **kw)
    finally:
        detach_backend(model)


GRID = list(
    itertools.product(["student", "gqa"], [(1.0, 1.0), (0.0, 1.0), (0.8, 0.9)], [1, 4], [False, True])
)


@pytest.mark.parametrize("which,sampling,n,same_length", GRID)
def test_lean_sampling_gives_the_same_tokens(which, sampling, n, same_length, student, tok):
    model = student if which == "student" else _gqa_model()
    temperature, top_p = sampling
    if same_length:  # no padding: transformers gives sdpa no mask
        prompts = [f"Q: {1000 + i}+{2000 + i}\nA: " for i in range(5)]
    else:
        prompts = [f"Q: {1234 + i * 97}+{56 + i * 13}\nA: " for i in range(5)]
    kw = dict(num_samples=n, max_new_tokens=40, temperature=temperature, top_p=top_p)
    a = _sample(model, tok, False, prompts, seed=3, **kw)
    b = _sample(model, tok, True, prompts, seed=3, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.finished, b.finished)
    assert a.texts == b.texts


def test_a_rank_that_is_done_keeps_stepping_with_the_others(monkeypatch, student, tok):
    """Under sync_ranks a rank whose rows all ended keeps stepping while the others go on."""
    calls = {"n": 0}

    def others_still_going(flag, device):
        calls["n"] += 1
        return flag or calls["n"] < 30  # "another rank" needs 30 steps

    monkeypatch.setattr(sampler_mod, "any_rank", others_still_going)
    prompts = ["Q: 12+34\nA: ", "Q: 5+6\nA: "]
    kw = dict(num_samples=2, max_new_tokens=50, temperature=1.0, sync_ranks=True)
    calls["n"] = 0
    a = _sample(student, tok, False, prompts, seed=0, **kw)
    calls["n"] = 0
    b = _sample(student, tok, True, prompts, seed=0, **kw)
    assert bool(b.finished.all())
    assert b.completion_ids.shape[1] >= 30  # the loop ran as long as the other rank needed
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(
        a.completion_mask, b.completion_mask
    )


def test_models_it_does_not_support_sample_through_their_forward(tok):
    model = _gqa_model("eager")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    out = _sample(model, tok, True, ["Q: 1+2\nA: "], seed=0, num_samples=2, max_new_tokens=5)
    assert len(out) == 2 and len(calls) >= 2  # prefill + decode steps all went through forward


def _lora_model(**lora):
    """The GQA Llama under peft LoRA adapters with non-zero B (as after some training)."""
    peft = pytest.importorskip("peft", reason="LoRA needs peft (the dev extra installs it)")
    model = peft.get_peft_model(
        _gqa_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora)
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


def test_lora_models_decode_lean_and_bitwise(tok):
    model = _lora_model()
    assert supports(model)
    prompts = [f"Q: {1234 + i * 97}+{56 + i * 13}\nA: " for i in range(4)]
    kw = dict(num_samples=3, max_new_tokens=30, temperature=1.0)
    a = _sample(model, tok, False, prompts, seed=5, **kw)
    b = _sample(model, tok, True, prompts, seed=5, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(
        a.completion_mask, b.completion_mask
    )
    base = _gqa_model()  # the adapters really take part: the bare model samples something else
    assert not torch.equal(_sample(base, tok, True, prompts, seed=5, **kw).completion_ids, b.completion_ids)
    with model.disable_adapter():  # (a reference computed with adapters off is not the decoder's business)
        assert not supports(model)
    merged = _lora_model()
    merged.base_model.merge_adapter()
    assert supports(merged)
    c = _sample(merged, tok, False, prompts, seed=5, **kw)
    d = _sample(merged, tok, True, prompts, seed=5, **kw)
    assert torch.equal(c.completion_ids, d.completion_ids)
    assert not supports(_lora_model(use_dora=True))  # DoRA: another forward, left to peft


@pytest.mark.parametrize(
    "version,lean", [("4.46.3", False), ("4.53.3", False), ("4.55.4", True), ("5.25.0", True)]
)
def test_older_transformers_sample_through_the_forward(version, lean, monkeypatch, tok):
    """transformers 4.46-4.53 return their KV cache as tuples or a ``DynamicCache`` without ``layers``
    (the decoder crashed there): they take the model's forward, which reads any cache."""
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    model = _gqa_model()
    assert supports(model) is lean
    made = []
    monkeypatch.setattr(sampler_mod, "LlamaDecoder", lambda *a: made.append(1) or LlamaDecoder(*a))
    out = _sample(model, tok, True, ["Q: 1+2\nA: "], seed=0, num_samples=2, max_new_tokens=4)
    assert len(out) == 2 and bool(made) is lean
