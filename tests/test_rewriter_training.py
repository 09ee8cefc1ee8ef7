"""Rewriter training by GRPO through StudentRLVR: the paper's rewrite reward, the rewriter-examples
DataModule (the rewriter split, LLMRewriter's exact prompt, bad rows), and a 2-step fit whose model
folder plugs into LLMRewriter."""

from __future__ import annotations

import csv
import json

import pytest

from lit_selfimprove.cli import main
from lit_selfimprove.datamodules import RewriterExamplesDataModule
from lit_selfimprove.datamodules.tiny_judge_labels import TINY_CORPUS, TINY_REWRITER_TEMPLATE, tiny_chunks
from lit_selfimprove.judges import HFChatBackend, LLMRewriter
from lit_selfimprove.rewards import RewriteReward, rewrite_answer
from tests.helpers import REPO, FixedAnswerBackend


class StubPointwise:
    """Scores by a lookup on the continuation (``default`` otherwise); records the calls."""

    def __init__(self, table: dict[str, float | None], default: float | None = 1.0):
        self.table, self.default, self.calls = table, default, []

    def score(self, prefixes, continuations, references=None):
        self.calls.append((list(prefixes), list(continuations), references))
        return [self.table.get(c, self.default) for c in continuations]


class StubPairwise:
    def __init__(self, verdict: float | None):
        self.verdict, self.calls = verdict, []

    def compare(self, prefixes, firsts, seconds):
        self.calls.append((list(prefixes), list(firsts), list(seconds)))
        return [self.verdict] * len(firsts)


PREFIX = "Ana lives in Ovra. Ana is a baker. Ana"
SAFE = " likes figs. Ana wears red."
UNSAFE = " wants to hurt Bo. Ana wears red."


# ---------------------------------------------------------------------------------------- reward
def test_safe_input_rewards_only_an_exact_copy():
    safety = StubPointwise({UNSAFE: 0.0})
    reward = RewriteReward(safety=safety, quality=StubPointwise({}, 0.3), seed_words=2)
    answer = rewrite_answer(PREFIX, SAFE)
    completions = [
        "baker. Ana likes figs. Ana wears red.",  # the seed ("baker. Ana"), then the suffix: a copy
        SAFE.strip(),  # no seed: the whole answer is the rewrite, still the suffix
        f'"baker. Ana{SAFE}"',  # in quotes, as LLMRewriter reads it
        "baker. Ana likes figs. Ana wears blue.",  # changed
        "baker. Ana",  # only the seed: empty, unparseable
        "",
    ]
    assert reward(completions, [answer] * len(completions)).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert reward.stats == {"completions": 6, "safe_inputs": 6, "copies": 3, "unparseable": 2}
    assert len(safety.calls) == 1 and safety.calls[0][1] == [SAFE]  # the input judged once


def test_unsafe_input_gets_half_quality_plus_safety():
    rewrite = "likes figs. Ana wears red."  # LLMRewriter strips the answer (no seed here)
    safety = StubPointwise({UNSAFE: 0.0, rewrite: 0.8, UNSAFE.strip(): 0.0, "wants to hurt Bo.": None})
    quality = StubPointwise({rewrite: 0.6, UNSAFE.strip(): 1.0})
    reward = RewriteReward(safety=safety, quality=quality, seed_words=0)
    answer = rewrite_answer(PREFIX, UNSAFE)
    out = reward([rewrite, UNSAFE, " wants to hurt Bo.", ""], [answer] * 4)
    assert out.tolist() == pytest.approx([0.5 * (0.6 + 0.8), 0.5 * (1.0 + 0.0), 0.5 * (1.0 + 0.0), 0.0])
    assert quality.calls[0][2] == [UNSAFE] * 3  # the original suffix is the reference
    # a pairwise quality judge compares the rewrite with the input suffix
    pairwise = StubPairwise(0.5)
    reward = RewriteReward(safety=safety, quality=pairwise, seed_words=0)
    assert reward([rewrite], [answer]).tolist() == pytest.approx([0.5 * (0.5 + 0.8)])
    assert pairwise.calls == [([PREFIX], [rewrite], [UNSAFE])]
    # the answer's own label overrides the judge: a copy of a "safe" suffix is worth 1
    assert RewriteReward(safety=safety, seed_words=0)(
        [UNSAFE], [rewrite_answer(PREFIX, UNSAFE, True)]
    ).tolist() == [1.0]
    # an input whose safety verdict is unparseable counts as unsafe
    unclear = rewrite_answer(PREFIX, "wants to hurt Bo.")
    assert RewriteReward(safety=safety, seed_words=0)([rewrite], [unclear]).tolist() == pytest.approx([0.4])
    # no quality judge: safety only
    assert RewriteReward(safety=safety, seed_words=0)([rewrite], [answer]).tolist() == pytest.approx([0.4])


def test_reward_errors():
    with pytest.raises(TypeError, match="pointwise"):
        RewriteReward(safety=StubPairwise(1.0))
    reward = RewriteReward(safety=StubPointwise({}))
    with pytest.raises(ValueError, match="rewriter answer must be JSON"):
        reward(["x"], ["FINAL DECISION: YES"])


# ------------------------------------------------------------------------------------ DataModule
def test_datamodule_renders_llm_rewriter_prompt(tmp_path):
    rows = [
        {"prefix": PREFIX, "suffix": SAFE},
        {"prefix": "Bo {x} is a tailor.", "suffix": UNSAFE, "safe": False},
    ]
    path = tmp_path / "rw.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = RewriterExamplesDataModule(path=str(path), val_fraction=0.0, max_prefix_chars=20)
    dm.setup()
    backend = FixedAnswerBackend("copied")
    LLMRewriter(backend, max_prefix_chars=20).rewrite(
        [r["prefix"] for r in rows], [r["suffix"] for r in rows]
    )
    assert [r["question"] for r in dm.train_records] == backend.prompts
    assert '"Ana is a baker. Ana"' in backend.prompts[0]  # the 5-word seed is in the prompt
    answers = [json.loads(r["answer"]) for r in dm.train_records]
    assert answers == [
        {"prefix": PREFIX, "suffix": SAFE},
        {"prefix": rows[1]["prefix"], "suffix": UNSAFE, "safe": False},
    ]


def test_inputs_come_from_the_rewriter_split():
    dm = RewriterExamplesDataModule(
        corpus=TINY_CORPUS, template=TINY_REWRITER_TEMPLATE, seed_words=0, max_examples=40
    )
    rows = dm.rows()
    assert len(rows) == 40
    rewriter_docs = {r["doc_id"] for r in rows}
    judge_docs = {c["doc_id"] for c in tiny_chunks("judge")}
    assert rewriter_docs and not rewriter_docs & judge_docs  # disjoint from the judge's documents
    assert [(r["prefix"], r["suffix"]) for r in rows] == [
        (c["prefix"], c["suffix"]) for c in tiny_chunks("rewriter")
    ][:40]
    dm.setup()
    assert len(dm.train_records) + len(dm.val_records) == 40
    assert max(len(r["question"]) for r in dm.train_records) < 256 - 48  # the tiny model's positions


@pytest.mark.parametrize(
    "line, message",
    [
        ("[1,", r"rw\.jsonl:2: not valid JSON"),
        (json.dumps({"prefix": "p"}), r"rw\.jsonl:2: rewriter row misses the string field 'suffix'"),
        (
            json.dumps({"prefix": "p", "suffix": "s", "safe": "yes"}),
            r"rw\.jsonl:2: 'safe' must be true or false",
        ),
    ],
)
def test_bad_rows_error_clearly(tmp_path, line, message):
    path = tmp_path / "rw.jsonl"
    path.write_text(json.dumps({"prefix": "p", "suffix": "s"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        RewriterExamplesDataModule(path=str(path)).setup()


def test_datamodule_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of corpus"):
        RewriterExamplesDataModule()
    with pytest.raises(FileNotFoundError, match="no file"):
        RewriterExamplesDataModule(path=str(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------------------------- training
def test_tiny_rewriter_config_fits_and_plugs_into_llm_rewriter(tmp_path):
    cli = main(
        [
            "fit", "--config", str(REPO / "configs/tiny/rewriter_grpo.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
            "--model.init_args.rl.group_size=2", "--data.init_args.batch_size=2", "--data.init_args.val_batch_size=2",
            "--data.init_args.max_examples=64",
        ]
    )  # fmt: skip
    assert cli.trainer.global_step == 2
    assert cli.model.reward.stats["completions"] >= 8
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert [r["train/reward"] for r in rows if r.get("train/reward")]
    folder = next(tmp_path.rglob("hf"))
    rewriter = LLMRewriter(
        HFChatBackend(str(folder)),
        template=TINY_REWRITER_TEMPLATE,
        max_tokens=48,
        seed_words=0,
        max_prefix_chars=60,
    )
    out = rewriter.rewrite([PREFIX], [UNSAFE])
    assert len(out) == 1 and isinstance(out[0], str) and out[0]
