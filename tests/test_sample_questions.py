"""``python -m lit_selfimprove sample-questions``: Grounded-T / Intrinsic-T question sets from a
teacher folder or a TeacherMetaRL checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from lit_selfimprove.cli import main as cli_main
from lit_selfimprove.datamodules.arithmetic import TINY_TEACHER_PROMPT
from lit_selfimprove.modeling import load_causal_lm
from lit_selfimprove.sample_questions import load_teacher
from tests.conftest import needs_assets


@needs_assets("tiny-teacher")
def test_samples_valid_pairs_from_a_teacher_folder(tmp_path):
    out = tmp_path / "gt.jsonl"
    summary = cli_main(
        ["sample-questions", "--teacher", "builtin:tiny-teacher", "--prompt", TINY_TEACHER_PROMPT,
         "--num", "12", "--batch", "8", "--max-new-tokens", "160", "--answer-check", "light", "--out", str(out)]
    )  # fmt: skip
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 12 and all({"id", "question", "answer"} <= set(r) for r in rows)
    assert len({r["id"] for r in rows}) == 12
    assert all("+" in r["question"] and r["answer"].isdigit() for r in rows)  # the tiny world's problems
    saved = json.loads(out.with_name("gt.summary.json").read_text())
    assert saved["num"] == 12 and 0.5 < saved["validity"] <= 1.0 and saved["vendi_ngram"] > 1.0
    assert summary is None  # the CLI dispatches to the tool


def test_checkpoint_teacher_weights_and_prompt_are_used(tiny_random_lm, tmp_path):
    base = load_causal_lm(tiny_random_lm)
    trained = {f"teacher.{k}": v + 0.5 for k, v in base.state_dict().items()}
    trained |= {f"student.{k}": v for k, v in base.state_dict().items()}
    path = tmp_path / "soar.ckpt"
    torch.save(
        {"hyper_parameters": {"teacher": tiny_random_lm, "teacher_prompt": "P:"}, "state_dict": trained}, path
    )
    model, _, prompt = load_teacher(str(path))
    assert prompt == "P:"
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[f"teacher.{k}"])
    torch.save({"hyper_parameters": {"model": tiny_random_lm}, "state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a TeacherMetaRL checkpoint"):
        load_teacher(str(tmp_path / "other.ckpt"))


def test_a_teacher_that_writes_no_valid_pairs_fails_with_its_validity(tiny_random_lm, tmp_path):
    with pytest.raises(RuntimeError, match=r"validity 0\.0%"):
        cli_main(
            ["sample-questions", "--teacher", tiny_random_lm, "--prompt", "x", "--num", "4", "--batch", "4",
             "--max-new-tokens", "4", "--max-rounds", "2", "--out", str(tmp_path / "q.jsonl")]
        )  # fmt: skip
