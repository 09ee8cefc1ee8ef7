"""SOAR's output as a corpus: reading PQ / teacher samples / sampled questions, rendering, bad input."""

import json

import pytest

from lit_selfimprove.datamodules.soar_corpus import (
    PARTS,
    build_corpus,
    load_soar_rows,
    main,
    materialize,
    render_documents,
    write_corpus,
)
from tests.helpers import needs_assets

PQ_ROWS = [
    {
        "question": "58+79",
        "answer": "137",
        "step": 3,
        "promotion": 0,
        "dataset": 2,
        "reward": 0.02,
        "run_id": "r",
    },
    {
        "question": "345+678",
        "answer": "1023",
        "step": 3,
        "promotion": 0,
        "dataset": 2,
        "reward": 0.02,
        "run_id": "r",
    },
    {
        "question": "58+79",
        "answer": "137",
        "step": 9,
        "promotion": 1,
        "dataset": 0,
        "reward": 0.05,
        "run_id": "r",
    },
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "soar" / "version_0"
    run.mkdir(parents=True)
    _write(run / PARTS["pq"], PQ_ROWS)
    _write(
        run / PARTS["samples"], [{"step": 0, "dataset": 0, "reward": 0.0, "question": "6+6", "answer": "12"}]
    )
    return run


def test_reads_a_run_directory_its_parts_and_sampled_questions(run_dir, tmp_path):
    rows = load_soar_rows(run_dir)  # the PQ file, repeated questions once
    assert [r["question"] for r in rows] == ["58+79", "345+678"]
    assert rows[0]["step"] == 3
    assert len(load_soar_rows(run_dir, dedupe=False)) == 3
    assert [r["question"] for r in load_soar_rows(run_dir, part="samples")] == ["6+6"]
    assert [r["question"] for r in load_soar_rows(run_dir, part="all")] == ["58+79", "345+678", "6+6"]
    (run_dir / PARTS["pq"]).unlink()  # a run that never promoted: the samples alone
    assert [r["question"] for r in load_soar_rows(run_dir, part="all")] == ["6+6"]
    sampled = _write(tmp_path / "grounded_t.jsonl", [{"id": "teacher-0", "question": "1+2", "answer": "3"}])
    assert load_soar_rows(sampled) == [{"id": "teacher-0", "question": "1+2", "answer": "3"}]


def test_bad_and_empty_outputs_say_what_is_wrong(run_dir, tmp_path):
    (run_dir / PARTS["pq"]).write_text("\n")
    with pytest.raises(ValueError, match="never promoted|only when it promotes.*part='samples'"):
        load_soar_rows(run_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a SOAR row: invalid JSON"):
        load_soar_rows(bad)
    bad.write_text('{"question": "1+1", "answer": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*no non-empty string 'answer'"):
        load_soar_rows(bad)
    bad.write_bytes(b'{"question": "1+1", "answer": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*not UTF-8"):
        load_soar_rows(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="JSON list, not an object"):
        load_soar_rows(bad)
    with pytest.raises(FileNotFoundError, match="not a SOAR run directory"):
        load_soar_rows(tmp_path)
    with pytest.raises(FileNotFoundError, match="no SOAR output"):
        load_soar_rows(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="part must be"):
        load_soar_rows(run_dir, part="students")


def test_teacher_documents(run_dir):
    docs = render_documents(load_soar_rows(run_dir))
    assert docs[0]["text"] == "Q: 58+79\nA: \\boxed{137}"
    assert docs[0]["meta"] == {
        "question": "58+79", "answer": "137", "step": 3, "promotion": 0, "dataset": 2, "reward": 0.02,
        "run_id": "r", "solution": "teacher",
    }  # fmt: skip
    docs = render_documents(
        load_soar_rows(run_dir), template="{question} = {solution}", teacher_solution="{answer}"
    )
    assert [d["text"] for d in docs] == ["58+79 = 137", "345+678 = 1023"]
    with pytest.raises(ValueError, match="may only use the fields"):
        render_documents(load_soar_rows(run_dir), template="{question} {answer}")
    with pytest.raises(ValueError, match="needs a student model"):
        render_documents(load_soar_rows(run_dir), solutions="student")
    with pytest.raises(ValueError, match="needs solutions='student'"):
        build_corpus(load_soar_rows(run_dir), keep="agree")


@needs_assets("tiny-student")
def test_student_documents_are_the_students_own_solutions(run_dir):
    rows = load_soar_rows(run_dir)
    docs = render_documents(rows, solutions="student", student="builtin:tiny-student", max_new_tokens=40)
    # the bundled student works 345+678 out digit by digit and boxes its result
    assert docs[1]["text"].startswith("Q: 345+678\nA: 5+8=13")
    for doc, row in zip(docs, rows):
        stated = doc["text"].rsplit("\\boxed{", 1)[-1].split("}")[0]
        assert doc["meta"]["agrees"] == (stated == row["answer"])
        assert doc["meta"]["solution"] == "student"
    kept, summary = build_corpus(
        rows, "agree", solutions="student", student="builtin:tiny-student", max_new_tokens=40
    )
    assert [d["id"] for d in kept] == [d["id"] for d in docs if d["meta"]["agrees"]]
    assert summary["student_agrees"] == sum(d["meta"]["agrees"] for d in docs) / len(docs)


def test_materialize_caches_by_content_and_the_tool_writes_a_corpus(run_dir, tmp_path, capsys):
    first = materialize(f"soar:{run_dir}", cache_dir=tmp_path / "cache")
    assert [json.loads(line)["text"] for line in open(first)] == [
        "Q: 58+79\nA: \\boxed{137}",
        "Q: 345+678\nA: \\boxed{1023}",
    ]
    assert materialize(f"soar:{run_dir}", cache_dir=tmp_path / "cache") == first
    _write(run_dir / PARTS["pq"], PQ_ROWS[:1])
    assert materialize(f"soar:{run_dir}", cache_dir=tmp_path / "cache") != first  # the file changed
    out = tmp_path / "corpus.jsonl"
    main([str(run_dir), "--part", "samples", "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == {
        "rows": 1,
        "documents": 1,
        "student_agrees": None,
        "out": str(out),
    }
    assert json.loads(out.read_text())["text"] == "Q: 6+6\nA: \\boxed{12}"
    with pytest.raises(SystemExit, match=r"soar-corpus: .*hold\(s\) no"):
        (run_dir / PARTS["pq"]).write_text("")
        main([str(run_dir), "--out", str(out)])
    assert write_corpus([], tmp_path / "empty.jsonl").read_text() == ""
