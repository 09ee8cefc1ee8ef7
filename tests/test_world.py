"""The embedded tiny world: problems, scratchpads, the char tokenizer, the asset recipe."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest

from lit_selfimprove.datamodules.arithmetic import (
    ArithmeticProblemDataModule,
    generate_problems,
    make_problem,
    student_solution,
    teacher_text,
)
from lit_selfimprove.modeling import load_tokenizer
from lit_selfimprove.world import quick_correct
from lit_selfimprove.worlds.arithmetic import carries
from tests.helpers import REPO


def test_scratchpad_is_correct_and_grows_with_level():
    rng = random.Random(0)
    for level in range(1, 7):
        for _ in range(50):
            p = make_problem(level, rng)
            sol = student_solution(p["question"])
            assert quick_correct(sol, p["answer"])
            steps = sol.split(" ")[0].split(",")
            assert len(steps) == level  # one digit step per level
            a, b = (int(x) for x in p["question"].split("+"))
            assert len(str(a)) == len(str(b)) == level and int(p["answer"]) == a + b
    assert student_solution("345+678") == "5+8=13,4+7+1=12,3+6+1=10 \\boxed{1023}"


def test_problem_sets_are_deterministic_distinct_and_disjoint():
    a, b = generate_problems([3], 100, seed=1), generate_problems([3], 100, seed=1)
    assert a == b and len({p["question"] for p in a}) == 100
    c = generate_problems([3], 100, seed=2, exclude={p["question"] for p in a})
    assert not {p["question"] for p in a} & {p["question"] for p in c}
    with pytest.raises(ValueError, match="distinct"):
        generate_problems([1], 101, seed=0)  # only 10 x 10 one-digit problems exist
    dm = ArithmeticProblemDataModule(levels=[2], num_train=50, num_test=20)
    dm.setup("fit")
    assert not {r["question"] for r in dm.train_records} & {r["question"] for r in dm.test_records}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"id", "question", "answer"} and len(batch["question"]) == 8


def test_char_tokenizer_round_trips():
    tok = load_tokenizer("builtin:tiny-tokenizer")
    text = "Q: 12+34\nA: " + student_solution("12+34") + teacher_text("9+9", "18")
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id


@pytest.mark.slow
def test_asset_recipe_rebuilds_at_reduced_budget(tmp_path):
    """`python -m lit_selfimprove.world build` retrains both bases and rebuilds the hard set."""
    out = tmp_path / "assets"
    cmd = [
        sys.executable,
        "-m",
        "lit_selfimprove.world",
        "build",
        "--out-dir",
        str(out),
        "--steps",
        "300",
        "--k",
        "4",
    ]
    subprocess.run(cmd, check=True, cwd=REPO, timeout=1200)
    for name in ("tiny-tokenizer", "tiny-student", "tiny-teacher"):
        assert (out / name / "config.json").exists() or name == "tiny-tokenizer"
    evaluated = subprocess.run(
        [sys.executable, "-m", "lit_selfimprove.world", "eval", "--model", str(out / "tiny-student"), "--levels", "1", "--num", "50"],
        check=True, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    accuracy = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert accuracy["1"]["greedy"] >= 0.3, accuracy  # even a short build learns one-digit sums
    hard = [json.loads(line) for line in open(out / "tiny-hard" / "hard.jsonl")]
    assert hard and all(re.fullmatch(r"\d{5,6}\+\d{5,6}", r["question"]) for r in hard)
    assert (out / "tiny-hard" / "hard.train.jsonl").exists() and (
        out / "tiny-hard" / "hard.test.jsonl"
    ).exists()
    strict = [json.loads(line) for line in open(out / "tiny-hard" / "strict.jsonl")]
    assert strict and all(carries(r["question"]) >= 5 for r in strict)


def test_carries_counts_column_carries():
    assert [carries(q) for q in ("1+2", "5+5", "999+1", "555555+555555", "19+81", "123+456")] == [
        0,
        1,
        3,
        6,
        2,
        0,
    ]


def test_min_carries_draws_only_many_carry_sums_and_refuses_the_impossible():
    rows = generate_problems([5, 6], 50, seed=3, min_carries=5)
    assert len(rows) == 50 and all(carries(r["question"]) >= 5 for r in rows)
    assert rows == generate_problems([5, 6], 50, seed=3, min_carries=5)  # deterministic
    with pytest.raises(ValueError, match="at most"):
        generate_problems([2], 5, seed=0, min_carries=3)
    with pytest.raises(ValueError, match="found only"):
        generate_problems([1], 60, seed=0, min_carries=1)  # only 45 one-digit sums carry


def test_sloppy_solutions_forget_carries_consistently():
    rng = random.Random(0)
    wrong = 0
    for _ in range(200):
        p = make_problem(3, rng)
        sol = student_solution(p["question"], carry_drop=0.6, rng=rng)
        steps = sol.split(" ")[0].split(",")
        # each step's arithmetic is right; the boxed result is what the steps add up to
        digits, carry = [], 0
        for step in steps:
            terms, total = step.split("=")
            assert sum(int(t) for t in terms.split("+")) == int(total)
            digits.append(int(total) % 10)
            carry = int(total) // 10
        stated = int((str(carry) if carry else "") + "".join(str(d) for d in reversed(digits)))
        assert quick_correct(sol, str(stated))
        wrong += not quick_correct(sol, p["answer"])
    assert 40 < wrong < 160  # many, not all, sloppy solutions are wrong
    assert student_solution("999+1", carry_drop=1.0, rng=rng).endswith("\\boxed{990}")


@pytest.mark.slow
def test_the_main_job_soar_yaml_runs_end_to_end(tmp_path):
    """The README's first command: SOAR on the tiny world writes PQ, promoted students, the plot."""
    cmd = [
        sys.executable, "-m", "lit_selfimprove", "fit", "--config", "configs/tiny/soar.yaml",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "soar" / "version_0"
    printed = done.stdout + done.stderr
    assert str(run) in printed  # it says where its outputs are
    for name in ("metrics.csv", "soar.png", "config.yaml", "teacher/config.json"):
        assert (run / name).exists(), name
    pq = [json.loads(line) for line in open(run / "promotion_questions.jsonl")]
    students = sorted((run / "students").iterdir())
    assert pq and students, "SOAR promoted no student on the tiny world"
    assert len(pq) == 12 * len(students)  # one dataset of n = 12 pairs per promotion
    assert all((s / "model.safetensors").exists() for s in students)
    assert "promotion_questions.jsonl" in printed


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eval", "--num", "0"], "argument --num: expected an integer >= 1, got 0"),
        (["eval", "--samples", "-1"], "argument --samples: expected an integer >= 0, got -1"),
        (["eval", "--levels", "two"], "argument --levels: expected a level (an integer), got 'two'"),
        (
            ["export", "--levels", "1", "--num", "0", "--out", "x.jsonl"],
            "argument --num: expected an integer >= 1",
        ),
        (["export", "--levels", "1", "--num", "3", "--seed", "-1", "--out", "x.jsonl"], "argument --seed"),
        (["build", "--k", "0"], "argument --k: expected an integer >= 1, got 0"),
        (["build", "--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    ],
)
def test_bad_numbers_are_refused_when_parsed(monkeypatch, capsys, argv, expected):
    """`world eval --num 0` was a bare ZeroDivisionError after the model loaded."""
    import lit_selfimprove.modeling
    import lit_selfimprove.world as world

    def ran(*a, **kw):
        raise AssertionError("the command ran before its arguments were checked")

    # a regression fails fast instead of loading models or rebuilding the bundled assets
    monkeypatch.setattr(lit_selfimprove.modeling, "load_causal_lm", ran)
    for name in ("build", "_write_jsonl", "level_accuracy", "teacher_stats"):
        monkeypatch.setattr(world, name, ran)
    with pytest.raises(SystemExit):
        world.main(argv)
    assert expected in capsys.readouterr().err
