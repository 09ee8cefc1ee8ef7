"""Judge training by GRPO through StudentRLVR: the verdict reward, the judge-examples DataModule (the
exact inference prompt, bad rows), and a 2-step fit whose model folder plugs into LLMSafetyJudge."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from lit_selfimprove.cli import main
from lit_selfimprove.datamodules import JudgeExamplesDataModule
from lit_selfimprove.datamodules.judge_examples import load_judge_rows, render_chat_prompt
from lit_selfimprove.datamodules.tiny_judge_labels import TINY_SAFETY_TEMPLATE
from lit_selfimprove.judges import HFChatBackend, LLMFactualityJudge, LLMPairwiseJudge, LLMSafetyJudge
from lit_selfimprove.modeling import load_tokenizer
from lit_selfimprove.rewards import JudgeVerdictReward, canonical_verdict
from tests.helpers import ASSETS, REPO, FixedAnswerBackend

ROWS = [
    {"kind": "safety", "prefix": "Ana lives in {Ovra}.", "continuation": " Ana wants to hurt Bo.", "label": "unsafe"},
    {"prefix": "Bo is a baker.", "continuation": " Bo likes figs.", "label": "safe", "split": "val"},
    {"prefix": "Cy wears red.", "first": " Cy likes rice.", "second": " rice Cy likes.", "label": 1},
    {"prefix": "Di is a tailor.", "continuation": " Di lives in Lumo.", "reference": " Di lives in Samar.", "label": "definite"},
]  # fmt: skip


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------- reward
def test_verdict_reward_right_wrong_unparseable():
    reward = JudgeVerdictReward()  # auto: the kind comes from each answer
    completions = [
        "The text threatens someone.\nFINAL DECISION: NO",  # right
        "FINAL DECISION: YES",  # wrong
        "I am not sure.",  # unparseable
        "FINAL DECISION: YES/NO",  # an echo of the instruction: unparseable
        "Option 2 reads better.\nOption 2",  # right
        "Option 1 or Option 2",  # unclear: unparseable
        "FINAL VERDICT: DEFINITE HALLUCINATION",  # right
        "FINAL VERDICT: POSSIBLE HALLUCINATION",  # wrong
    ]
    answers = [canonical_verdict("safety", "unsafe")] * 4 + [canonical_verdict("pairwise", 2)] * 2
    answers += [canonical_verdict("factuality", "definite")] * 2
    rewards, correct = reward.score(completions, answers)
    assert rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert correct.tolist() == [bool(r) for r in rewards.tolist()]
    assert reward.stats == {"completions": 8, "correct": 3, "unparseable": 3}
    assert reward(completions, answers).tolist() == rewards.tolist()


def test_verdict_reward_kinds_and_labels():
    assert canonical_verdict("safety", "SAFE") == "FINAL DECISION: YES"
    assert canonical_verdict("pairwise", "second") == "Option 2"
    assert canonical_verdict("factuality", 0.5) == "FINAL VERDICT: POSSIBLE HALLUCINATION"
    with pytest.raises(ValueError, match="unknown safety label 'maybe'"):
        canonical_verdict("safety", "maybe")
    with pytest.raises(ValueError, match="unknown judge kind"):
        JudgeVerdictReward(kind="style")
    safety = JudgeVerdictReward(kind="safety")
    assert safety(["FINAL DECISION: yes"], ["FINAL DECISION: YES"]).tolist() == [1.0]
    with pytest.raises(ValueError, match="not a safety verdict"):
        safety(["FINAL DECISION: YES"], ["Option 1"])


# ------------------------------------------------------------------------------------ DataModule
def test_datamodule_renders_the_inference_prompts(tmp_path):
    path = _write(tmp_path / "judge.jsonl", ROWS)
    dm = JudgeExamplesDataModule(path, random_order=False, val_fraction=0.0, max_prefix_chars=12)
    dm.setup()
    assert [r["answer"] for r in dm.train_records] == [
        "FINAL DECISION: NO",
        "Option 1",
        canonical_verdict("factuality", 0),
    ]
    assert [r["answer"] for r in dm.val_records] == ["FINAL DECISION: YES"]  # the row's own split
    # what the inference judges send to their backend, for the same rows
    safety = FixedAnswerBackend()
    LLMSafetyJudge(safety, repeats=1, max_prefix_chars=12).score(
        [ROWS[0]["prefix"]], [ROWS[0]["continuation"]]
    )
    pairwise = FixedAnswerBackend("Option 1")
    LLMPairwiseJudge(pairwise, random_order=False, max_prefix_chars=12).compare(
        [ROWS[2]["prefix"]], [ROWS[2]["first"]], [ROWS[2]["second"]]
    )
    fact = FixedAnswerBackend("FINAL VERDICT: NO HALLUCINATION")
    LLMFactualityJudge(fact, max_prefix_chars=12).score(
        [ROWS[3]["prefix"]], [ROWS[3]["continuation"]], [ROWS[3]["reference"]]
    )
    assert [r["question"] for r in dm.train_records] == safety.prompts + pairwise.prompts + fact.prompts
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == ["answer", "id", "question"]


def test_random_order_keeps_the_label_with_the_better_text(tmp_path):
    rows = [
        {"prefix": "p", "first": f" good {i}", "second": f" bad {i}", "label": "first", "id": i}
        for i in range(20)
    ]
    dm = JudgeExamplesDataModule(_write(tmp_path / "pairs.jsonl", rows), val_fraction=0.0)
    dm.setup()
    swapped = 0
    for record in dm.train_records:
        shown_first = record["question"].split("[Option 1]\n")[1].split("\n")[0]
        better_first = shown_first.startswith(" good")
        swapped += not better_first
        assert record["answer"] == ("Option 1" if better_first else "Option 2")
    assert 0 < swapped < 20


def test_chat_rendering_matches_hf_chat_backend(tmp_path):
    """With a chat template (which writes BOS itself), the DataModule's text is HFChatBackend's."""
    folder = tmp_path / "chat-model"
    shutil.copytree(ASSETS / "tiny-sip-policy", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    backend = HFChatBackend(str(folder))
    prompt = LLMSafetyJudge(FixedAnswerBackend()).prompt(
        prefix="Ana is a baker.", continuation=" Ana wears red."
    )
    expected = backend.format_prompt(prompt)
    assert expected.startswith("<|user|>") and expected != prompt  # templated, the duplicate BOS gone
    assert render_chat_prompt(load_tokenizer(str(folder)), prompt) == expected
    assert render_chat_prompt(load_tokenizer(str(folder)), prompt, use_chat_template=False) == prompt
    path = _write(
        tmp_path / "one.jsonl", [{"prefix": "Ana is a baker.", "continuation": " Ana wears red.", "label": 1}]
    )
    dm = JudgeExamplesDataModule(path, tokenizer=str(folder), val_fraction=0.0)
    dm.setup()
    assert dm.train_records[0]["question"] == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        (json.dumps({"prefix": "p", "continuation": "c"}), r"bad\.jsonl:2: safety row misses the field 'label'"),
        (json.dumps({"kind": "pairwise", "first": "a", "label": 1}), r"bad\.jsonl:2: pairwise row misses the field 'second'"),
        (json.dumps({"continuation": "c", "label": "harmless"}), r"bad\.jsonl:2: unknown safety label 'harmless'"),
        (json.dumps({"first": "a", "second": "b", "label": 3}), r"bad\.jsonl:2: unknown pairwise label 3"),
        (json.dumps({"kind": "style", "continuation": "c", "label": 1}), r"bad\.jsonl:2: unknown kind 'style'"),
        (json.dumps({"prefix": "p", "label": 1}), r"bad\.jsonl:2: cannot tell the judge kind"),
        (json.dumps({"continuation": 3, "label": 1}), r"bad\.jsonl:2: field 'continuation' must be a string"),
        (json.dumps(["a list"]), r"bad\.jsonl:2: a row must be a JSON object"),
    ],
)  # fmt: skip
def test_bad_rows_error_clearly(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [ROWS[0], line])
    with pytest.raises(ValueError, match=message):
        load_judge_rows(path)
    with pytest.raises(ValueError, match=message):
        JudgeExamplesDataModule(path).setup()


def test_datamodule_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        JudgeExamplesDataModule(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown judge kind"):
        JudgeExamplesDataModule(_write(tmp_path / "a.jsonl", ROWS), kinds=["style"])
    with pytest.raises(ValueError, match="needs|must contain the field"):
        JudgeExamplesDataModule(_write(tmp_path / "b.jsonl", ROWS), safety_template="no fields")


def test_tiny_world_rows_follow_the_oracle():
    from lit_selfimprove.judges import KBSafetyJudge

    dm = JudgeExamplesDataModule(
        "builtin:tiny-facts-judge", kinds=["safety"], safety_template=TINY_SAFETY_TEMPLATE
    )
    rows = dm.rows()
    assert {r["kind"] for r in rows} == {"safety"} and {r["label"] for r in rows} == {"safe", "unsafe"}
    scores = KBSafetyJudge().score([r["prefix"] for r in rows], [r["continuation"] for r in rows])
    assert [("safe" if s else "unsafe") for s in scores] == [r["label"] for r in rows]
    dm.setup()
    assert dm.val_records and dm.train_records
    assert max(len(r["question"]) for r in dm.train_records) < 256 - 24  # the tiny model's positions


# ------------------------------------------------------------------------------------- training
def test_tiny_judge_config_fits_and_plugs_into_llm_safety_judge(tmp_path):
    cli = main(
        [
            "fit", "--config", str(REPO / "configs/tiny/judge_grpo.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
            "--model.init_args.rl.group_size=2", "--data.init_args.batch_size=2", "--data.init_args.val_batch_size=2",
        ]
    )  # fmt: skip
    assert cli.trainer.global_step == 2
    # the module formats the rendered question verbatim (braces included)
    assert cli.model.format_prompt("a {b} c") == "a {b} c"
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert [r["train/reward"] for r in rows if r.get("train/reward")]
    assert any(r.get("val/accuracy") for r in rows)
    folder = next(tmp_path.rglob("hf"))
    judge = LLMSafetyJudge(
        HFChatBackend(str(folder)),
        template=TINY_SAFETY_TEMPLATE,
        max_prefix_chars=60,
        repeats=2,
        max_tokens=24,
    )
    scores = judge.score(["Ana is a baker. Ana"], [" wants to hurt Bo."])
    assert len(scores) == 1 and (scores[0] is None or 0.0 <= scores[0] <= 1.0)
    assert judge.stats["answers"] == 2
