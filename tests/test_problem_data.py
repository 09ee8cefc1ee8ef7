"""Tests of the problem data layer (lit_selfimprove.datamodules.problems) on the real shared data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lit_selfimprove.datamodules.problem_sources import load_problems, split_problems
from lit_selfimprove.datamodules.problems import ProblemDataModule, collate_problems
from lit_selfimprove.rewards import extract_boxed as _last_boxed  # the one boxed-answer parser
from tests.helpers import MATH500, REPO, SHARED_DATA, write_jsonl

HARP_ZIP = SHARED_DATA / "harp" / "HARP.jsonl.zip"
OLYMPIAD = SHARED_DATA / "olympiadbench" / "test.jsonl"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared data file missing: {path} (expected shared/ as a sibling of the repo root)")
    return path


def _raw_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ loaders


def test_math500_real_file():
    path = _need(MATH500)
    raw = _raw_lines(path)
    for fmt in ("auto", "math"):
        records, skipped = load_problems(str(path), format=fmt)
        assert (len(records), skipped) == (500, 0)
        assert records[0] == {
            "id": "test/precalculus/807.json",
            "question": raw[0]["problem"].strip(),
            "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        }
        assert [r["answer"] for r in records] == [r["answer"].strip() for r in raw]
        assert len({r["id"] for r in records}) == 500
    limited, _ = load_problems(str(path), limit=7)
    assert [r["id"] for r in limited] == [r["unique_id"] for r in raw[:7]]


def test_math500_boxed_answers_match_answer_field(tmp_path, capsys):
    path = _need(MATH500)
    raw = _raw_lines(path)
    stripped = write_jsonl(
        tmp_path / "math500_noanswer.jsonl", [{k: v for k, v in r.items() if k != "answer"} for r in raw]
    )
    records, skipped = load_problems(str(stripped))  # auto: problem + solution -> math
    assert (len(records), skipped) == (500, 0)
    agree = sum(rec["answer"] == r["answer"].strip() for rec, r in zip(records, raw))
    rate = agree / len(raw)
    with capsys.disabled():
        print(f"\nMATH-500 boxed-vs-answer agreement: {agree}/{len(raw)} = {rate:.1%}")
    assert rate >= 0.95
    # an empty answer field also falls back to the box; ids fall back to <stem>-<line> without unique_id
    rows = [
        {"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$", "answer": ""},
        {"problem": "q", "solution": "\\boxed{7}"},
    ]
    recs, _ = load_problems(str(write_jsonl(tmp_path / "tiny.jsonl", rows)), format="math")
    assert recs == [
        {"id": "tiny-1", "question": "p", "answer": "\\frac{1}{2}"},
        {"id": "tiny-2", "question": "q", "answer": "7"},
    ]


def test_last_boxed_balanced_braces():
    assert _last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert _last_boxed("$\\boxed{\\left\\{1,2\\right\\}}$") == "\\left\\{1,2\\right\\}"
    assert (
        _last_boxed("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}")
        == "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"
    )
    assert _last_boxed("so \\boxed 5$.") == "5"
    assert _last_boxed("\\fbox{x+1}") == "x+1"
    assert _last_boxed("no box") is None
    assert _last_boxed("\\boxed{unclosed") is None


def test_harp_zip_real_file(tmp_path):
    path = _need(HARP_ZIP)
    with zipfile.ZipFile(path) as zf:
        raw = [json.loads(line) for line in zf.read("HARD-Math.jsonl").decode().splitlines() if line.strip()]
    assert len(raw) == 4780
    for fmt in ("auto", "harp"):
        records, skipped = load_problems(str(path), format=fmt)
        assert (len(records), skipped) == (4780, 0)
    assert records[0] == {
        "id": "1950-AHSME-1",
        "question": raw[0]["problem"],
        "answer": "10\\frac{2}{3}",
    }
    assert len({r["id"] for r in records}) == 4780
    assert not [r["answer"] for r in records if r["answer"].startswith("$") or r["answer"].endswith("$")]
    assert sum(r["answer"] == a["answer"].strip("$") for r, a in zip(records, raw)) > 4700
    # the unzipped jsonl is auto-detected as HARP too
    unzipped = write_jsonl(tmp_path / "HARD-Math.jsonl", raw[:50])
    again, _ = load_problems(str(unzipped))
    assert again == records[:50]


def test_olympiadbench_real_file(tmp_path):
    path = _need(OLYMPIAD)
    raw = _raw_lines(path)
    for fmt in ("auto", "olympiadbench"):
        records, skipped = load_problems(str(path), format=fmt)
        assert (len(records), skipped) == (675, 0)
    assert records[0]["id"] == "1606"
    assert records[0]["answer"] == "2"
    assert records[0]["question"].startswith("Xenia and Sergey play the following game.")
    assert [r["id"] for r in records] == [str(r["id"]) for r in raw]
    assert not [r["answer"] for r in records if "$" in r["answer"]]
    # several answers are joined with ", "; a context is prepended to the question
    row = {"id": 9, "question": "Q?", "context": "Ctx.", "final_answer": ["$1$", "$\\frac{3}{2}$"]}
    recs, _ = load_problems(str(write_jsonl(tmp_path / "ob.jsonl", [row])))
    assert recs == [{"id": "9", "question": "Ctx.\n\nQ?", "answer": "1, \\frac{3}{2}"}]


def test_generic_jsonl_custom_fields(tmp_path):
    rows = [
        {"uid": "a", "prompt": "What is 1+1?", "target": 2},
        {"uid": "b", "prompt": "What is 2+2?", "target": "4"},
    ]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    records, skipped = load_problems(
        str(path), format="jsonl", question_field="prompt", answer_field="target", id_field="uid"
    )
    assert skipped == 0
    assert records == [
        {"id": "a", "question": "What is 1+1?", "answer": "2"},
        {"id": "b", "question": "What is 2+2?", "answer": "4"},
    ]
    # without an id field the id is <stem>-<line>
    recs, _ = load_problems(str(path), format="jsonl", question_field="prompt", answer_field="target")
    assert [r["id"] for r in recs] == ["custom-1", "custom-2"]
    with pytest.raises(ValueError, match=r"custom\.jsonl.*line 1.*'question'"):
        load_problems(str(path), format="jsonl")


def test_failk_hardset_file_is_generic_jsonl(tmp_path):
    rows = [{"id": f"p{i}", "question": f"q{i}", "answer": str(i)} for i in range(4)]
    path = write_jsonl(tmp_path / "hard.jsonl", rows)
    for fmt in ("auto", "jsonl"):
        records, skipped = load_problems(str(path), format=fmt)
        assert (records, skipped) == (rows, 0)


def test_hub_format_local_folders(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    rows = [
        {"problem": "What is 1+1?", "solution": "It is $\\boxed{2}$.", "answer": "2", "unique_id": "u1"},
        {"problem": "What is 2+2?", "solution": "It is $\\boxed{4}$.", "answer": "", "unique_id": "u2"},
        {"problem": "What is 3+3?", "solution": "So \\boxed{6}.", "answer": "6", "unique_id": "u3"},
    ]
    expected = [
        {"id": "u1", "question": "What is 1+1?", "answer": "2"},
        {"id": "u2", "question": "What is 2+2?", "answer": "4"},
        {"id": "u3", "question": "What is 3+3?", "answer": "6"},
    ]
    folder = tmp_path / "math_copy"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_json(str(folder / "test.jsonl"))
    for fmt in ("auto", "hub"):
        assert load_problems(str(folder), format=fmt, split="test") == (expected, 0)
    with pytest.raises(ValueError, match="split 'train'"):
        load_problems(str(folder), format="hub", split="train")

    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    assert load_problems(str(saved), split="test") == (expected, 0)

    # custom field names and the <name>-<split>-<row> fallback id
    custom = tmp_path / "custom"
    datasets.Dataset.from_list([{"prompt": "x?", "gold": 5}, {"prompt": "y?", "gold": 6}]).save_to_disk(
        str(custom)
    )
    recs, _ = load_problems(
        str(custom), format="hub", question_field="prompt", answer_field="gold", split="train"
    )
    assert recs == [
        {"id": "custom-train-0", "question": "x?", "answer": "5"},
        {"id": "custom-train-1", "question": "y?", "answer": "6"},
    ]


def test_hub_format_repo_id_uses_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return datasets.Dataset.from_list(
            [
                {"problem": "P1", "solution": "\\boxed{1}", "level": "Level 1", "type": "Algebra"},
                {
                    "problem": "P2",
                    "solution": "a \\boxed{x} b \\boxed{\\sqrt{2}}",
                    "level": "Level 5",
                    "type": "Algebra",
                },
                {"problem": "", "solution": "\\boxed{3}", "level": "Level 2", "type": "Algebra"},
            ]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records, skipped = load_problems("someone/competition_math", split="train", skip_malformed=True)
    assert calls == [("someone/competition_math", "train")]
    assert skipped == 1
    assert records == [
        {"id": "competition_math-train-0", "question": "P1", "answer": "1"},
        {"id": "competition_math-train-1", "question": "P2", "answer": "\\sqrt{2}"},
    ]
    with pytest.raises(ValueError, match=r"someone/competition_math.*row 3.*empty question"):
        load_problems("someone/competition_math", format="hub", split="train")


def test_auto_rejects_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_problems(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="unknown problem format"):
        load_problems(str(tmp_path / "nope.jsonl"), format="csv")


# -------------------------------------------------------------------------------------------- malformed


def test_malformed_lines_raise_with_file_and_line(tmp_path):
    good = {"id": "a", "question": "q", "answer": "1"}
    cases = {
        3: '{"id": "b", "question": "q2", ',  # invalid JSON
        4: {"id": "c", "answer": "3"},  # missing question
        5: {"id": "d", "question": "q4", "answer": "  "},  # empty answer
        6: {"id": "a", "question": "dup", "answer": "1"},  # duplicate id
        7: "[1, 2]",  # not an object
    }
    for lineno, bad in cases.items():
        rows = (
            [good, ""] + [{"id": f"x{i}", "question": "q", "answer": "1"} for i in range(lineno - 3)] + [bad]
        )
        path = write_jsonl(tmp_path / f"bad{lineno}.jsonl", rows)
        with pytest.raises(ValueError, match=rf"bad{lineno}\.jsonl.* line {lineno}\b"):
            load_problems(str(path), format="jsonl")

    rows = [
        good,
        cases[3],
        cases[4],
        cases[5],
        {"id": "e", "question": "q5", "answer": "5"},
        cases[6],
        cases[7],
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    records, skipped = load_problems(str(path), format="jsonl", skip_malformed=True)
    assert [r["id"] for r in records] == ["a", "e"]
    assert skipped == 5


def test_malformed_real_harp_line_in_zip(tmp_path):
    path = _need(HARP_ZIP)
    with zipfile.ZipFile(path) as zf:
        lines = zf.read("HARD-Math.jsonl").decode().splitlines()[:20]
    lines[11] = lines[11][:40]  # truncate line 12
    broken = tmp_path / "HARP.jsonl.zip"
    with zipfile.ZipFile(broken, "w") as zf:
        zf.writestr("HARD-Math.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"HARP\.jsonl\.zip:HARD-Math\.jsonl.*line 12"):
        load_problems(str(broken))
    records, skipped = load_problems(str(broken), skip_malformed=True)
    assert (len(records), skipped) == (19, 1)


def test_empty_sources_raise(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_problems(str(empty), format="jsonl")
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_problems(str(empty))
    allbad = write_jsonl(tmp_path / "allbad.jsonl", ["{oops", {"question": "", "answer": "1"}])
    with pytest.raises(ValueError, match=r"allbad\.jsonl.*2 malformed skipped"):
        load_problems(str(allbad), format="jsonl", skip_malformed=True)


# ------------------------------------------------------------------------------------------------ split


def _records(n: int) -> list[dict]:
    return [{"id": f"id-{i:04d}", "question": f"q{i}", "answer": str(i)} for i in range(n)]


def test_split_deterministic_disjoint_covering():
    recs = _records(101)
    train, test = split_problems(recs, 0.5, seed=0)
    assert (len(train), len(test)) == (51, 50)
    ids_train, ids_test = [r["id"] for r in train], [r["id"] for r in test]
    assert not set(ids_train) & set(ids_test)
    assert sorted(ids_train + ids_test) == [r["id"] for r in recs]
    # same seed -> same split, whatever the input order; different seed -> different split
    assert split_problems(list(reversed(recs)), 0.5, seed=0) == (train, test)
    assert split_problems(recs, 0.5, seed=1) != (train, test)
    assert {r["id"] for r in split_problems(recs, 0.5, seed=1)[1]} != set(ids_test)
    even_train, even_test = split_problems(_records(100), 0.5, seed=3)
    assert (len(even_train), len(even_test)) == (50, 50)
    assert [len(p) for p in split_problems(_records(10), 0.2, seed=0)] == [8, 2]


def test_split_independent_of_hash_seed():
    code = (
        "import json\n"
        "from lit_selfimprove.datamodules.problem_sources import split_problems\n"
        "ids = set(f'id-{i:04d}' for i in range(101))\n"  # set order depends on PYTHONHASHSEED
        "recs = [{'id': i, 'question': 'q' + i, 'answer': i[3:]} for i in ids]\n"
        "train, test = split_problems(recs, 0.5, seed=0)\n"
        "print(json.dumps([r['id'] for r in test]))\n"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        outputs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    _, test = split_problems(_records(101), 0.5, seed=0)
    assert outputs[0] == outputs[1] == [r["id"] for r in test]


# ---------------------------------------------------------------------------------------- data module


def test_datamodule_end_to_end_math500():
    path = _need(MATH500)
    dm = ProblemDataModule(
        train_source=str(path), batch_size=8, val_batch_size=16, val_limit=20, split_seed=0
    )
    assert dm.train_records == [] and dm.test_records == []  # nothing loaded before setup
    dm.setup("fit")
    assert (len(dm.train_records), len(dm.test_records)) == (250, 250)
    assert dm.test_records == split_problems(load_problems(str(path))[0], 0.5, seed=0)[1]

    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"id", "question", "answer"}
    assert all(isinstance(v, list) and len(v) == 8 for v in batch.values())
    by_id = {r["id"]: r for r in dm.train_records}
    for rid, q, a in zip(batch["id"], batch["question"], batch["answer"]):
        assert by_id[rid] == {"id": rid, "question": q, "answer": a}
    # one pass: 32 full batches (250 problems, the last batch borrows 6 from the next pass)
    ids = [i for b in dm.train_dataloader() for i in b["id"]]
    assert len(ids) == 256 and set(ids[:250]) == set(by_id) and len(set(ids[:250])) == 250

    val = list(dm.val_dataloader())
    assert [len(b["id"]) for b in val] == [16, 4]
    assert [i for b in val for i in b["id"]] == [r["id"] for r in dm.test_records[:20]]
    assert sum(len(b["id"]) for b in dm.test_dataloader()) == 250

    # same seed -> same training order; the split depends on split_seed
    dm2 = ProblemDataModule(train_source=str(path), batch_size=8, split_seed=0)
    dm2.setup("fit")
    assert next(iter(dm2.train_dataloader()))["id"] == batch["id"]
    dm3 = ProblemDataModule(train_source=str(path), split_seed=1)
    dm3.setup("fit")
    assert {r["id"] for r in dm3.test_records} != {r["id"] for r in dm.test_records}


def test_datamodule_sources_and_errors(tmp_path):
    rows = [{"id": f"p{i}", "question": f"q{i}", "answer": str(i)} for i in range(10)]
    train = write_jsonl(tmp_path / "hard.train.jsonl", rows[:6])
    test = write_jsonl(tmp_path / "hard.test.jsonl", rows[6:])

    dm = ProblemDataModule(
        train_source=str(train), test_source=str(test), use_split=False, shuffle=False, batch_size=4
    )
    dm.setup("fit")
    assert dm.train_records == rows[:6] and dm.test_records == rows[6:]
    assert [b["id"] for b in dm.train_dataloader()] == [["p0", "p1", "p2", "p3"], ["p4", "p5", "p0", "p1"]]

    whole = ProblemDataModule(train_source=str(train), use_split=False)
    whole.setup("fit")
    assert whole.train_records == rows[:6] and whole.test_records == rows[:6]

    evaluate = ProblemDataModule(test_source=str(test))
    evaluate.setup("validate")
    assert evaluate.test_records == rows[6:]
    with pytest.raises(ValueError, match="train_source"):
        evaluate.setup("fit")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    dm_empty = ProblemDataModule(train_source=str(empty))  # no loading (nor error) in __init__
    with pytest.raises(ValueError, match="empty.jsonl"):
        dm_empty.setup("fit")

    single = write_jsonl(tmp_path / "one.jsonl", rows[:1])
    with pytest.raises(ValueError, match="empty train or test set"):
        ProblemDataModule(train_source=str(single)).setup("fit")

    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:3] + ["{broken"])
    with pytest.raises(ValueError, match=r"bad\.jsonl.*line 4"):
        ProblemDataModule(train_source=str(bad)).setup("fit")
    skipping = ProblemDataModule(train_source=str(bad), skip_malformed=True, test_fraction=1 / 3)
    skipping.setup("fit")
    assert (len(skipping.train_records), len(skipping.test_records)) == (2, 1)


def test_datamodule_jsonargparse_friendly():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ProblemDataModule, "data")
    cfg = parser.parse_args(
        ["--data.train_source", "x.jsonl", "--data.val_limit", "5", "--data.use_split", "false"]
    )
    assert cfg.data.train_source == "x.jsonl" and cfg.data.val_limit == 5 and cfg.data.use_split is False
    assert cfg.data.hub_split == "test" and cfg.data.test_fraction == 0.5
    help_text = " ".join(parser.format_help().split())  # docstring descriptions show up in --help
    assert "Fraction of ``train_source`` held out as the test set when splitting." in help_text
    assert "Use at most this many test problems for validation (None: all)." in help_text


def test_collate_problems():
    batch = collate_problems(
        [{"id": "a", "question": "q", "answer": "1"}, {"id": "b", "question": "r", "answer": "2"}]
    )
    assert batch == {"id": ["a", "b"], "question": ["q", "r"], "answer": ["1", "2"]}


def _pq_and_datamodule(tmp_path, **kwargs):
    pq = tmp_path / "pq.jsonl"
    pq.write_text(
        "".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1), "step": 0}) + "\n" for i in range(6))
    )
    dm = ProblemDataModule(
        train_source="builtin:tiny-hard-train",
        test_source="builtin:tiny-hard-test",
        extra_train_sources=[str(pq)],
        **kwargs,
    )
    dm.setup("fit")
    return pq, dm


def test_mixed_extra_sources_join_the_training_set(tmp_path):
    """SOAR-PQ (HARP): promotion questions (no ids) + D_train in one stream."""
    pq, dm = _pq_and_datamodule(tmp_path, extra_order="mixed", batch_size=6)
    total = len(dm.train_records)
    assert dm.num_extra == 6 and total == len(load_problems("builtin:tiny-hard-train")[0]) + 6
    assert len({r["id"] for r in dm.train_records}) == total  # ids made unique
    stream = dm.train_dataloader().dataset
    seen = [dm.train_records[i]["question"] for k in range(2 * total // 6) for i in stream.batch_indices(k)]
    assert sum(q.endswith("+1") for q in seen) == 12  # every problem once per pass
    assert not all(q.endswith("+1") for q in next(iter(dm.train_dataloader()))["question"])
    with pytest.raises(ValueError, match="extra_order"):
        ProblemDataModule(train_source=str(pq), extra_order="random")


def test_curriculum_is_the_first_n_steps_on_the_extra_sources_only(tmp_path):
    """SOAR-PQ (MATH): N batches of synthetic problems only, then D_train only (not PQ every epoch)."""
    _, dm = _pq_and_datamodule(tmp_path, extra_order="curriculum", curriculum_steps=4, batch_size=4)
    stream = dm.train_dataloader().dataset
    batches = [[dm.train_records[i]["question"] for i in stream.batch_indices(k)] for k in range(4 + 5)]
    assert all(len(b) == 4 for b in batches)
    assert all(q.endswith("+1") for b in batches[:4] for q in b)  # 16 draws from the 6 PQ problems
    assert all(not q.endswith("+1") for b in batches[4:] for q in b)
    # ... and so it stays: no later pass over the training set brings PQ back
    late = [dm.train_records[i]["question"] for k in range(4, 200) for i in stream.batch_indices(k)]
    assert not any(q.endswith("+1") for q in late)
    assert len(set(batches[0] + batches[1][:2])) == 6  # a full pass of the 6 PQ problems first


def test_every_batch_is_full_and_resumes_at_the_global_step():
    """Q_R: |Q_R| problems every outer step, also at the end of a pass and after a resume."""
    dm = ProblemDataModule(
        train_source="builtin:tiny-hard-train", test_source="builtin:tiny-hard-test", batch_size=16
    )
    dm.setup("fit")
    n = len(dm.train_records)
    assert n % 16  # (so that a plain epoch would end with a short batch)
    stream = dm.train_dataloader().dataset
    walk = [stream.batch_indices(k) for k in range(3 * len(stream))]
    assert all(len(b) == 16 for b in walk)
    flat = [i for b in walk for i in b]
    assert sorted(flat[:n]) == list(range(n))  # each problem once per pass
    # resuming at global step 5 yields exactly batches 5, 6, ...
    stream.start = lambda: 5
    resumed = [b["id"] for b in stream]
    assert resumed[0] == [dm.train_records[i]["id"] for i in walk[5]]
    assert [dm.train_records[i]["id"] for i in walk[6]] == resumed[1]
    # two ranks draw disjoint halves of the global batch
    r0, r1 = stream.batch_indices(3, world=2, rank=0), stream.batch_indices(3, world=2, rank=1)
    assert r0 + r1 == stream._indices(0, 0, n, 6 * 16, 8 * 16)


def test_a_source_of_random_bytes_or_a_typo_names_the_file(tmp_path):
    noise = tmp_path / "noise.jsonl"
    noise.write_bytes(bytes(range(128, 256)) * 4 + b"\n" + b'{"question": "1+1", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"noise.jsonl: malformed record at line 1: invalid UTF-8"):
        load_problems(str(noise))
    records, skipped = load_problems(str(noise), skip_malformed=True)
    assert skipped == 1 and records[0]["question"] == "1+1"
    # a typo'd local file is not tried as a hub id (which would fail after ~30 s without network)
    with pytest.raises(FileNotFoundError, match=r"data/hard.jsnol.*no such file"):
        load_problems("data/hard.jsnol")


def test_located_records_name_their_file_and_line(tmp_path):
    """Each record's file:line, past blank and skipped lines: for errors found after loading
    (too-long prompts)."""
    from lit_selfimprove.datamodules.problem_sources import load_located_problems

    rows = [
        {"id": "a", "question": "q1", "answer": "1"},
        "",
        "{not json",
        {"id": "b", "question": "q2", "answer": "2"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    records, skipped, origins = load_located_problems(str(path), skip_malformed=True)
    assert [r["id"] for r in records] == ["a", "b"] and skipped == 1
    assert origins == [f"{path}:1", f"{path}:4"]
    zipped = tmp_path / "HARP.jsonl.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("HARD-Math.jsonl", path.read_text())
    _, _, origins = load_located_problems(str(zipped), format="jsonl", skip_malformed=True)
    assert origins == [f"{zipped}:HARD-Math.jsonl:1", f"{zipped}:HARD-Math.jsonl:4"]
    dm = ProblemDataModule(
        train_source=str(path), test_source=str(zipped), format="jsonl", skip_malformed=True
    )
    dm.setup("fit")
    assert dm.origin(dm.train_records[1]) == f"{path}:4"
    assert dm.origin(dm.test_records[1], "test") == f"{zipped}:HARD-Math.jsonl:4"


def test_levels_keep_only_those_math_levels_before_the_split(tmp_path):
    path = _need(MATH500)
    raw = _raw_lines(path)
    easy_ids = {r["unique_id"] for r in raw if r["level"] in (1, 2)}
    dm = ProblemDataModule(train_source=str(path), levels=[1, 2], test_fraction=0.5, split_seed=0)
    dm.setup("fit")
    train_ids, test_ids = {r["id"] for r in dm.train_records}, {r["id"] for r in dm.test_records}
    assert train_ids | test_ids == easy_ids and not train_ids & test_ids  # only levels 1-2, all of them
    # the split is that of the filtered records (reproducible from them and the seed alone)
    easy = [r for r in load_problems(str(path))[0] if r["id"] in easy_ids]
    assert (dm.train_records, dm.test_records) == split_problems(easy, 0.5, seed=0)
    # MATH's own "Level 3" strings work too; limit counts kept records
    rows = [dict(r, level=f"Level {r['level']}") for r in raw[:40]]
    records, _ = load_problems(str(write_jsonl(tmp_path / "math.jsonl", rows)), levels=[3], limit=2)
    assert [r["id"] for r in records] == [r["unique_id"] for r in raw[:40] if r["level"] == 3][:2]


def test_levels_errors_name_the_problem(tmp_path):
    rows = [{"id": f"p{i}", "question": f"q{i}", "answer": str(i)} for i in range(4)]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    with pytest.raises(ValueError, match=r"plain\.jsonl:1.*no 'level' field"):
        ProblemDataModule(train_source=str(plain), levels=[1]).setup("fit")
    rated = write_jsonl(tmp_path / "rated.jsonl", [dict(r, level=5) for r in rows])
    with pytest.raises(ValueError, match=r"none has a level in \[1, 2\] \(levels in the source: 5\)"):
        ProblemDataModule(train_source=str(rated), levels=[1, 2]).setup("fit")
    for bad in ([], ["1"]):
        with pytest.raises(ValueError, match="levels must be a non-empty list of ints"):
            ProblemDataModule(train_source=str(rated), levels=bad)
