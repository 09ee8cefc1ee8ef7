"""experiments/sip_trained_judges.py end to end in its --quick mode (a handful of steps and examples)."""

from __future__ import annotations

import json

from tests.helpers import REPO, load_experiment


def _unit(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_quick_run_writes_the_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    script = load_experiment("sip_trained_judges")
    out = tmp_path / "summary.json"
    script.main(["--quick", "--out-dir", str(tmp_path / "runs"), "--json", str(out)])
    s = json.loads(out.read_text())

    assert s["data"]["judge_train"] > 0 and s["data"]["judge_heldout"] > 0
    assert s["data"]["rewriter_train"] > 0 and s["data"]["rewriter_heldout"] > 0
    assert set(s["judge"]) == {"base", "sft", "sft_grpo"}
    for kinds in s["judge"].values():
        assert set(kinds) <= {"safety", "pairwise"} and kinds
        for o in kinds.values():
            assert _unit(o["accuracy"]) and _unit(o["unparseable_rate"]) and _unit(o["majority_baseline"])
            # the confusion matrix counts every held-out example once
            assert sum(sum(row.values()) for row in o["confusion"].values()) == o["n"]
    assert set(s["rewriter"]) == {"identity", "base", "sft", "sft_grpo"}
    for o in s["rewriter"].values():
        for key in ("exact_match_oracle", "copy_rate_safe_inputs", "safety", "factuality", "rewrite_reward"):
            assert _unit(float(o[key])), (key, o[key])
    assert s["rewriter"]["identity"]["copy_rate_safe_inputs"] == 1.0
    names = [r["name"] for r in s["sip"]["table"]]
    assert len(names) == 4 and "trained" in names[-1] and "oracle" in names[-2]
    for row in s["sip"]["table"]:
        for key in ("factuality", "fact_accuracy", "safety", "win_vs_suffix"):
            assert _unit(float(row[key])), (row["name"], key)
    assert s["sip"]["runs"]["trained"]["steps"] == 1
    assert "LLMSafetyJudge" in s["sip"]["runs"]["trained"]["command"]
    assert s["seconds"]["total"] > 0
