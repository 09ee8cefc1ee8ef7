"""fail@k builder: keeps exactly the 0/k problems, splits them, and resumes after a crash
with the same result as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from lit_selfimprove.datamodules.arithmetic import generate_problems
from lit_selfimprove.failk import build_fail_at_k
from lit_selfimprove.failk import main as failk_main
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer
from tests.helpers import needs_assets

PROMPT = "Q: {question}\nA: "


class FirstCharDigit:
    """'Correct' when the completion starts with a digit: depends on the samples drawn."""

    def __init__(self, crash_after: int | None = None):
        self.calls, self.crash_after = 0, crash_after

    def score(self, completions, answers):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        correct = torch.tensor([bool(c) and c[0].isdigit() for c in completions])
        return correct.float(), correct


def _read(path):
    return [json.loads(line) for line in open(path)]


def _progress(path):
    """The per-problem rows of a progress file (its first line records the settings)."""
    return [row for row in _read(path) if "failk_settings" not in row]


@pytest.fixture()
def setup(tiny_random_lm):
    return load_causal_lm(tiny_random_lm), load_tokenizer(tiny_random_lm), generate_problems([2], 20, seed=0)


def _build(setup, out, reward, **kw):
    model, tok, records = setup
    return build_fail_at_k(
        model, tok, records, reward, out, k=8, max_new_tokens=3, prompt_template=PROMPT,
        problems_per_batch=4, samples_per_round=4, progress=False, **kw,
    )  # fmt: skip


def test_keeps_only_unsolved_problems_and_splits_them(setup, tmp_path):
    summary = _build(setup, tmp_path / "hard.jsonl", FirstCharDigit())
    progress = {r["id"]: r for r in _progress(tmp_path / "hard.jsonl.progress.jsonl")}
    hard = _read(tmp_path / "hard.jsonl")
    assert {r["id"] for r in hard} == {i for i, r in progress.items() if r["correct"] == 0}
    assert 0 < len(hard) < 20, "the fixture should give a mix of solved and unsolved problems"
    # unsolved problems got all k samples; solved ones stopped early at the first success
    assert all(progress[r["id"]]["n"] == 8 for r in hard)
    assert all(r["n"] in (4, 8) for r in progress.values() if r["correct"] > 0)
    train, test = _read(tmp_path / "hard.train.jsonl"), _read(tmp_path / "hard.test.jsonl")
    assert sorted(r["id"] for r in train + test) == sorted(r["id"] for r in hard)
    assert abs(len(train) - len(test)) <= 1
    assert summary["hard"] == len(hard) and set(hard[0]) == {"id", "question", "answer"}


def test_resume_after_crash_gives_the_same_result(setup, tmp_path):
    _build(setup, tmp_path / "full" / "hard.jsonl", FirstCharDigit())
    with pytest.raises(KeyboardInterrupt):
        _build(setup, tmp_path / "cut" / "hard.jsonl", FirstCharDigit(crash_after=3))
    partial = _progress(tmp_path / "cut" / "hard.jsonl.progress.jsonl")
    assert 0 < len(partial) < 20 and not (tmp_path / "cut" / "hard.jsonl").exists()
    with open(tmp_path / "cut" / "hard.jsonl.progress.jsonl", "a") as f:
        f.write('{"id": "arith-L2-')  # a line cut mid-write by the crash
    resumed = FirstCharDigit()
    _build(setup, tmp_path / "cut" / "hard.jsonl", resumed)
    assert _read(tmp_path / "cut" / "hard.jsonl") == _read(tmp_path / "full" / "hard.jsonl")
    rows = [
        json.loads(line)
        for line in open(tmp_path / "cut" / "hard.jsonl.progress.jsonl")
        if line.endswith("}\n") and "failk_settings" not in line
    ]
    assert len({r["id"] for r in rows}) == len(rows) == 20  # nothing duplicated, nothing lost
    full_calls = FirstCharDigit()
    _build(setup, tmp_path / "again" / "hard.jsonl", full_calls)
    assert resumed.calls < full_calls.calls  # finished chunks were not sampled again


# ------------------------------------------------------------------ a progress file made otherwise
def test_a_progress_file_of_another_k_is_refused_naming_both_values(setup, tmp_path):
    out = tmp_path / "hard.jsonl"
    _build(setup, out, FirstCharDigit())
    before = out.read_text()
    model, tok, records = setup
    with pytest.raises(ValueError) as err:
        build_fail_at_k(
            model, tok, records, FirstCharDigit(), out, k=16, max_new_tokens=3, prompt_template=PROMPT,
            problems_per_batch=4, samples_per_round=4, progress=False,
        )  # fmt: skip
    message = str(err.value)
    assert "hard.jsonl.progress.jsonl" in message and "k: 8 there, 16 now" in message
    assert "start fresh" in message
    assert out.read_text() == before  # nothing written as a "fail@16" set


def test_a_progress_file_of_another_model_is_refused(setup, tmp_path):
    out = tmp_path / "hard.jsonl"
    _build(setup, out, FirstCharDigit())
    model, tok, records = setup
    other = load_causal_lm("builtin:tiny-student")
    with pytest.raises(ValueError, match=r"model: '.*tiny_random_lm.*' there, '.*tiny-student' now"):
        build_fail_at_k(
            other, tok, records, FirstCharDigit(), out, k=8, max_new_tokens=3, prompt_template=PROMPT,
            problems_per_batch=4, samples_per_round=4, progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="problems_digest: "):  # other problems (another --source / --limit)
        _build((model, tok, records[:10]), out, FirstCharDigit())


def test_a_progress_file_without_its_settings_is_refused(setup, tmp_path):
    """An older failk's progress file: its counts cannot be shown to match, so it is not reused."""
    out = tmp_path / "hard.jsonl"
    out.with_name("hard.jsonl.progress.jsonl").write_text('{"id": "arith-L2-0", "n": 16, "correct": 0}\n')
    with pytest.raises(
        ValueError, match=r"no record of the k, model and sampling settings.*delete .* start fresh"
    ):
        _build(setup, out, FirstCharDigit())
    assert not out.exists()


# ------------------------------------------------------------------------------ the command line
@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model fails the test: what is checked must be checked before it."""
    import lit_selfimprove.modeling

    def load(*a, **kw):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(lit_selfimprove.modeling, "load_causal_lm", load)


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--k", "0", "an integer >= 1"),
        ("--k", "-3", "an integer >= 1"),
        ("--max-new-tokens", "0", "an integer >= 1"),
        ("--problems-per-batch", "0", "an integer >= 1"),
        ("--samples-per-round", "-1", "an integer >= 1"),
        ("--limit", "0", "an integer >= 1"),
        ("--temperature", "-0.5", "a number >= 0"),
        ("--test-fraction", "1", "a number strictly between 0 and 1"),
        ("--seed", "-1", "an integer >= 0"),
        ("--k", "many", "an integer >= 1, got 'many'"),
    ],
)
def test_bad_numbers_are_refused_when_parsed(no_model, tmp_path, capsys, flag, value, expected):
    argv = [
        "--model",
        "builtin:tiny-student",
        "--source",
        "builtin:tiny-hard",
        "--out",
        str(tmp_path / "h.jsonl"),
    ]
    with pytest.raises(SystemExit):
        failk_main([*argv, flag, value])
    assert f"argument {flag}: expected {expected}" in capsys.readouterr().err


def _long_source(tmp_path):
    rows = [{"id": f"p{i}", "question": f"{i}+{i}", "answer": str(2 * i)} for i in range(4)]
    rows.insert(2, {"id": "long", "question": "1+" * 1500 + "1", "answer": "1501"})  # 3,001 characters
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@needs_assets("tiny-student")
def test_a_prompt_over_the_context_is_refused_before_the_model_loads(no_model, tmp_path):
    source = _long_source(tmp_path)
    argv = ["--model", "builtin:tiny-student", "--source", str(source), "--out", str(tmp_path / "h.jsonl")]
    with pytest.raises(
        ValueError, match=rf"{source}:3: the prompt is \d+ tokens.*max_position_embeddings=256"
    ):
        failk_main([*argv, "--prompt-template", PROMPT, "--max-new-tokens", "80"])
    with pytest.raises(SystemExit):  # a template without {question} samples one prompt for every problem
        failk_main([*argv, "--prompt-template", "Q: A: "])


@needs_assets("tiny-student")
def test_too_long_skip_drops_and_counts_the_long_problem(tmp_path, monkeypatch):
    import lit_selfimprove.failk as failk

    seen = {}
    monkeypatch.setattr(
        failk, "build_fail_at_k", lambda model, tok, records, *a, **kw: seen.update(r=records) or {}
    )
    source = _long_source(tmp_path)
    argv = ["--model", "builtin:tiny-student", "--source", str(source), "--out", str(tmp_path / "h.jsonl")]
    with pytest.warns(UserWarning, match=rf"skipped 1 of 5 problems .*{source}:3"):
        failk_main([*argv, "--prompt-template", PROMPT, "--max-new-tokens", "80", "--too-long", "skip"])
    assert [r["id"] for r in seen["r"]] == ["p0", "p1", "p2", "p3"]


def _math_source(tmp_path):
    """A MATH-format file: 12 problems over levels 1-3."""
    rows = [
        {"problem": f"What is {i}+{i}?", "answer": str(2 * i), "level": 1 + i % 3, "unique_id": f"m{i}"}
        for i in range(12)
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@needs_assets("tiny-student")
def test_levels_and_source_part_sample_the_train_half_a_problem_data_module_makes(tmp_path, monkeypatch):
    import lit_selfimprove.failk as failk
    from lit_selfimprove.datamodules import ProblemDataModule

    seen = {}
    monkeypatch.setattr(
        failk, "build_fail_at_k", lambda model, tok, records, *a, **kw: seen.update(r=records, kw=kw) or {}
    )
    source = _math_source(tmp_path)
    out = str(tmp_path / "h.jsonl")
    argv = ["--model", "builtin:tiny-student", "--source", str(source), "--out", out, "--max-new-tokens", "8"]
    failk_main([*argv, "--prompt-template", PROMPT, "--levels", "1", "2", "--source-part", "train"])
    data = ProblemDataModule(train_source=str(source), levels=[1, 2], test_fraction=0.5, split_seed=0)
    data.setup("fit")
    train = [r["id"] for r in seen["r"]]
    assert sorted(train) == sorted(r["id"] for r in data.train_records)
    assert not set(train) & {r["id"] for r in data.test_records}  # no test problem of that split leaks
    assert len(train) == 4  # 8 problems at levels 1-2, half of them
    assert "levels=[1, 2] part=train" in seen["kw"]["source"]  # recorded with the progress settings
    failk_main([*argv, "--prompt-template", PROMPT, "--levels", "1", "2", "--source-part", "test"])
    assert sorted(r["id"] for r in seen["r"]) == sorted(r["id"] for r in data.test_records)


def test_the_progress_bar_counts_kept_and_solved_problems(setup, tmp_path, monkeypatch):
    import lit_selfimprove.failk as failk

    model, tok, records = setup
    shown = []

    class Bar:  # what tqdm displays: the postfix at each update
        def __init__(self, *a, postfix=None, **kw):
            self.postfix = dict(postfix or {})

        def set_postfix(self, counts, refresh=True):
            self.postfix = dict(counts)

        def update(self, n=1):
            shown.append(dict(self.postfix))

        def close(self):
            pass

    monkeypatch.setattr(failk, "tqdm", Bar)
    summary = build_fail_at_k(
        model, tok, records, FirstCharDigit(), tmp_path / "h.jsonl", k=4, max_new_tokens=4,
        prompt_template=PROMPT, problems_per_batch=4, samples_per_round=2,
    )  # fmt: skip
    rows = _progress(tmp_path / "h.jsonl.progress.jsonl")
    assert len(shown) == 5
    # at each update the bar shows the counts of the problems finished, that batch included
    for i, counts in enumerate(shown):
        upto = rows[: 4 * (i + 1)]
        hard = sum(r["correct"] == 0 for r in upto)
        assert counts == {"hard": hard, "solved": len(upto) - hard}
    assert shown[-1] == {"hard": summary["hard"], "solved": 20 - summary["hard"]}
    assert 0 < summary["hard"] < 20
