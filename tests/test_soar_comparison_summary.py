"""The SOAR comparison counts every seed: a SOAR run that never promoted counts as Hard-Only in SOAR-PQ."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO, load_experiment


@pytest.fixture(scope="module")
def script():
    return load_experiment("soar_tiny_comparison")


def _student(acc: float) -> dict:
    return {
        "val/accuracy": acc,
        "val/pass@1": acc / 2,
        "val/pass@4": acc,
        "val/pass@16": acc,
        "train_reward": [0.0],
    }


def _runs(promotions: dict[int, int]) -> dict:
    soar = {}
    for s, count in promotions.items():
        students = (
            {"soar_pq": _student(0.3 + s / 100), "soar_pq_true_answers": _student(0.4)} if count else {}
        )
        pq = {"n": 12 * count, "well_formed": 1.0, "answer_right": 0.5} if count else {"n": 0}
        soar[s] = {"promotion_count": count, "students": students, "pq": pq}
    return {
        "soar": soar,
        "hard_only": {s: _student(0.1 + s / 100) for s in promotions},
        "intrinsic": {},
        "base_teacher": {},
    }


BASE = {"strict_train": {"success_rate": 0.002}, "stones_L3_L4": {"success_rate": 0.4}}


def test_a_seed_without_promotion_counts_as_hard_only(script):
    runs = _runs({0: 1, 1: 0, 2: 2, 3: 1, 4: 1})
    summary = script.summarize(runs, BASE, ablation_seeds=[0, 1])
    diff = summary["soar_pq_minus_hard_only"]
    assert diff["seeds"] == [0, 1, 2, 3, 4]  # seed 1 is not left out
    assert diff["val/accuracy"]["per_seed"][1] == 0.0  # SOAR-PQ of seed 1 is its Hard-Only student
    assert diff["val/accuracy"]["per_seed"][0] == pytest.approx(0.2)
    assert summary["students"]["soar_pq"]["val/accuracy"]["n"] == 5
    assert summary["promotion_rate"] == {
        "promoted_seeds": 4, "seeds": 5, "rate": 0.8, "counted_as_hard_only": [1],
    }  # fmt: skip
    # the true-answers ablation ran on seeds 0 and 1; seed 1 had no PQ either
    assert summary["true_answers_minus_pq"]["seeds"] == [0, 1]
    assert summary["true_answers_minus_pq"]["val/accuracy"]["per_seed"][1] == 0.0
    json.dumps(summary)  # the record stays JSON


def test_the_committed_record_resummarises_with_its_promotion_rate(script):
    record = json.loads((REPO / "docs" / "soar_comparison.json").read_text())
    runs = {k: {int(s): v for s, v in arms.items()} for k, arms in record["runs"].items()}
    summary = script.summarize(runs, record["base_student"], record["args"]["ablation_seeds"])
    assert summary["promotion_rate"] == record["summary"]["promotion_rate"]
    assert summary["soar_pq_minus_hard_only"] == record["summary"]["soar_pq_minus_hard_only"]
