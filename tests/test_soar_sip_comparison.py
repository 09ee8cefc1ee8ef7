"""The SOAR -> SIP comparison's summary: every arm, paired contrasts, promotion rate, chosen shares."""

from __future__ import annotations

import pytest

from tests.helpers import load_experiment


@pytest.fixture(scope="module")
def script():
    return load_experiment("soar_sip_comparison")


def _arm(acc: float, shares: bool = False) -> dict:
    out = {"val/accuracy": acc, "val/pass@1": acc / 2, "val/pass@4": acc, "val/pass@16": 2 * acc}
    if shares:
        out["shares"] = {
            "select/chosen_rollout_avg": [(0, 0.1), (10, 0.5)],
            "select/chosen_suffix_avg": [(0, 0.5), (10, 0.3)],
            "select/chosen_rewrite_avg": [(0, 0.4), (10, 0.2)],
        }
    return out


def _runs() -> dict:
    runs = {}
    for s in range(3):
        runs[s] = {
            "soar": {"promotions": int(s != 1)},
            "corpus": {"documents": 80 + s, "student_agrees": 0.5, "true_right": 0.9},
            "plain_corpus": {"documents": 600, "true_right": 0.48},
            "arms": {
                "sip_soar": _arm(0.10 + s / 100, shares=True),
                "next_token_soar": _arm(0.05),
                "sip_plain": _arm(0.10 + s / 100, shares=True),
                "soar_pq_rlvr": _arm(0.20),
            },
        }
    return runs


def test_summary_pairs_every_seed_and_reports_what_sip_chose(script, tmp_path, capsys):
    summary = script.summarize(_runs())
    assert summary["seeds"] == [0, 1, 2]
    loop_vs_rlvr = summary["contrasts"]["sip_soar-soar_pq_rlvr"]["val/accuracy"]
    assert loop_vs_rlvr["per_seed"] == pytest.approx([-0.10, -0.09, -0.08]) and loop_vs_rlvr["wins"] == 0
    assert summary["contrasts"]["sip_soar-next_token_soar"]["val/pass@16"]["wins"] == 3
    assert summary["contrasts"]["sip_soar-sip_plain"]["val/accuracy"]["mean"] == 0.0
    assert summary["promotion_rate"] == {"promoted_seeds": 2, "seeds": 3, "rate": 2 / 3}
    assert summary["final_shares"]["sip_soar"]["select/chosen_rollout_avg"] == 0.5
    assert summary["arms"]["soar_pq_rlvr"]["val/pass@16"]["mean"] == pytest.approx(0.4)
    script.plot(summary, _runs(), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    script.print_tables(summary)
    assert "SOAR promoted in 2/3 seeds" in capsys.readouterr().out
