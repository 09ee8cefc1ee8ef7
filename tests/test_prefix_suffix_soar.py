"""PrefixSuffixDataModule on SOAR's output: split mode ``marker`` (question = prefix, answer = suffix),
the ``soar:`` source, resume and bad input."""

import json
from itertools import islice

import pytest
import torch

from lit_selfimprove.datamodules import PrefixSuffixDataModule
from lit_selfimprove.datamodules.prefix_suffix import PrefixSuffixDataset
from lit_selfimprove.datamodules.soar_corpus import PARTS, load_soar_rows, render_documents, write_corpus
from lit_selfimprove.worlds.arithmetic import generate_problems, student_solution

MARKER = "\nA: "
KW = {
    "suffix_tokens": 72,
    "context_length": 120,
    "min_prefix_tokens": 5,
    "min_suffix_tokens": 1,
    "split_mode": "marker",
    "split_marker": MARKER,
    "splits": {"policy": 0.8, "eval": 0.2},
}


@pytest.fixture
def soar_run(tmp_path):
    run = tmp_path / "soar" / "version_0"
    run.mkdir(parents=True)
    rows = [
        dict(p, step=1, promotion=0, dataset=0, reward=0.1) for p in generate_problems([2, 3, 4], 60, seed=5)
    ]
    (run / PARTS["pq"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _keys(batches) -> list:
    return [(d, int(s)) for b in batches for d, s in zip(b["doc_id"], b["suffix_start"])]


def test_marker_mode_cuts_each_document_after_its_marker(tmp_path):
    docs = [
        {"text": "Q: 12+34\nA: 2+4=6,1+3=4 \\boxed{46}"},
        {"text": "Q: 1+1\nA: 1+1=2 \\boxed{2}\nQ: 2+2\nA: 2+2=4 \\boxed{4}"},  # two cuts in one document
        {"text": "no marker here"},
        {"text": "\nA: starts with the marker"},  # no prefix before it: below min_prefix_tokens
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    items = list(PrefixSuffixDataset(str(path), **{**KW, "splits": {"policy": 1.0}}))
    pairs = [(it["prefix_text"], it["suffix_text"]) for it in items]
    assert sorted(pairs) == sorted([
        ("Q: 12+34\nA: ", "2+4=6,1+3=4 \\boxed{46}"),
        ("Q: 1+1\nA: ", "1+1=2 \\boxed{2}\nQ: 2+2\nA: 2+2=4 \\boxed{4}"),
        ("Q: 1+1\nA: 1+1=2 \\boxed{2}\nQ: 2+2\nA: ", "2+2=4 \\boxed{4}"),
    ])  # fmt: skip
    one = list(PrefixSuffixDataset(str(path), **{**KW, "splits": {"policy": 1.0}, "max_chunks_per_doc": 1}))
    assert len(one) == 2


def test_marker_settings_are_checked(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"text": "Q: 1+1\\nA: 2"}\n')
    with pytest.raises(ValueError, match="split_mode 'marker' needs a non-empty split_marker"):
        PrefixSuffixDataModule(str(path), **{**KW, "split_marker": None})
    with pytest.raises(ValueError, match="split_marker needs split_mode 'marker'"):
        PrefixSuffixDataModule(str(path), **{**KW, "split_mode": "fixed"})


def test_a_stream_without_marker_keeps_its_checkpoint_fingerprint():
    # the fingerprint of configs/tiny/sip_dpo.yaml's stream before split_marker existed (computed at 37be5d6)
    dm = PrefixSuffixDataModule(
        sources=["builtin:tiny-facts"], suffix_tokens=40, context_length=160, min_prefix_tokens=20,
        split_mode="random", splits={"policy": 0.8, "judge": 0.05, "rewriter": 0.05, "eval": 0.1},
    )  # fmt: skip
    assert dm._fingerprint == "dc183263709f20f33aa3f923ca6e6663e87cdf38"


def test_soar_source_streams_question_answer_chunks_and_resumes(soar_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the soar: cache goes under ~/.cache
    dm = PrefixSuffixDataModule(f"soar:{soar_run}", batch_size=4, shuffle_buffer_size=8, **KW)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for prefix, suffix in zip(batch["prefix_text"], batch["suffix_text"]):
        question = prefix.removeprefix("Q: ").removesuffix(MARKER)
        assert (
            suffix == f"\\boxed{{{sum(int(x) for x in question.split('+'))}}}"
        )  # the teacher's (true) answers
    total = 12
    ref = _keys(
        islice(
            iter(
                PrefixSuffixDataModule(
                    f"soar:{soar_run}", batch_size=4, shuffle_buffer_size=8, **KW
                ).train_dataloader()
            ),
            total,
        )
    )
    dm = PrefixSuffixDataModule(f"soar:{soar_run}", batch_size=4, shuffle_buffer_size=8, **KW)
    head = _keys(islice(iter(dm.train_dataloader()), 5))
    torch.save(dm.state_dict(), tmp_path / "state.pt")
    fresh = PrefixSuffixDataModule(f"soar:{soar_run}", batch_size=4, shuffle_buffer_size=8, **KW)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert head + _keys(islice(iter(fresh.train_dataloader()), total - 5)) == ref


def test_student_solution_corpus_streams_the_same_way(soar_run, tmp_path):
    rows = load_soar_rows(soar_run)[:6]
    docs = render_documents(rows, solutions="student", student="builtin:tiny-student", max_new_tokens=40)
    write_corpus(docs, tmp_path / "corpus.jsonl")
    items = list(PrefixSuffixDataset(str(tmp_path / "corpus.jsonl"), **{**KW, "splits": {"policy": 1.0}}))
    assert len(items) == 6
    for it in items:
        question = it["prefix_text"].removeprefix("Q: ").removesuffix(MARKER)
        assert (
            it["suffix_text"].split(",")[0] == student_solution(question).split(",")[0]
        )  # first column right


def test_bad_soar_sources_fail_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / PARTS["pq"]).write_text("")
    with pytest.raises(ValueError, match="only when it promotes"):
        PrefixSuffixDataModule(f"soar:{empty}", **KW)
    with pytest.raises(FileNotFoundError, match="no SOAR output"):
        PrefixSuffixDataModule(f"soar:{tmp_path / 'nowhere'}", **KW)
