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
from tests.helpers import needs_assets


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


@pytest.fixture()
def no_teacher(monkeypatch):
    """Loading the teacher fails the test: what is checked must be checked before it."""
    import lit_selfimprove.sample_questions as tool

    def load(*a, **kw):
        raise AssertionError("the teacher was loaded before the arguments were checked")

    monkeypatch.setattr(tool, "load_teacher", load)


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--max-new-tokens", "0", "an integer >= 1"),
        ("--num", "0", "an integer >= 1"),
        ("--batch", "-2", "an integer >= 1"),
        ("--max-rounds", "0", "an integer >= 1"),
        ("--temperature", "-1", "a number >= 0"),
        ("--top-p", "0", "a number in (0, 1]"),
        ("--top-p", "1.5", "a number in (0, 1]"),
        ("--seed", "-1", "an integer >= 0"),
    ],
)
def test_bad_numbers_are_refused_before_the_teacher_loads(
    no_teacher, tmp_path, capsys, flag, value, expected
):
    argv = ["sample-questions", "--teacher", "t.ckpt", "--out", str(tmp_path / "q.jsonl"), flag, value]
    with pytest.raises(SystemExit):
        cli_main(argv)
    assert f"argument {flag}: expected {expected}" in capsys.readouterr().err


def test_a_folder_teacher_without_a_prompt_is_refused_before_it_loads(no_teacher, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["sample-questions", "--teacher", "some/folder", "--out", str(tmp_path / "q.jsonl")])
    assert "--prompt is required" in capsys.readouterr().err


def test_a_teacher_prompt_over_the_context_is_refused(tiny_random_lm, tmp_path):
    with pytest.raises(
        ValueError, match=r"the teacher prompt .*: the prompt is 301 tokens.*max_position_embeddings=256"
    ):
        cli_main(
            ["sample-questions", "--teacher", tiny_random_lm, "--prompt", "x" * 300, "--num", "4",
             "--max-new-tokens", "16", "--out", str(tmp_path / "q.jsonl")]
        )  # fmt: skip


def test_a_checkpoint_teacher_sees_its_chat_template_and_prefill(tiny_random_lm, tmp_path, monkeypatch):
    """A TeacherMetaRL trained with use_chat_template and teacher_prefill (SmolLM2's SOAR config) is sampled
    with the prompt as training showed it, and its completions are parsed with the prefill in front."""
    import lit_selfimprove.sample_questions as tool

    base = load_causal_lm(tiny_random_lm)
    path = tmp_path / "soar.ckpt"
    hp = {"teacher": tiny_random_lm, "teacher_prompt": "P:", "use_chat_template": True}
    hp["teacher_prefill"] = "<question>"
    torch.save(
        {"hyper_parameters": hp, "state_dict": {f"teacher.{k}": v for k, v in base.state_dict().items()}},
        path,
    )
    real_load = tool.load_teacher

    def load_with_template(*a, **kw):
        model, tokenizer, prompt = real_load(*a, **kw)
        tokenizer.chat_template = "{% for m in messages %}[U]{{ m['content'] }}[/U]{% endfor %}[A]"
        return model, tokenizer, prompt

    seen: list[str] = []

    class Canned:
        texts = ["What is 1 + 1?</question><answer>\\boxed{2}</answer>"] * 2

        def __len__(self):
            return 2

    def fake_generate(model, tokenizer, prompts, **kw):
        seen.extend(prompts)
        return Canned()

    monkeypatch.setattr(tool, "load_teacher", load_with_template)
    monkeypatch.setattr(tool, "generate", fake_generate)
    out = tmp_path / "q.jsonl"
    tool.main(
        ["--teacher", str(path), "--num", "2", "--batch", "2", "--max-new-tokens", "8", "--out", str(out)]
    )
    assert seen == ["[U]P:[/U][A]<question>"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in rows] == [("What is 1 + 1?", "2")] * 2
    seen.clear()  # the flags override the checkpoint's settings
    tool.main(["--teacher", str(path), "--num", "1", "--batch", "2", "--max-new-tokens", "8", "--out", str(out),
               "--no-use-chat-template", "--prefill", "<question>Q"])  # fmt: skip
    assert seen == ["P:<question>Q"]
