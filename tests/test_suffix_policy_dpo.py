"""SuffixPolicyDPO (Self-Improving Pretraining): pair selection, the DPO / RF-NLL updates, the
frozen reference, rewrites, seeding, SelectionStats, a full fit, and DDP / FSDP2 on two ranks.

Judges here are scripted (``tests/_dist_sip_script.py``): their scores are functions of the
prefix and candidate texts, so every expected choice is known in advance.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lit_selfimprove.callbacks.selection_stats import SelectionStats
from lit_selfimprove.generation import generate
from lit_selfimprove.loops.sip import best_classes
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer
from lit_selfimprove.modules.sip_settings import CandidateConfig, ObjectiveConfig
from lit_selfimprove.modules.suffix_policy_dpo import SuffixPolicyDPO
from lit_selfimprove.rl.logprobs import sequence_logprobs
from lit_selfimprove.rl.selection import select_pairs
from tests._dist_sip_script import BATCH, ROLLOUTS, STEPS
from tests._launch import cached_runs, max_diff
from tests.helpers import (
    ModuleJudge,
    ScriptedJudge,
    ToyPrefixSuffixData,
    csv_metrics,
    tiny_sip,
    tiny_trainer,
    toy_documents,
    vowel_share,
)

nan = float("nan")
REWRITE_BETA_05 = {"candidates": {"include_rewrite": True}, "optim": {"lr": 1e-3}, "objective": {"beta": 0.5}}


def _continuation_logps(model, data: ToyPrefixSuffixData, batch: dict, texts: list[str]) -> torch.Tensor:
    """Sum log-prob of each ``texts[b]`` (tokenized like a suffix) after prefix ``b``."""
    cont = data.tok(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    ids = torch.cat([batch["prefix_ids"], cont["input_ids"]], 1)
    attn = torch.cat([batch["prefix_mask"], cont["attention_mask"]], 1)
    cmask = torch.cat([torch.zeros_like(batch["prefix_mask"]), cont["attention_mask"]], 1)
    with torch.no_grad():
        return sequence_logprobs(model, ids, attn, cmask).sum(-1)


class CopyRewriter:
    """Returns a fixed (long) rewrite per suffix and records what it was asked."""

    def __init__(self, make=lambda suffix: suffix.upper() * 4):
        self.make = make
        self.calls: list[tuple[list[str], list[str]]] = []

    def rewrite(self, prefixes, suffixes):
        self.calls.append((list(prefixes), list(suffixes)))
        return [self.make(s) for s in suffixes]


def by_source(rollout: float, suffix: float, rewrite: float | None = None, k: int = 2):
    """A judge fn giving every rollout / the suffix / the rewrite a fixed score."""

    def fn(prefix, cands, ref):
        return [rollout] * k + [suffix] + ([] if rewrite is None else [rewrite])

    return fn


# ------------------------------------------------------------------------------- selection
def test_select_pairs_argmax_argmin_skips_ties_and_nan():
    total = torch.tensor(
        [
            [0.1, 0.9, 0.5],  # plain
            [0.3, 0.3, 0.3],  # all equal: skipped
            [nan, 0.2, 0.7],  # nan left out (torch.argmax would pick the nan)
            [nan, nan, 0.4],  # one scored candidate: skipped
            [1.0, 1.0, 0.0],  # tie for best
            [0.5, 0.0, 0.0],  # tie for worst
            [nan, 0.5, 0.5 + 1e-9],  # equal up to float noise: skipped
            [nan, nan, nan],
        ]
    )
    sel = select_pairs(total, torch.Generator().manual_seed(0))
    assert sel.valid.tolist() == [True, False, True, False, True, True, False, False]
    assert sel.chosen[[0, 2, 5]].tolist() == [1, 2, 0]
    assert sel.rejected[[0, 2, 4]].tolist() == [0, 1, 2]
    assert sel.chosen[4] in (0, 1) and sel.rejected[5] in (1, 2)
    assert sel.chosen[~sel.valid].eq(-1).all() and sel.rejected[~sel.valid].eq(-1).all()
    assert sel.tie_best.tolist() == [False, False, False, False, True, False, False, False]
    assert sel.tie_worst.tolist() == [False, False, False, False, False, True, False, False]
    # ties are broken at random (both candidates win for some seed), the same way for one seed
    picks = {int(select_pairs(total, torch.Generator().manual_seed(s)).chosen[4]) for s in range(16)}
    assert picks == {0, 1}
    again = select_pairs(total, torch.Generator().manual_seed(0))
    assert torch.equal(again.chosen, sel.chosen) and torch.equal(again.rejected, sel.rejected)


def test_select_pairs_for_rf_nll_needs_only_a_best_candidate():
    """RF-NLL needs no rejected candidate: only rows without any verdict are skipped."""
    total = torch.tensor(
        [
            [0.3, 0.3, 0.3],  # all equal: a tie among the best, broken by the seeded draw
            [nan, nan, 0.4],  # one scored candidate: the best
            [nan, nan, nan],  # no verdict at all: the only skip
            [0.1, 0.9, 0.5],  # as for DPO
        ]
    )
    sel = select_pairs(total, torch.Generator().manual_seed(0), need_rejected=False)
    assert sel.valid.tolist() == [True, True, False, True]
    assert sel.chosen[1:].tolist() == [2, -1, 1] and int(sel.chosen[0]) in (0, 1, 2)
    assert sel.rejected.tolist() == [-1, -1, -1, 0]  # a rejected only where the scores differ
    assert sel.tie_best.tolist() == [True, False, False, False] and not sel.tie_worst.any()
    draws = [select_pairs(total, torch.Generator().manual_seed(s), need_rejected=False) for s in range(32)]
    assert {int(d.chosen[0]) for d in draws} == {0, 1, 2}
    # DPO still skips rows without two different scores
    assert select_pairs(total, torch.Generator().manual_seed(0)).valid.tolist() == [False, False, False, True]


def test_best_classes_separate_strict_wins_from_ties():
    nan = float("nan")
    sources = ["rollout", "rollout", "suffix", "rewrite"]
    total = torch.tensor(
        [
            [2.0, 1.0, 1.5, 1.5],  # a rollout strictly best
            [3.0, 1.0, 1.0, 3.0],  # a rollout ties the rewrite
            [1.0, 1.0, 2.0, 3.0],  # the rewrite strictly best
            [0.0, 0.0, 2.0, 2.0 + 1e-7],  # suffix and rewrite tie (within atol), above the rollouts
            [nan, 1.0, nan, 1.0 + 1e-7],  # unscored candidates left out; a tie within atol
            [nan, nan, nan, nan],  # nothing scored: never counted
        ]
    )
    counts = best_classes(total, sources)
    assert counts == {"best_rollout_only": 1, "best_tied": 2, "best_corpus_only": 2}
    assert sum(counts.values()) == 5
    trained = torch.tensor([True, False, True, False, True, True])
    assert best_classes(total, sources, rows=trained) == {
        "best_rollout_only": 1,
        "best_tied": 1,
        "best_corpus_only": 1,
    }
    with pytest.raises(ValueError, match="total must be"):
        best_classes(total, sources[:3])


def test_rf_nll_trains_on_prefixes_whose_candidates_all_tie(tiny_random_lm, tmp_path):
    judge = ScriptedJudge(lambda p, c, r: [0.5] * len(c))  # no preference: every candidate is a best one
    module = tiny_sip(tiny_random_lm, judge, objective={"loss": "rf_nll"}, optim={"lr": 1e-2})
    trainer = tiny_trainer(2, tmp_path, logger=True)
    trainer.fit(module, ToyPrefixSuffixData(toy_documents(4), batch_size=2))

    logged = csv_metrics(trainer)
    assert logged["select/pairs"] == [2.0, 2.0] and logged["select/skipped"] == [0.0, 0.0]
    assert logged["select/ties_best"] == [2.0, 2.0] and logged["select/ties_worst"] == [0.0, 0.0]
    assert len(logged["train/rf_nll"]) == 2
    initial = load_causal_lm(tiny_random_lm).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in module.policy.state_dict().items())


def test_training_step_picks_by_judge_and_reports_sources(tiny_random_lm, tmp_path):
    """Four prefixes, one outcome each: rewrite best, all equal, nan-filtered, rollout best."""
    k, n = 3, 6

    def fn(prefix, cands, ref):
        if prefix.startswith("doc 0"):  # rewrite best; every rollout shares the worst score
            return [0.0] * k + [1.0, 2.0]
        if prefix.startswith("doc 1"):  # nothing to learn
            return [0.5] * (k + 2)
        if prefix.startswith("doc 2"):  # only rollout 1 and the suffix have verdicts
            return [nan, 0.0, nan, 1.0, nan]
        return [0.0, 0.0, 3.0, 1.0, -1.0]  # rollout 2 best, rewrite worst

    judge, rewriter = ScriptedJudge(fn), CopyRewriter()
    candidates = {"include_rewrite": True, "num_rollouts": k}
    module = tiny_sip(tiny_random_lm, judge, rewriter=rewriter, candidates=candidates, log_samples_every=1)
    data = ToyPrefixSuffixData(toy_documents(4), suffix_chars=n, batch_size=4)
    trainer = tiny_trainer(1, tmp_path, logger=True)
    trainer.fit(module, data)

    assert module.last_selection == {
        "step": 0.0,
        "prefixes": 4.0,
        "pairs": 3.0,
        "skipped": 1.0,
        "ties_best": 0.0,
        "ties_worst": 1.0,
        **{"chosen_rollout": 1.0, "chosen_suffix": 1.0, "chosen_rewrite": 1.0},
        **{"rejected_rollout": 2.0, "rejected_suffix": 0.0, "rejected_rewrite": 1.0},
        **{"best_rollout_only": 1.0, "best_tied": 0.0, "best_corpus_only": 2.0},
    }
    logged = {k: float(v) for k, v in trainer.logged_metrics.items()}
    for s in ("rollout", "suffix", "rewrite"):
        assert logged[f"select/chosen_{s}"] == pytest.approx(1 / 3)
    assert logged["select/rejected_rollout"] == pytest.approx(2 / 3)
    assert logged["select/skipped"] == 1 and logged["select/ties_worst"] == 1
    assert logged["judge/score_suffix"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert logged["judge/score_chosen"] == pytest.approx((2 + 1 + 3) / 3)
    assert logged["judge/score_rejected"] == pytest.approx((0 + 0 - 1) / 3)
    assert {"judge/factuality_suffix", "judge/safety_rollout", "judge/unparseable"} <= set(logged)
    assert logged["judge/factuality_suffix"] == 1.0  # the suffix is its own reference
    assert 0 < logged["train/rollout_len"] <= n and "train/dpo_margin" in logged and "train/lr" in logged
    # the judge saw K rollouts, the suffix, then the rewrite cut to N tokens (one char each)
    call = judge.calls[0]
    assert call["refs"] == data.collate(data.train_items)["suffix_text"]
    assert all(len(c) == k + 2 for c in call["candidates"])
    assert [c[k] for c in call["candidates"]] == call["refs"]
    assert rewriter.calls == [(call["prefixes"], call["refs"])]
    assert [c[k + 1] for c in call["candidates"]] == [(r.upper() * 4)[:n] for r in call["refs"]]
    # samples.jsonl: prefixes, candidates with sources and scores, the pair
    rows = [json.loads(line) for line in open(Path(trainer.log_dir) / "samples.jsonl")]
    assert [r["chosen"] for r in rows] == [k + 1, None]
    assert rows[0]["rejected"] in range(k) and rows[0]["tie_worst"]
    assert [c["source"] for c in rows[0]["candidates"]] == ["rollout"] * k + ["suffix", "rewrite"]
    assert rows[0]["candidates"][k + 1]["score"] == 2.0 and rows[0]["doc_id"] == "d0"


# -------------------------------------------------------------------------------- updates
def test_dpo_raises_the_chosen_minus_rejected_log_ratio(tiny_random_lm, tmp_path):
    """A fixed batch whose pair is always (suffix, rewrite): the policy's log-ratio over the
    reference grows, step after step (the logged margin is 0 at step 0, where policy = ref)."""
    judge = ScriptedJudge(by_source(rollout=0.0, suffix=1.0, rewrite=-1.0))
    module = tiny_sip(tiny_random_lm, judge, rewriter=CopyRewriter(), **REWRITE_BETA_05)
    data = ToyPrefixSuffixData(toy_documents(2), batch_size=2)
    trainer = tiny_trainer(4, tmp_path, logger=True)
    trainer.fit(module, data)

    batch = data.collate(data.train_items)
    rewrites = [c[-1] for c in judge.calls[0]["candidates"]]
    initial = load_causal_lm(tiny_random_lm)
    before = _continuation_logps(initial, data, batch, batch["suffix_text"]) - _continuation_logps(
        initial, data, batch, rewrites
    )
    after = _continuation_logps(module.policy, data, batch, batch["suffix_text"]) - _continuation_logps(
        module.policy, data, batch, rewrites
    )
    assert (after - before > 0.5).all(), (before, after)
    margins = csv_metrics(trainer)["train/dpo_margin"]
    assert len(margins) == 4 and abs(margins[0]) < 1e-5
    assert all(b > a for a, b in zip(margins, margins[1:])), margins
    assert csv_metrics(trainer)["select/chosen_suffix"] == [1.0] * 4


def test_dpo_loss_forward_runs_without_dropout(tiny_random_lm, tmp_path):
    """A policy with attention dropout: at step 0 (policy = reference) the DPO margin is exactly 0, as
    the reference (eval mode) sees it; with dropout in the loss forward it would be noise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "dropout_lm"
    config = AutoConfig.from_pretrained(tiny_random_lm)
    config.attention_dropout = 0.5
    model = AutoModelForCausalLM.from_pretrained(tiny_random_lm, config=config)
    model.save_pretrained(folder)
    load_tokenizer(tiny_random_lm).save_pretrained(folder)
    judge = ScriptedJudge(by_source(rollout=0.0, suffix=1.0, rewrite=-1.0))
    module = tiny_sip(str(folder), judge, rewriter=CopyRewriter(), **REWRITE_BETA_05)
    trainer = tiny_trainer(1, tmp_path, logger=True)
    trainer.fit(module, ToyPrefixSuffixData(toy_documents(2), batch_size=2))
    assert abs(csv_metrics(trainer)["train/dpo_margin"][0]) < 1e-6
    assert module.policy.config.attention_dropout == 0.5  # restored after the update


def test_rf_nll_lowers_the_chosen_nll_without_a_reference(tiny_random_lm, tmp_path):
    judge = ScriptedJudge(by_source(rollout=0.0, suffix=1.0))
    module = tiny_sip(tiny_random_lm, judge, objective={"loss": "rf_nll"}, optim={"lr": 1e-3})
    data = ToyPrefixSuffixData(toy_documents(2), batch_size=2)
    trainer = tiny_trainer(4, tmp_path, logger=True)
    trainer.fit(module, data)

    assert module.ref_model is None  # RF-NLL needs no reference: none is kept
    batch = data.collate(data.train_items)
    before = _continuation_logps(load_causal_lm(tiny_random_lm), data, batch, batch["suffix_text"])
    after = _continuation_logps(module.policy, data, batch, batch["suffix_text"])
    assert (after - before > 1.0).all(), (before, after)
    nll = csv_metrics(trainer)["train/rf_nll"]
    assert len(nll) == 4 and all(b < a for a, b in zip(nll, nll[1:])), nll
    assert "train/dpo_margin" not in csv_metrics(trainer)


def test_reference_is_frozen_and_only_the_policy_is_checkpointed(tiny_random_lm, tmp_path):
    module = tiny_sip(tiny_random_lm, ModuleJudge(), optim={"lr": 1e-2})
    trainer = tiny_trainer(2, tmp_path)
    trainer.fit(module, ToyPrefixSuffixData(toy_documents(4), batch_size=2))

    ref, initial = module.ref_model, load_causal_lm(tiny_random_lm).state_dict()
    assert ref is not None and not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(v, initial[k]) for k, v in ref.state_dict().items())  # never moved
    assert any(not torch.equal(v, initial[k]) for k, v in module.policy.state_dict().items())  # trained
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.policy.parameters()}
    assert not opt_params & {id(p) for p in ref.parameters()}
    assert not any(n.startswith(("_frozen", "_injected", "judge")) for n, _ in module.named_modules())
    path = tmp_path / "sip.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == {f"policy.{k}" for k in module.policy.state_dict()}


def test_all_skipped_batches_step_the_counters_but_not_the_weights(tiny_random_lm, tmp_path):
    judge = ScriptedJudge(lambda p, c, r: [0.7] * len(c))  # a judge with no preference
    module = tiny_sip(tiny_random_lm, judge, optim={"lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 10})
    trainer = tiny_trainer(3, tmp_path, logger=True)
    with pytest.warns(UserWarning, match="100% of the prefixes were skipped"):  # not silently
        trainer.fit(module, ToyPrefixSuffixData(toy_documents(2), batch_size=2))

    initial = load_causal_lm(tiny_random_lm).state_dict()
    assert all(torch.equal(v, initial[k]) for k, v in module.policy.state_dict().items())  # no decay
    assert trainer.global_step == 3 and trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3
    logged = csv_metrics(trainer)
    assert logged["select/skipped"] == [2.0] * 3 and logged["select/pairs"] == [0.0] * 3
    assert logged["train/lr"] == pytest.approx([1e-3, 2e-3, 3e-3])  # warmup advanced anyway
    assert "train/loss" not in logged and "select/chosen_rollout" not in logged


def test_seeded_runs_repeat_exactly(tiny_random_lm, tmp_path):
    def run(seed: int):
        judge = ScriptedJudge(lambda p, c, r: [vowel_share(x) for x in c])
        module = tiny_sip(
            tiny_random_lm, judge, candidates={"num_rollouts": 3}, optim={"lr": 1e-2}, seed=seed
        )
        trainer = tiny_trainer(2, tmp_path / str(seed))
        trainer.fit(module, ToyPrefixSuffixData(toy_documents(4), batch_size=2))
        return [c["candidates"] for c in judge.calls], module.policy.state_dict()

    (cands_a, w_a), (cands_b, w_b), (cands_c, _) = run(3), run(3), run(4)
    assert cands_a == cands_b and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert cands_a != cands_c


def test_generate_from_token_prompts_matches_string_prompts(tiny_random_lm):
    model, tok = load_causal_lm(tiny_random_lm), load_tokenizer(tiny_random_lm)
    prompts = ["doc 1: the", "doc 22: a bird"]
    enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    a = generate(
        model, tok, prompts, num_samples=2, max_new_tokens=5, generator=torch.Generator().manual_seed(1)
    )
    b = generate(
        model,
        tok,
        prompt_ids=enc["input_ids"],
        prompt_mask=enc["attention_mask"],
        num_samples=2,
        max_new_tokens=5,
        generator=torch.Generator().manual_seed(1),
    )
    assert a.texts == b.texts and torch.equal(a.prompt_ids, b.prompt_ids)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, tok, prompt_ids=enc["input_ids"], prompt_mask=enc["attention_mask"].flip(-1))
    with pytest.raises(ValueError, match="either prompts or prompt_ids"):
        generate(model, tok, prompts, prompt_ids=enc["input_ids"])


# --------------------------------------------------------------------- stats, fit, config
def test_selection_stats_plot_csv_and_state(tiny_random_lm, tmp_path):
    # step 0: the suffix wins both prefixes; from step 1 on a rollout wins both
    calls = []

    def fn(prefix, cands, ref):
        calls.append(prefix)
        step = (len(calls) - 1) // 2
        return [0.0, 2.0, 1.0] if step >= 1 else [0.0, 0.0, 1.0]

    stats = SelectionStats(every_n_steps=2, window=2)
    module = tiny_sip(tiny_random_lm, ScriptedJudge(fn), optim={"lr": 1e-3})
    trainer = tiny_trainer(3, tmp_path, logger=True, callbacks=[stats])
    trainer.fit(module, ToyPrefixSuffixData(toy_documents(2), batch_size=2))

    out = Path(trainer.log_dir)
    assert (out / "selection.png").stat().st_size > 1000
    with open(out / "selection.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["chosen_suffix"], r["chosen_rollout"]) for r in rows] == [
        ("0", "2", "0"),
        ("1", "0", "2"),
        ("2", "0", "2"),
    ]
    # who held the best score, before any tie-break: the suffix alone, then a rollout alone
    assert [(r["best_corpus_only"], r["best_tied"], r["best_rollout_only"]) for r in rows] == [
        ("2", "0", "0"),
        ("0", "0", "2"),
        ("0", "0", "2"),
    ]
    assert stats.rates() == {"rollout": 1.0, "suffix": 0.0}  # the last 2 steps; no rewrite here
    assert stats.rates(window=0)["rollout"] == pytest.approx(2 / 3)
    logged = csv_metrics(trainer)
    assert logged["select/chosen_rollout_avg"] == pytest.approx([0.0, 0.5, 1.0])
    # state round trip, also through a checkpoint
    restored = SelectionStats()
    restored.load_state_dict(stats.state_dict())
    assert restored.rows == stats.rows and restored.sources == ["rollout", "suffix"]
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    ckpt = torch.load(tmp_path / "s.ckpt", weights_only=False)
    (saved,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("SelectionStats")]
    assert saved["rows"] == stats.rows
    assert not restored.add({"step": 2.0}) and restored.add({"step": 3.0, "pairs": 1.0})


def test_fit_with_validation_logs_judge_components(tiny_random_lm, tmp_path):
    """A user's own DataModule, validation included; a judge without a safety component."""
    judge = ScriptedJudge(lambda p, c, r: [vowel_share(x) for x in c], components=("quality", "factuality"))
    module = tiny_sip(
        tiny_random_lm, judge, optim={"lr": 1e-3}, validation={"temperature": 0.0}, log_samples_every=2
    )
    data = ToyPrefixSuffixData(toy_documents(6), val_texts=toy_documents(9)[6:], batch_size=2)
    trainer = tiny_trainer(3, tmp_path, logger=True, limit_val_batches=None, val_check_interval=3)
    trainer.fit(module, data)

    logged = csv_metrics(trainer)
    assert trainer.global_step == 3
    for name in ("val/score", "val/quality_win_vs_suffix", "val/factuality", "val/rollout_len"):
        assert len(logged[name]) == 1, name
    assert "val/safety" not in logged and "judge/safety_rollout" not in logged
    # validation judged [continuation, suffix] with the suffix as reference, 3 held-out prefixes
    val_calls = judge.calls[3:]
    assert sum(len(c["prefixes"]) for c in val_calls) == 3
    assert all(
        len(cands) == 2 and cands[1] == ref
        for c in val_calls
        for cands, ref in zip(c["candidates"], c["refs"])
    )
    expected = [vowel_share(cands[0]) for c in val_calls for cands in c["candidates"]]
    assert logged["val/score"][0] == pytest.approx(sum(expected) / 3)
    for name in (
        "train/loss",
        "train/dpo_accuracy",
        "train/reward_chosen",
        "judge/score_rollout",
        "train/lr",
    ):
        assert len(logged[name]) == 3, name
    assert len((Path(trainer.log_dir) / "samples.jsonl").read_text().splitlines()) == 2 * 2  # steps 0, 2


def test_cli_builds_the_module_with_an_injected_judge(tiny_random_lm):
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        SuffixPolicyDPO,
        run=False,
        args=[
            f"--model.model={tiny_random_lm}",
            "--model.judge=tests._dist_sip_script.UnevenJudge",
            "--model.candidates.num_rollouts=4",
            "--model.objective.loss=rf_nll",
            "--trainer.logger=false",
        ],
    )
    assert type(cli.model.judge).__name__ == "UnevenJudge"
    assert (
        cli.model.hparams.candidates["num_rollouts"] == 4 and cli.model.hparams.objective["loss"] == "rf_nll"
    )
    assert "judge" not in cli.model.hparams


def test_bad_arguments_are_errors(tiny_random_lm):
    judge = ScriptedJudge(lambda p, c, r: [0.0] * len(c))
    with pytest.raises(ValueError, match="loss"):
        SuffixPolicyDPO(tiny_random_lm, judge=judge, objective=ObjectiveConfig(loss="sft"))
    with pytest.raises(ValueError, match="rewriter"):
        SuffixPolicyDPO(tiny_random_lm, judge=judge, candidates=CandidateConfig(include_rewrite=True))
    with pytest.raises(ValueError, match="two candidates"):
        SuffixPolicyDPO(
            tiny_random_lm, judge=judge, candidates=CandidateConfig(num_rollouts=1, include_suffix=False)
        )


def test_each_moved_setting_names_a_field_of_its_group():
    import dataclasses
    import typing

    from lit_selfimprove.moved_settings import MOVED, MovedSettingError, check_moved_settings

    hints = typing.get_type_hints(SuffixPolicyDPO.__init__)
    for old, new in MOVED["SuffixPolicyDPO"].items():
        group, field = new.split(".")
        assert old not in hints and group in hints, (old, new)
        group_class = typing.get_args(hints[group])[0]  # GroupConfig | None
        assert field in {f.name for f in dataclasses.fields(group_class)}, new
    with pytest.raises(MovedSettingError, match="candidates.num_rollouts"):
        check_moved_settings(["fit", "--model", "SuffixPolicyDPO", "--model.init_args.num_rollouts=4"])


# ---------------------------------------------------------------------------- distributed
SCRIPT = Path(__file__).with_name("_dist_sip_script.py")
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # as tests/test_distributed.py: a hang fails instead of blocking CI


@pytest.fixture(scope="module")
def two_rank_runs(tiny_random_lm, tmp_path_factory):
    """``strategy -> [rank0, rank1]`` results, each strategy run once per module."""
    return cached_runs(SCRIPT, tiny_random_lm, tmp_path_factory, TIMEOUT_S)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_split_prefixes_and_stay_in_sync(two_rank_runs, tiny_random_lm, strategy):
    r0, r1 = two_rank_runs(strategy)
    initial = {k: v.float() for k, v in load_causal_lm(tiny_random_lm).state_dict().items()}
    expected = {"ddp": "DDPStrategy", "fsdp2": "ModelParallelStrategy"}[strategy]
    for r, res in enumerate((r0, r1)):
        assert res["rank"] == r and res["world_size"] == 2 and res["strategy"] == expected
        # every step counts, the one where no rank had a pair included
        assert res["global_step"] == res["lr_steps"] == STEPS
        assert len(res["prefixes"]) == STEPS * BATCH
        assert all(len(c) == ROLLOUTS + 1 for c in res["candidates"])
        assert res["policy_dtensor"] == res["ref_dtensor"] == (strategy == "fsdp2")
        assert res["optimizer_over_policy"] and not res["ref_requires_grad"]
        assert all(k.startswith("policy.") for k in res["state_dict_keys"])
        assert max_diff(res["ref_weights"], initial) == 0.0
    # the data is split across ranks, and each rank samples its own rollouts
    assert set(r0["prefixes"]).isdisjoint(r1["prefixes"])
    assert [c[:ROLLOUTS] for c in r0["candidates"]] != [c[:ROLLOUTS] for c in r1["candidates"]]
    # selection counts are summed over ranks: both ranks see the same, global ones
    assert r0["selections"] == r1["selections"]
    assert [s["pairs"] for s in r0["selections"]] == [4.0, 2.0, 0.0, 3.0]
    # ranks with fewer pairs ran zero-weight passes: as many forwards as the others (no hang);
    # one pair per pass: 2 + 2 + 0 + 2 passes with gradients, the reference alike
    assert r0["forwards"] == r1["forwards"]
    assert r0["forwards"]["policy_grad"] == r0["forwards"]["ref"] == 6
    # gradients were synchronised
    assert max_diff(r0["weights"], r1["weights"]) <= 1e-6
    assert max_diff(r0["weights"], initial) > 1e-3


def test_fsdp2_trains_like_ddp(two_rank_runs):
    ddp, fsdp = two_rank_runs("ddp"), two_rank_runs("fsdp2")
    for a, b in zip(ddp, fsdp):
        assert a["prefixes"] == b["prefixes"]
        assert a["candidates"][:BATCH] == b["candidates"][:BATCH]  # step 0: identical weights
        assert a["selections"] == b["selections"]
        assert max_diff(a["weights"], b["weights"]) < 1e-4  # different reduction order only
