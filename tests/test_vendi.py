import pytest
import torch

from lit_selfimprove.metrics import HashingNgramEmbedding, SentenceEmbedding, VendiScore, vendi_score


def test_identical_rows_score_one():
    x = torch.tensor([[1.0, 2.0, 3.0]]).repeat(7, 1)
    assert vendi_score(x).item() == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_rows_score_n():
    assert vendi_score(torch.eye(5) * 3.0).item() == pytest.approx(5.0, abs=1e-6)


def test_two_orthogonal_groups_score_two():
    x = torch.cat(
        [torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1), torch.tensor([[0.0, 2.0, 0.0]]).repeat(4, 1)]
    )
    assert vendi_score(x).item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_empty_raises():
    with pytest.raises(ValueError):
        vendi_score(torch.zeros(0, 4))
    with pytest.raises(ValueError):
        VendiScore().compute()


def test_hashing_embedding_shape_and_stability():
    emb = HashingNgramEmbedding(dim=64)
    out = emb(["What is 2 + 3?", "", "x"])
    assert out.shape == (3, 64) and out.dtype == torch.float32
    assert (out.sum(1) > 0).all()
    assert torch.equal(out, HashingNgramEmbedding(dim=64)(["What is 2 + 3?", "", "x"]))


def test_identical_texts_score_one():
    m = VendiScore()
    m.update(["What is 12 + 7?"] * 10)
    assert m.compute().item() == pytest.approx(1.0, abs=1e-6)


def test_diverse_beats_collapsed():
    diverse = [f"What is {a} + {b * 7 + 3}?" for a, b in zip(range(11, 43), range(32))]
    base = ["What is 2 + 3?", "Compute 17 * 4.", "Find x if x - 9 = 20."]
    collapsed = [base[i % 3] for i in range(32)]
    d, c = VendiScore(), VendiScore()
    d.update(diverse)
    c.update(collapsed)
    sd, sc = d.compute().item(), c.compute().item()
    assert sc <= 3.0 + 1e-6
    assert sd > sc


def test_update_in_batches_equals_single_batch():
    texts = [f"question {i}: {i * i} - {i}" for i in range(20)]
    a, b = VendiScore(), VendiScore()
    a.update(texts[:8])
    a.update(texts[8:])
    b.update(texts)
    assert a.compute().item() == pytest.approx(b.compute().item(), rel=1e-9)


def test_bootstrap_reproducible():
    texts = [f"Solve {i} * x = {3 * i}" for i in range(24)]

    def run(seed):
        m = VendiScore(bootstrap=20, bootstrap_size=16, seed=seed)
        m.update(texts)
        return m.compute()

    r1, r2, r3 = run(0), run(0), run(1)
    assert set(r1) == {"vendi", "vendi_std"}
    assert r1["vendi"].item() == r2["vendi"].item() and r1["vendi_std"].item() == r2["vendi_std"].item()
    assert r1["vendi"].item() != r3["vendi"].item()
    assert 1.0 <= r1["vendi"].item() <= 16.0 and r1["vendi_std"].item() > 0


def test_sentence_embedding_tiny_random_bert(tmp_path):
    from transformers import BertConfig, BertModel

    from lit_selfimprove.modeling import load_tokenizer

    tok = load_tokenizer("builtin:tiny-tokenizer")
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=len(tok),
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(tmp_path)

    emb = SentenceEmbedding(str(tmp_path), batch_size=2)
    assert emb._model is None  # lazy
    texts = ["What is 2 + 3?", "Compute 4 * 5.", "abc", "What is 2 + 3?", "x"]
    out = emb(texts)
    assert out.shape == (5, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # pooling ignores padding: same text embedded alone or in a padded batch
    torch.testing.assert_close(emb(["abc"])[0], out[2], atol=1e-5, rtol=1e-4)

    m = VendiScore(embedding=emb)
    m.update(texts)
    score = m.compute().item()
    assert 1.0 <= score <= 5.0
