"""The bundled tiny world assets: small, loadable, and in the situation SOAR is about
(the base student partly solves the medium level and never solves the hard set)."""

from __future__ import annotations

import json

import torch

from lit_selfimprove.assets import resolve
from lit_selfimprove.failk import build_fail_at_k
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer
from lit_selfimprove.world import level_accuracy, teacher_stats
from tests.helpers import ASSETS, needs_assets

MEDIUM_LEVEL = 3


@needs_assets("tiny-student", "tiny-teacher", "tiny-hard")
def test_assets_are_small():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 10 * 2**20, f"bundled assets take {total / 2**20:.1f} MB (limit 10 MB)"


@needs_assets("tiny-student")
def test_student_base_partly_solves_medium_and_solves_easy():
    torch.manual_seed(0)
    model, tok = load_causal_lm("builtin:tiny-student"), load_tokenizer("builtin:tiny-student")
    acc = level_accuracy(model, tok, [2, MEDIUM_LEVEL], num=100)
    assert acc[2]["greedy"] >= 0.9, acc
    assert 0.05 <= acc[MEDIUM_LEVEL]["greedy"] <= 0.75, acc  # partly: room to learn, not zero


@needs_assets("tiny-student", "tiny-hard")
def test_student_base_is_zero_on_the_hard_set(tmp_path):
    hard = [json.loads(line) for line in open(resolve("builtin:tiny-hard-set"))]
    assert len(hard) >= 40
    model, tok = load_causal_lm("builtin:tiny-student"), load_tokenizer("builtin:tiny-student")

    class Exact:
        def score(self, completions, answers):
            from lit_selfimprove.world import quick_correct

            c = torch.tensor([quick_correct(t, a) for t, a in zip(completions, answers)])
            return c.float(), c

    summary = build_fail_at_k(
        model, tok, hard[:16], Exact(), tmp_path / "again.jsonl", k=16, max_new_tokens=80,
        prompt_template="Q: {question}\nA: ", seed=123, progress=False,
    )  # fmt: skip
    assert summary["hard"] == 16  # still 0/16 with fresh samples


@needs_assets("tiny-teacher")
def test_teacher_base_writes_valid_problems():
    torch.manual_seed(0)
    stats = teacher_stats(
        load_causal_lm("builtin:tiny-teacher"), load_tokenizer("builtin:tiny-teacher"), num=64
    )
    assert stats["valid"] >= 0.9, stats
    assert len(stats["levels"]) >= 3, stats  # it proposes problems of several lengths


@needs_assets("tiny-hard")
def test_hard_set_loads_by_builtin_name_and_is_split_50_50():
    from lit_selfimprove.datamodules import load_problems

    train, _ = load_problems("builtin:tiny-hard-train")
    test, _ = load_problems("builtin:tiny-hard-test")
    assert abs(len(train) - len(test)) <= 1 and len(train) >= 32
    assert not {r["id"] for r in train} & {r["id"] for r in test}


@needs_assets("tiny-hard")
def test_strict_hard_set_keeps_many_carry_sums_disjoint_from_each_split():
    from lit_selfimprove.datamodules import load_problems
    from lit_selfimprove.worlds.arithmetic import carries

    train, _ = load_problems("builtin:tiny-strict-train")
    test, _ = load_problems("builtin:tiny-strict-test")
    assert len(train) >= 64 and abs(len(train) - len(test)) <= 1  # |Q_R| = 64 as in the paper
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert all(carries(r["question"]) >= 5 and str(eval(r["question"])) == r["answer"] for r in train + test)
