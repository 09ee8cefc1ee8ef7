"""SuffixPolicyDPO tokenizes a rewritten suffix in the context of its prefix.

With a SentencePiece-style tokenizer (``Metaspace``: a word's leading space is part of its token)
a text tokenized on its own starts differently from the same text after a prefix: ``". It has"``
alone is ``▁ . ▁It ▁has``, after ``"... France"`` it is ``. ▁It ▁has``. DPO must score the tokens
of the text the judge read, as they follow the prefix. The tokenizer is built in code (no hub).
"""

from __future__ import annotations

import pytest
import torch

from lit_selfimprove.modules.suffix_policy_dpo import SuffixPolicyDPO
from tests.helpers import ScriptedJudge

CORPUS = [
    "Paris is the capital of France. It has two million people, and it is old.",
    "Talva is a city. Zorin lives in Talva, and Mira lives in Ovra. It has three rivers.",
]


@pytest.fixture(scope="module")
def metaspace_lm(tmp_path_factory) -> str:
    """A tiny random Llama with a BPE tokenizer on a Metaspace pre-tokenizer, as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(
        CORPUS * 10, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    path = tmp_path_factory.mktemp("metaspace_lm")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


class FixedRewriter:
    def __init__(self, texts: list[str]):
        self.texts = texts

    def rewrite(self, prefixes, suffixes):
        return list(self.texts)


def test_rewrite_is_tokenized_in_the_context_of_its_prefix(metaspace_lm):
    prefixes = [
        "Paris is the capital of France",
        "Zorin lives in",
        "Paris is the capital of France",
        "Zorin lives in Tal",
    ]
    suffixes = [". It has two million people", " Talva, and Mira lives in", ". It", "va,"]
    rewrites = [
        ". It has two million",  # no leading space: alone it would start with a lone "▁"
        " Talva, and Mira",  # a leading space
        ". It has three rivers, and it is old. Paris is the capital of France.",  # cut to N tokens
        "va, and Mira",  # continues the prefix's last word: "▁Tal" + "va" is one token "▁Talva"
    ]
    module = SuffixPolicyDPO(
        metaspace_lm,
        judge=ScriptedJudge(lambda p, c, r: [0.0] * len(c)),
        rewriter=FixedRewriter(rewrites),
        candidates={"num_rollouts": 0, "include_rewrite": True},
    )
    tok = module.tokenizer
    pre = tok(prefixes, padding=True, padding_side="left", return_tensors="pt")
    suf = [
        tok(p + s, add_special_tokens=False)["input_ids"][len(tok(p)["input_ids"]) :]
        for p, s in zip(prefixes, suffixes)
    ]
    width = max(map(len, suf))
    batch = {
        "prefix_ids": pre["input_ids"],
        "prefix_mask": pre["attention_mask"],
        "suffix_ids": torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in suf]),
        "suffix_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in suf]),
        "prefix_text": prefixes,
        "suffix_text": suffixes,
    }
    cands = module.build_candidates(batch, None)
    assert cands.sources == ["suffix", "rewrite"]

    texts = []
    for b, prefix in enumerate(prefixes):
        head = pre["input_ids"][b][pre["attention_mask"][b].bool()].tolist()
        ids = cands.ids[b, 1][cands.mask[b, 1].bool()].tolist()
        text = cands.texts[b][1]
        texts.append(text)
        if b == 3:
            continue
        # the trained tokens are those of prefix + rewrite, after the prefix's own tokens
        assert ids == tok(prefix + text, add_special_tokens=False)["input_ids"][len(head) :]
        assert tok.decode(head + ids) == prefix + text
    assert texts[:2] == rewrites[:2]
    assert rewrites[2].startswith(texts[2]) and texts[2] != rewrites[2] and cands.mask[2, 1].sum() == width
    # a rewrite whose first characters change the prefix's last token cannot follow the prefix's
    # tokens: it is left out (no tokens, so no score) and counted
    assert texts[3] == rewrites[3] and cands.mask[3, 1].sum() == 0
    assert cands.unaligned_rewrites == 1
