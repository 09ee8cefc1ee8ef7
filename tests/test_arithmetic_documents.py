"""The tiny world's plain corpus: documents as the student was pre-trained on them."""

import pytest
import yaml

from lit_selfimprove.rewards import extract_boxed
from lit_selfimprove.worlds import arithmetic
from lit_selfimprove.worlds.arithmetic import plain_documents, student_solution
from tests.helpers import REPO


def test_the_defaults_are_the_students_pretraining_mixture():
    data = yaml.safe_load((REPO / "configs/tiny/pretrain_student.yaml").read_text())["data"]["init_args"]
    assert list(arithmetic.PRETRAIN_LEVEL_WEIGHTS) == data["level_weights"]
    assert list(arithmetic.PRETRAIN_SLOPPY_LEVELS) == data["sloppy_levels"]
    assert arithmetic.PRETRAIN_CARRY_DROP == data["carry_drop"]


def test_documents_are_sloppy_where_the_pretraining_data_was():
    docs = plain_documents(600, seed=3)
    assert docs == plain_documents(600, seed=3) and docs != plain_documents(600, seed=4)
    for doc in docs:
        meta = doc["meta"]
        assert doc["text"].startswith(f"Q: {meta['question']}\nA: ")
        a, b = meta["question"].split("+")
        assert meta["answer"] == str(int(a) + int(b))
        assert meta["right"] == (extract_boxed(doc["text"]) == meta["answer"])
        if meta["level"] <= 2:  # exact on levels 1-2
            assert doc["text"].endswith(student_solution(meta["question"]))
    wrong_long = [d for d in docs if d["meta"]["level"] >= 5 and not d["meta"]["right"]]
    assert len(wrong_long) > 0.5 * sum(d["meta"]["level"] >= 5 for d in docs)
    assert plain_documents(5, 0, carry_drop=0.0)[0]["meta"]["right"]
    assert all(d["meta"]["right"] for d in plain_documents(50, 0, carry_drop=0.0))
    with pytest.raises(ValueError, match="n must be"):
        plain_documents(0, 0)
