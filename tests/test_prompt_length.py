"""Prompts longer than the model's context are refused (file:line, lengths, limit) or dropped when the
data meets the model, not fed to a first step that generates past the context for minutes."""

from __future__ import annotations

import json

import pytest
import torch

from lit_selfimprove.datamodules import ProblemDataModule
from lit_selfimprove.datamodules.prompt_length import (
    check_prompt_lengths,
    max_positions,
    prompt_token_counter,
)
from lit_selfimprove.modeling import load_tokenizer
from lit_selfimprove.modules import StudentRLVR
from lit_selfimprove.rl.rlvr_config import RLVRConfig
from tests.helpers import PROMPT, fit_soar, needs_assets, tiny_soar, tiny_trainer

LONG = "1+" * 1500 + "1"  # a 3,001-character question


@pytest.fixture()
def problems(tmp_path):
    """Six short problems and, at line 4, one whose prompt alone is far over 256 positions."""
    rows = [{"id": f"p{i}", "question": f"{i}+{i}", "answer": str(2 * i)} for i in range(6)]
    rows.insert(3, {"id": "long", "question": LONG, "answer": "1501"})
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _counter():
    tok = load_tokenizer("builtin:tiny-tokenizer")
    render = PROMPT.format
    return prompt_token_counter(tok, lambda q: render(question=q)), len(
        tok(render(question=LONG))["input_ids"]
    )


def _dm(path, **kw) -> ProblemDataModule:
    dm = ProblemDataModule(train_source=str(path), use_split=False, batch_size=2, **kw)
    dm.setup("fit")
    return dm


def test_too_long_prompt_is_an_error_naming_file_line_and_lengths(problems):
    count, long_tokens = _counter()
    dm = _dm(problems)
    with pytest.raises(ValueError) as err:
        dm.check_prompt_lengths(count, 256, 32)
    message = str(err.value)
    assert f"{problems}:4:" in message  # the file and the 1-based line of the long problem
    assert f"{long_tokens} tokens" in message and f"{long_tokens + 32} positions" in message
    assert "max_position_embeddings=256" in message and "set too_long to skip" in message


def test_skip_drops_exactly_the_long_problem_and_reports_the_count(problems):
    count, long_tokens = _counter()
    dm = _dm(problems, too_long="skip")
    with pytest.warns(
        UserWarning, match=rf"skipped 1 of 7 training problems .*:4, {long_tokens} prompt tokens"
    ):
        dm.check_prompt_lengths(count, 256, 32)
    assert [r["id"] for r in dm.train_records] == ["p0", "p1", "p2", "p3", "p4", "p5"]
    assert [r["id"] for r in dm.test_records] == ["p0", "p1", "p2", "p3", "p4", "p5"]


def test_skip_keeps_the_count_of_extra_problems_right(problems, tmp_path):
    extra = tmp_path / "pq.jsonl"
    extra.write_text(
        json.dumps({"question": LONG, "answer": "1"})
        + "\n"
        + json.dumps({"question": "1+1", "answer": "2"})
        + "\n"
    )
    count, _ = _counter()
    dm = _dm(problems, too_long="skip", extra_train_sources=[str(extra)])
    assert dm.num_extra == 2
    with pytest.warns(UserWarning, match=rf"{extra}:1"):  # the longest is the extra file's first line
        dm.check_prompt_lengths(count, 256, 32)
    assert dm.num_extra == 1 and dm.train_records[0]["question"] == "1+1" and len(dm.train_records) == 7


def test_budget_over_the_context_and_nothing_left_are_errors():
    records = [{"id": "a", "question": "x" * 10}]
    with pytest.raises(ValueError, match="max_new_tokens=300 leaves no room"):
        check_prompt_lengths(records, lambda qs: [len(q) for q in qs], 256, 300)
    with pytest.raises(ValueError, match="every one of the 1 problems"):
        check_prompt_lengths(records, lambda qs: [len(q) for q in qs], 16, 8, too_long="skip")
    assert check_prompt_lengths(records, lambda qs: [len(q) for q in qs], 18, 8) == records  # 10 + 8 fits
    with pytest.raises(ValueError, match="too_long must be one of"):
        ProblemDataModule(train_source="x.jsonl", too_long="truncate")


class CountingReward:
    def __init__(self):
        self.answers: list[str] = []

    def __call__(self, completions, answers, prompts=None):
        self.answers.extend(answers)
        return torch.zeros(len(completions))


def _fit(path, reward, **dm_kw):
    module = StudentRLVR(
        "builtin:tiny-student", reward=reward, prompt_template=PROMPT,
        rl=RLVRConfig(group_size=2, max_new_tokens=8), val_num_samples=0, log_samples_every=0,
    )  # fmt: skip
    data = ProblemDataModule(train_source=str(path), use_split=False, batch_size=3, **dm_kw)
    tiny_trainer(2).fit(module, data)
    assert max_positions(module.policy) == 256


@needs_assets("tiny-student")
def test_student_rlvr_fit_fails_before_step_0_on_a_too_long_prompt(problems):
    reward = CountingReward()
    with pytest.raises(ValueError, match=rf"{problems}:4: the prompt is \d+ tokens"):
        _fit(problems, reward)
    assert reward.answers == []  # no step sampled anything


@needs_assets("tiny-student")
def test_student_rlvr_fit_with_skip_never_trains_on_the_long_problem(problems):
    reward = CountingReward()
    with pytest.warns(UserWarning, match="skipped 1 of 7"):
        _fit(problems, reward, too_long="skip")
    assert len(reward.answers) == 2 * 3 * 2 and "1501" not in reward.answers  # 2 steps of 3 problems x 2


def test_teacher_meta_rl_fit_fails_before_the_first_outer_step_on_a_too_long_q_r_problem(
    problems, tiny_random_lm, tmp_path
):
    module = tiny_soar(tiny_random_lm)
    module.sample_teacher_round = lambda n: pytest.fail("the teacher sampled before the check")
    data = ProblemDataModule(train_source=str(problems), use_split=False, batch_size=2)
    with pytest.raises(ValueError, match=rf"{problems}:4: the prompt is \d+ tokens"):
        fit_soar(module, tmp_path, data)
