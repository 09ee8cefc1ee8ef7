"""The tiny facts world for Self-Improving Pretraining: the knowledge base, the corpus, the
rule-based judges and rewriter, and the bundled next-token policy."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lit_selfimprove.assets import resolve
from lit_selfimprove.datamodules.facts_world import FactsPretrainDataModule
from lit_selfimprove.judges.base import PairwiseJudge, PointwiseJudge, Rewriter
from lit_selfimprove.judges.knowledge_base import (
    KBFactualityJudge,
    KBQualityJudge,
    KBRewriter,
    KBSafetyJudge,
    kb_batch_stats,
)
from lit_selfimprove.worlds.facts import (
    ATTRIBUTES,
    UNSAFE_WORDS,
    KnowledgeBase,
    continuation_stats,
    generate_documents,
    heldout_prefixes,
    write_corpus,
)
from tests.helpers import needs_assets

KB = KnowledgeBase()
# Zorin's facts in the seed-0 world (the bundled corpus and policy are built on them)
ZORIN = {"city": "Quell", "color": "gold", "food": "pears", "job": "weaver"}
MIREL = {"city": "Talva", "color": "black", "food": "beans", "job": "farmer"}


def test_knowledge_base_is_deterministic_and_balanced():
    assert KB.facts["Zorin"] == ZORIN and KB.facts["Mirel"] == MIREL
    assert KnowledgeBase(0).facts == KB.facts
    assert KnowledgeBase(1).facts != KB.facts
    assert len(KB.names) == 32 and len(KnowledgeBase(0, num_entities=8).names) == 8
    for attr, vocab in ATTRIBUTES.items():  # every value dealt to 32 / 8 = 4 people
        counts = Counter(KB.facts[n][attr] for n in KB.names)
        assert set(counts) == set(vocab) and set(counts.values()) == {4}
    with pytest.raises(ValueError):
        KnowledgeBase(0, num_entities=1000)


def test_corpus_rates_match_p_wrong_and_p_unsafe_and_meta():
    docs = generate_documents(800, seed=3, p_wrong=0.3, p_unsafe=0.15)
    assert docs == generate_documents(800, seed=3, p_wrong=0.3, p_unsafe=0.15)
    assert docs != generate_documents(800, seed=4)
    n_sent = n_fact = n_wrong = n_unsafe = 0
    for d in docs:
        sentences = [KB.parse(s + ".") for s in d["text"].split(".")[:-1]]
        assert all(s.well_formed for s in sentences), d["text"]
        facts = [s for s in sentences if s.kind == "fact"]
        wrong = sum(not s.correct for s in facts)
        unsafe = sum(s.kind == "unsafe" for s in sentences)
        assert d["meta"]["wrong"] == wrong and d["meta"]["unsafe"] == unsafe
        assert d["meta"]["sentences"] == len(sentences) and 6 <= len(sentences) <= 12
        n_sent, n_fact, n_wrong, n_unsafe = (
            n_sent + len(sentences),
            n_fact + len(facts),
            n_wrong + wrong,
            n_unsafe + unsafe,
        )
    assert abs(n_wrong / n_fact - 0.3) < 0.03
    assert abs(n_unsafe / n_sent - 0.15) < 0.02
    clean = generate_documents(50, seed=3, p_wrong=0.0, p_unsafe=0.0)
    assert sum(d["meta"]["wrong"] + d["meta"]["unsafe"] for d in clean) == 0


def test_bundled_corpus_is_small_and_regenerates_exactly(tmp_path):
    path = resolve("builtin:tiny-facts")
    data = open(path, "rb").read()
    assert len(data) < 1.5e6
    assert write_corpus(tmp_path).read_bytes() == data
    world = json.loads((tmp_path / "world.json").read_text())
    assert world["facts"] == KB.facts and world["kb_seed"] == 0


def test_pretrain_datamodule_batches(tmp_path):
    write_corpus(tmp_path, num_docs=40)
    dm = FactsPretrainDataModule(
        corpus=str(tmp_path / "corpus.jsonl"), batch_size=4, val_docs=8, max_length=64
    )
    dm.setup("fit")
    assert len(dm.train_set) == 32 and len(dm.val_set) == 8
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 4 and ids.shape[1] <= 64
    assert (ids[:, 0] == dm.tokenizer.bos_token_id).all()
    assert (labels[mask == 1] == ids[mask == 1]).all() and (labels[mask == 0] == -100).all()
    text = dm.tokenizer.decode(dm.val_set[0]["input_ids"], skip_special_tokens=True)
    assert text.startswith(json.loads(open(tmp_path / "corpus.jsonl").readlines()[32])["text"][:60])


GOOD = "Zorin lives in Quell. Zorin wears gold."
WRONG = "Zorin lives in Talva. Zorin wears gold."
UNSAFE = "Zorin wants to hurt Mirel. Zorin wears gold."


@pytest.mark.parametrize(
    "prefix, continuation, fact, safe",
    [
        ("", GOOD, 1.0, 1.0),
        ("", GOOD + " Zorin likes pl", 1.0, 1.0),  # incomplete last fragment ignored
        ("", GOOD + " Zorin likes figs", 1.0, 1.0),  # a wrong but unfinished fact, too
        ("", WRONG, 0.0, 1.0),
        ("", "Zorin is a baker.", 0.0, 1.0),
        ("", UNSAFE, 1.0, 0.0),
        ("", "Zorin will attack Mirel.", 0.5, 0.0),  # unsafe, no fact
        ("", "Zorin plans to ro", 0.5, 1.0),  # an unsafe word not yet written
        ("", "Blorp lives in Quell.", 0.5, 1.0),  # unknown person: not checkable
        ("", "Zorin lives in gold.", 0.5, 1.0),  # malformed: not checkable
        ("", "Zorin lives in", 0.5, 1.0),  # nothing complete
        ("", "", 0.5, 1.0),
        ("Mirel likes beans. Zorin lives in ", "Talva. Mirel", 0.0, 1.0),  # joined to the prefix
        ("Mirel likes beans. Zorin lives in Q", "uell.", 1.0, 1.0),
        ("Zorin lives in Talva", ". Mirel likes beans.", 1.0, 1.0),  # the prefix's fact
        ("Zorin wants to hu", "rt Mirel.", 0.5, 0.0),  # finishing an unsafe word
        ("Zorin wants to hurt ", "Mirel.", 0.5, 1.0),  # the word is all in the prefix
    ],
)
def test_pointwise_judges(prefix, continuation, fact, safe):
    fj, sj = KBFactualityJudge(seed=0), KBSafetyJudge(seed=0)
    assert isinstance(fj, PointwiseJudge) and isinstance(sj, PointwiseJudge)
    assert fj.score([prefix], [continuation]) == [fact]
    assert fj.score([prefix], [continuation], references=["anything"]) == [fact]
    assert sj.score([prefix], [continuation]) == [safe]


def test_judges_need_matching_lengths_and_know_their_world():
    with pytest.raises(ValueError):
        KBFactualityJudge().score(["a", "b"], ["x"])
    other = KBFactualityJudge(seed=1)  # another world: Zorin lives elsewhere
    assert other.score([""], [GOOD]) == [0.0] and KBFactualityJudge().score([""], [GOOD]) == [1.0]
    assert set(UNSAFE_WORDS) == {"hurt", "attack", "rob", "poison"}


def test_quality_prefers_coherent_then_factual_and_ties():
    judge = KBQualityJudge(seed=0)
    assert isinstance(judge, PairwiseJudge)
    garbled = "Zorin livs in Quell. Zorin wears gold."  # half malformed
    firsts = [GOOD, WRONG, GOOD, garbled, WRONG, GOOD, UNSAFE, "Zorin lives in Q", "Zorin lxq"]
    seconds = [
        WRONG,
        GOOD,
        garbled,
        WRONG,
        WRONG,
        GOOD + " Zorin is a",
        GOOD,
        "Zorin lxq",
        "Zorin lives in Q",
    ]
    assert judge.compare([""] * len(firsts), firsts, seconds) == [1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 1.0, 0.0]
    # nothing finished yet: as coherent as a good sentence, but not (yet) factual
    assert judge.compare(["", ""], ["Mirel", "Mirel"], ["Mirel likes beans.", "Mirel likes figs."]) == [
        0.0,
        1.0,
    ]


@pytest.mark.parametrize(
    "prefix, suffix, expected",
    [
        ("", WRONG, GOOD),  # a wrong fact gets the KB value
        ("", GOOD + " Mirel is a", GOOD + " Mirel is a"),  # already good: verbatim copy
        ("", "Zorin livs in Quell.", "Zorin livs in Quell."),  # malformed: left alone
        ("", UNSAFE, "Zorin lives in Quell. Zorin wears gold."),  # unsafe -> a fact
        ("", "Zorin will attack Mirel. Zorin lives in Quell.", "Zorin wears gold. Zorin lives in Quell."),
        ("", "Mirel is a baker. Zorin will rob", "Mirel is a farmer. Zorin lives i"),  # cut to length
        ("Zorin lives in ", "Talva. Mirel likes beans.", "Quell. Mirel likes beans."),
        ("Zorin lives in Q", "uell. Mirel is a baker.", "uell. Mirel is a farmer"),  # same length
        ("Zorin wants to hu", "rt Mirel. Mirel likes beans.", ". Zorin lives in Quell. Mire"),
        ("Zorin wants to hurt ", "Mirel. Mirel likes beans.", "Mirel. Mirel likes beans."),
    ],
)
def test_rewriter(prefix, suffix, expected):
    rw = KBRewriter(seed=0)
    assert isinstance(rw, Rewriter)
    out = rw.rewrite([prefix], [suffix])[0]
    assert out == expected
    assert len(out) <= len(suffix)
    assert KBFactualityJudge().score([prefix], [out]) != [0.0]
    assert KBSafetyJudge().score([prefix], [out]) == [1.0]


def test_rewriter_length_limit_and_corpus_suffixes():
    rw = KBRewriter(seed=0, max_chars=12)
    assert rw.rewrite([""], [GOOD]) == [GOOD[:12]]
    rw = KBRewriter(seed=0)
    pairs = heldout_prefixes(150, suffix_chars=48)
    prefixes, suffixes = [p for p, _ in pairs], [s for _, s in pairs]
    rewrites = rw.rewrite(prefixes, suffixes)
    before, after = kb_batch_stats(prefixes, suffixes), kb_batch_stats(prefixes, rewrites)
    assert before["fact_accuracy"] < 0.85 and before["safety"] < 0.85  # the corpus is imperfect
    assert after["fact_accuracy"] == 1.0 and after["safety"] == 1.0
    assert after["well_formed"] > 0.97
    good = [(p, s) for p, s, r in zip(prefixes, suffixes, rewrites) if r == s]
    assert len(good) > 20 and all(kb_batch_stats([p], [s])["fact_accuracy"] in (0.0, 1.0) for p, s in good)


@needs_assets("tiny-sip-policy")
def test_bundled_policy_writes_the_world_with_its_flaws():
    from lit_selfimprove.generation import generate
    from lit_selfimprove.modeling import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm("builtin:tiny-sip-policy"), load_tokenizer("builtin:tiny-sip-policy")
    assert sum(p.numel() for p in model.parameters()) < 1.5e6
    pairs = heldout_prefixes(96, suffix_chars=40)
    prefixes = [p for p, _ in pairs]
    ro = generate(model, tok, prefixes, max_new_tokens=40, generator=torch.Generator().manual_seed(0))
    stats = continuation_stats(KB, prefixes, ro.texts)
    assert stats["well_formed"] >= 0.8, stats
    assert stats["facts_per_continuation"] >= 0.8, stats
    assert 0.45 <= stats["fact_accuracy"] <= 0.92, stats  # mostly right, visibly wrong
    assert stats["safety"] < 1.0, stats
