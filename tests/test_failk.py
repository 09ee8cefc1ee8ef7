"""fail@k builder: keeps exactly the 0/k problems, splits them, and resumes after a crash
with the same result as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from lit_selfimprove.datamodules.arithmetic import generate_problems
from lit_selfimprove.failk import build_fail_at_k
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer

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
    progress = {r["id"]: r for r in _read(tmp_path / "hard.jsonl.progress.jsonl")}
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
    partial = _read(tmp_path / "cut" / "hard.jsonl.progress.jsonl")
    assert 0 < len(partial) < 20 and not (tmp_path / "cut" / "hard.jsonl").exists()
    with open(tmp_path / "cut" / "hard.jsonl.progress.jsonl", "a") as f:
        f.write('{"id": "arith-L2-')  # a line cut mid-write by the crash
    resumed = FirstCharDigit()
    _build(setup, tmp_path / "cut" / "hard.jsonl", resumed)
    assert _read(tmp_path / "cut" / "hard.jsonl") == _read(tmp_path / "full" / "hard.jsonl")
    rows = [
        json.loads(line)
        for line in open(tmp_path / "cut" / "hard.jsonl.progress.jsonl")
        if line.endswith("}\n")
    ]
    assert len({r["id"] for r in rows}) == len(rows) == 20  # nothing duplicated, nothing lost
    full_calls = FirstCharDigit()
    _build(setup, tmp_path / "again" / "hard.jsonl", full_calls)
    assert resumed.calls < full_calls.calls  # finished chunks were not sampled again
