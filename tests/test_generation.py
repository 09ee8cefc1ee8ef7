"""The KV-cached sampler: shapes, EOS handling, padding invariance, seeded reproducibility."""

from __future__ import annotations

import torch

from lit_selfimprove.generation import generate
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer


def _load(path):
    return load_causal_lm(path), load_tokenizer(path)


def test_shapes_and_grouping(tiny_random_lm):
    model, tok = _load(tiny_random_lm)
    ro = generate(model, tok, ["Q: 1+2\nA: ", "Q: 33+44\nA: "], num_samples=3, max_new_tokens=5)
    assert len(ro) == 6 and len(ro.texts) == 6
    assert ro.completion_ids.shape == ro.completion_mask.shape == (6, 5)
    # rows 0-2 belong to prompt 0: identical (left-padded) prompt rows
    assert torch.equal(ro.prompt_ids[0], ro.prompt_ids[2]) and not torch.equal(
        ro.prompt_ids[0], ro.prompt_ids[3]
    )
    ids, attn, cmask = ro.sequences()
    assert ids.shape == (6, ro.prompt_ids.shape[1] + 5)
    assert torch.equal(cmask[:, ro.prompt_ids.shape[1] :], ro.completion_mask)
    assert int(cmask[:, : ro.prompt_ids.shape[1]].sum()) == 0


def test_greedy_matches_hf_generate_and_ignores_padding(tiny_random_lm):
    model, tok = _load(tiny_random_lm)
    prompts = ["Q: 1+2\nA: ", "Q: 123+456\nA: "]
    batched = generate(model, tok, prompts, max_new_tokens=8, temperature=0.0)
    for i, p in enumerate(prompts):
        alone = generate(model, tok, [p], max_new_tokens=8, temperature=0.0)
        assert alone.texts[0] == batched.texts[i]
        enc = tok(p, return_tensors="pt")
        ref = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        n = int(alone.completion_mask.sum())
        assert ref[0, enc["input_ids"].shape[1] :][:n].tolist() == alone.completion_ids[0, :n].tolist()


def test_stops_at_eos_and_masks_after_it(tiny_random_lm):
    model, tok = _load(tiny_random_lm)
    model.config.tie_word_embeddings = False
    with torch.no_grad():  # an LM head that always prefers EOS, except for row 1's first token
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
        model.lm_head.weight[tok.eos_token_id] = 1.0
    ro = generate(model, tok, ["Q: 1+2\nA: ", "Q: 3+4\nA: "], max_new_tokens=6, temperature=0.0)
    assert ro.completion_ids.shape[1] == 1  # every row ended: the loop stops
    assert ro.completion_mask.tolist() == [[1], [1]] and ro.finished.all()
    assert ro.texts == ["", ""]
    # a model that never emits EOS runs to max_new_tokens and is marked unfinished
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids("7")] = 1.0
    ro = generate(model, tok, ["Q: 1+2\nA: "], max_new_tokens=6, temperature=0.0)
    assert ro.texts == ["777777"] and not ro.finished.any() and ro.completion_mask.sum() == 6


def test_seeded_sampling_repeats(tiny_random_lm):
    model, tok = _load(tiny_random_lm)

    def sample(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return generate(model, tok, ["Q: 9+9\nA: "], num_samples=4, max_new_tokens=6, generator=gen)

    a, b, c = sample(1), sample(1), sample(2)
    assert a.texts == b.texts and torch.equal(a.completion_ids, b.completion_ids)
    assert a.texts != c.texts
    assert len(set(a.texts)) > 1  # temperature 1 on a random model: samples differ
