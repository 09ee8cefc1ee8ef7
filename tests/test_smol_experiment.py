"""experiments/smol_student_rlvr.py end to end on the tiny built-in model (``--quick``), and its summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lit_selfimprove.rewards import MathVerifyReward
from tests.helpers import load_experiment


@pytest.fixture(scope="module")
def script():
    return load_experiment("smol_student_rlvr")


def _problems(path: Path) -> Path:
    rows = [{"id": f"p{i}", "problem": f"{i}+1", "answer": str(i + 1), "level": 1 + i % 2} for i in range(8)]
    rows.append({"id": "hard", "problem": "x", "answer": "0", "level": 5})  # dropped by levels [1, 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _parity_score(self, completions, answers):
    """A stand-in verdict that varies with the text (the tiny model never boxes an answer, so
    math-verify would score every completion 0 and leave the counting untested)."""
    correct = torch.tensor([sum(map(ord, t)) % 2 == 0 for t in completions], dtype=torch.bool)
    return correct.float() * 120.0, correct


@pytest.mark.parametrize("verdict", ["math_verify", "parity"])
def test_quick_run_writes_consistent_json(script, tmp_path, monkeypatch, verdict):
    if verdict == "parity":
        monkeypatch.setattr(MathVerifyReward, "score", _parity_score)
    out, figure = tmp_path / "r.json", tmp_path / "r.png"
    result = script.main(
        [
            "--quick",
            "--model",
            "builtin:tiny-student",
            "--problems",
            str(_problems(tmp_path / "p.jsonl")),
            "--no-chat-template",
            "--out",
            str(out),
            "--figure",
            str(figure),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert figure.stat().st_size > 0
    redrawn = tmp_path / "again.png"
    assert script.main(["--replot", str(out), "--figure", str(redrawn)]) == json.loads(out.read_text())
    assert redrawn.stat().st_size > 0
    settings = result["settings"]
    # the config's prompt and split, with --quick's sizes
    assert "\\boxed{{}}" in settings["prompt_template"] and settings["levels"] == [1, 2]
    assert settings["train_problems"] + settings["heldout_problems"] == 8
    assert settings["k"] == 2 and settings["eval_problems"] == 2 and len(settings["eval_ids"]) == 2
    assert "hard" not in settings["eval_ids"]
    assert len(result["seeds"]) == 1
    seed = result["seeds"][0]
    for phase in ("before", "after"):
        res = seed[phase]
        rows = res["per_problem"]
        assert [p["id"] for p in rows] == settings["eval_ids"]  # the same held-out problems both times
        n = sum(p["n"] for p in rows)
        assert n == 2 * len(rows)
        # unbiased pass@1 with a fixed n is the mean correct rate; pass@n is "any sample correct"
        assert math.isclose(res["pass@1"], sum(p["c"] for p in rows) / n)
        assert math.isclose(res["pass@1"], res["sampled_correct_rate"])
        assert math.isclose(res["pass@k"], sum(p["c"] > 0 for p in rows) / len(rows))
        assert res["pass@1"] <= res["pass@k"]
        for key in (
            "greedy_accuracy",
            "greedy_boxed_share",
            "sampled_boxed_share",
            "sampled_truncated_share",
        ):
            assert 0.0 <= res[key] <= 1.0
        assert math.isclose(res["sampled_boxed_share"], sum(p["sampled_boxed"] for p in rows) / n)
        tokens = [t for p in rows for t in p["sampled_tokens"]]
        assert all(1 <= t <= settings["eval_max_new_tokens"] for t in tokens)
        assert math.isclose(res["sampled_mean_tokens"], sum(tokens) / n)
        # a completion that used the whole budget without EOS is truncated, and only those
        assert res["sampled_truncated_share"] <= sum(t == settings["eval_max_new_tokens"] for t in tokens) / n
        assert res["tokens"] == sum(tokens) + sum(p["greedy_tokens"] for p in rows)
        assert all(len(p["sampled_rewards"]) == p["n"] for p in rows)
        assert math.isclose(res["greedy_accuracy"], sum(p["greedy_correct"] for p in rows) / len(rows))
        if verdict == "parity":  # the counts come from the reward's verdicts, sample by sample
            assert all(sum(r == 120.0 for r in p["sampled_rewards"]) == p["c"] for p in rows)
            assert all(p["greedy_correct"] == (sum(map(ord, p["greedy_text"])) % 2 == 0) for p in rows)
    trained = seed["train"]
    assert 1 <= trained["steps"] <= 2 and len(trained["curve"]) == trained["steps"]
    assert [r["step"] for r in trained["curve"]] == list(range(1, trained["steps"] + 1))
    assert all("reward" in r and 0.0 <= r["accuracy"] <= 1.0 for r in trained["curve"])
    summary = result["summary"]["metrics"]
    for metric in ("greedy_accuracy", "pass@1", "pass@k", "sampled_boxed_share"):
        for phase in ("before", "after"):
            assert summary[metric][phase] == seed[phase][metric]
            lo, hi = summary[metric][f"{phase}_ci"]
            assert lo <= summary[metric][phase] <= hi


def _fake_result(correct: list[int], n: int) -> dict:
    rows = [
        {"greedy_correct": c > 0, "n": n, "c": c, "sampled_boxed": n, "sampled_truncated": 0} for c in correct
    ]
    return {
        "per_problem": rows,
        "greedy_accuracy": sum(c > 0 for c in correct) / len(correct),
        "pass@1": sum(correct) / (n * len(correct)),
        "pass@k": sum(c > 0 for c in correct) / len(correct),
        "sampled_boxed_share": 1.0,
        "sampled_truncated_share": 0.0,
        "greedy_boxed_share": 1.0,
        "greedy_mean_tokens": 5.0,
        "greedy_truncated_share": 0.0,
        "sampled_mean_tokens": 5.0,
        "sampled_mean_reward": 0.0,
    }


def test_summary_paired_difference_and_intervals(script):
    before = _fake_result([0, 0, 1, 4], n=4)
    after = _fake_result([2, 0, 4, 4], n=4)
    summary = script.summarize([{"before": before, "after": after}], k=4)
    assert summary["interval"] == "bootstrap over problems"
    pass1 = summary["metrics"]["pass@1"]
    assert math.isclose(pass1["before"], 5 / 16) and math.isclose(pass1["after"], 10 / 16)
    diff = pass1["after_minus_before"]
    assert math.isclose(diff["mean"], 5 / 16)  # per-problem differences 0.5, 0, 0.75, 0
    assert 0.0 <= diff["ci"][0] <= diff["mean"] <= diff["ci"][1] <= 0.75
    assert math.isclose(summary["metrics"]["pass@k"]["after_minus_before"]["mean"], 0.25)
    assert script.per_problem_values(after, "pass@k") == [1.0, 0.0, 1.0, 1.0]
    # several seeds: the interval is over the seeds' values
    two = script.summarize([{"before": before, "after": after}, {"before": after, "after": after}], k=4)
    assert two["interval"] == "seeds"
    assert math.isclose(two["metrics"]["pass@1"]["before"], (5 / 16 + 10 / 16) / 2)
