"""The tiny Self-Improving Pretraining configs (``configs/tiny/sip_*.yaml``) and the next-token
baseline on prefix-suffix batches: the configs build the intended objects with one shared budget,
a few steps of ``sip_dpo`` write the selection and validation metrics and the Figure-8 plot, and
``NextTokenLM`` puts its loss on the suffix tokens only (checked by hand with a bigram model).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

import lit_selfimprove.callbacks  # noqa: F401  (short class names resolve)
import lit_selfimprove.datamodules  # noqa: F401
import lit_selfimprove.modules  # noqa: F401
from lit_selfimprove.callbacks import MetricsPlot, SelectionStats
from lit_selfimprove.cli import main
from lit_selfimprove.datamodules import PrefixSuffixDataModule
from lit_selfimprove.judges import CombinedJudge, KBFactualityJudge, KBQualityJudge, KBSafetyJudge
from lit_selfimprove.modules import NextTokenLM, SuffixPolicyDPO
from tests.helpers import REPO, needs_assets

TINY = REPO / "configs" / "tiny"
SIP_CONFIGS = {
    "dpo": TINY / "sip_dpo.yaml",
    "rf_nll": TINY / "sip_rf_nll.yaml",
    "next_token": TINY / "sip_next_token.yaml",
}
pytestmark = needs_assets("tiny-sip-policy", "tiny-facts")


def _build(config: Path) -> LightningCLI:
    """Instantiate model, data and trainer of ``config`` as ``fit`` would, without running."""
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        run=False,
        args=["--config", str(config), "--trainer.logger=false"],
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- configs
def test_tiny_sip_configs_build_with_one_budget(monkeypatch):
    monkeypatch.chdir(REPO)  # the corpus is a repo-relative path
    clis = {name: _build(cfg) for name, cfg in SIP_CONFIGS.items()}
    dpo, rf, nt = clis["dpo"].model, clis["rf_nll"].model, clis["next_token"].model
    assert isinstance(dpo, SuffixPolicyDPO) and isinstance(rf, SuffixPolicyDPO)
    assert isinstance(nt, NextTokenLM)
    assert (dpo.objective.loss, rf.objective.loss) == ("dpo", "rf_nll")
    assert dpo.candidates.num_rollouts == rf.candidates.num_rollouts == 8
    assert dpo.candidates.include_suffix and not dpo.candidates.include_rewrite
    for module in (dpo, rf):
        judge = module.judge
        assert isinstance(judge, CombinedJudge) and judge.quality_mode == "all_pairs"
        assert isinstance(judge.quality, KBQualityJudge)
        assert isinstance(judge.factuality, KBFactualityJudge) and isinstance(judge.safety, KBSafetyJudge)
        assert judge.weights == {"quality": 1.0, "factuality": 1.0, "safety": 1.0}
    # same start, same stream and batches, same steps and lr schedule: a fair comparison
    assert dpo.hparams.model == rf.hparams.model == nt.hparams.model == "builtin:tiny-sip-policy"
    assert dpo.optim.lr == rf.optim.lr == nt.hparams.lr
    assert dpo.optim.warmup_steps == nt.hparams.warmup_steps
    datas = [c.datamodule for c in clis.values()]
    assert all(isinstance(d, PrefixSuffixDataModule) for d in datas)
    assert datas[0]._fingerprint == datas[1]._fingerprint == datas[2]._fingerprint
    assert datas[0].batch_size == 8 and datas[0]._probe.suffix_tokens == 40
    assert len({c.trainer.max_steps for c in clis.values()}) == 1
    callbacks = clis["dpo"].trainer.callbacks
    assert any(isinstance(c, SelectionStats) for c in callbacks)
    assert any(isinstance(c, MetricsPlot) for c in callbacks)


@pytest.mark.parametrize("config", ["sip_dpo_continual.yaml", "sip_next_token_continual.yaml"])
def test_paper_sip_configs_match_the_paper(config, capsys):
    import yaml

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "paper" / config), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert trainer["max_steps"] == 2000 and trainer["devices"] * trainer["num_nodes"] == 64
    assert trainer["devices"] * trainer["num_nodes"] * data["batch_size"] == 256  # global batch
    assert (data["hf_name"], data["suffix_tokens"], data["context_length"]) == (
        "cerebras/SlimPajama-627B",
        128,
        2048,
    )
    optim = model.get("optim", model)  # SuffixPolicyDPO's optim group, NextTokenLM's own arguments
    assert (optim["lr"], optim["warmup_steps"], optim["min_lr_ratio"]) == (5e-6, 100, 0.1)
    if "dpo" in config:
        assert trainer["strategy"]["class_path"].endswith("ModelParallelStrategy")
        assert model["candidates"]["num_rollouts"] == 16 and model["objective"]["loss"] == "dpo"
        judge = model["judge"]["init_args"]
        assert judge["quality_mode"] == "all_pairs"
        assert judge["safety"]["init_args"]["repeats"] == 5
        for part in ("quality", "factuality", "safety"):
            backend = judge[part]["init_args"]["backend"]["init_args"]
            assert (backend["base_url"], backend["model"]) == (
                "http://localhost:8000/v1",
                "openai/gpt-oss-120b",
            )


# ---------------------------------------------------------------------------- a short run
def test_sip_dpo_few_steps_writes_selection_and_val_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    steps, prefixes, k = 3, 4, 2
    main(
        [
            "fit",
            "--config",
            str(SIP_CONFIGS["dpo"]),
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            f"--model.init_args.candidates.num_rollouts={k}",
            "--model.init_args.candidates.max_new_tokens=16",
            f"--data.init_args.batch_size={prefixes}",
            "--data.init_args.num_val_prefixes=6",
            "--data.init_args.val_batch_size=6",
            "--data.init_args.shuffle_buffer_size=16",
        ]
    )
    log_dir = next((tmp_path / "sip_dpo").glob("version_*"))
    rows = _rows(log_dir / "metrics.csv")
    logged = {k for r in rows for k, v in r.items() if v != ""}
    for name in (
        "select/chosen_rollout",
        "select/chosen_suffix",
        "select/pairs",
        "select/chosen_rollout_avg",
        "train/dpo_margin",
        "judge/score_rollout",
        "val/factuality",
        "val/safety",
        "val/quality_win_vs_suffix",
    ):
        assert name in logged, name
    chosen = [
        (float(r["select/chosen_rollout"]), float(r["select/chosen_suffix"]))
        for r in rows
        if r["select/chosen_rollout"]
    ]
    assert len(chosen) == steps and all(a + b == pytest.approx(1.0) for a, b in chosen)  # shares of the pairs
    val = [r for r in rows if r["val/factuality"]]
    assert len(val) == 1 and all(0 <= float(val[0][m]) <= 1 for m in ("val/factuality", "val/safety"))
    # SelectionStats: one row per step, every prefix either paired (rollout or suffix chosen) or skipped
    sel = _rows(log_dir / "selection.csv")
    assert [int(r["step"]) for r in sel] == list(range(steps))
    for r in sel:
        assert int(r["prefixes"]) == prefixes == int(r["pairs"]) + int(r["skipped"])
        assert int(r["chosen_rollout"]) + int(r["chosen_suffix"]) == int(r["pairs"])
        assert int(r["chosen_rewrite"]) == 0
    assert (log_dir / "selection.png").stat().st_size > 1000
    assert (log_dir / "sip_dpo.png").stat().st_size > 1000


# ------------------------------------------------------------------ next-token on suffixes
V = 100  # the char tokenizer's vocabulary


class Bigram(torch.nn.Module):
    """P(next = cur + 1) = 1/2, every other token (V - 1 of them) 1 / (2 (V - 1)): a loss by hand."""

    def __init__(self):
        super().__init__()
        table = torch.full((V, V), math.log(1 / (2 * (V - 1))))
        table[torch.arange(V), (torch.arange(V) + 1) % V] = math.log(0.5)
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        return SimpleNamespace(logits=self.table[input_ids])


def test_next_token_loss_is_on_suffix_tokens_only():
    lm = NextTokenLM(model="builtin:tiny-sip-policy", tokenizer="builtin:tiny-tokenizer")
    lm.model = Bigram()
    pad = 0
    batch = {  # prefixes LEFT-padded, suffixes RIGHT-padded, as collate_prefix_suffix makes them
        "prefix_ids": torch.tensor([[pad, 5, 9], [3, 7, 1]]),
        "prefix_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "suffix_ids": torch.tensor([[10, 11, 20], [2, pad, pad]]),
        "suffix_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]),
        "prefix_text": ["..", "..."],
        "suffix_text": ["...", "."],
    }
    # scored transitions: 9->10, 10->11 (hits), 11->20 (miss); 1->2 (hit). The prefix's own
    # transitions (5->9, 3->7, 7->1: misses) and the padding carry no loss.
    hit, miss = math.log(2), math.log(2 * (V - 1))
    expected = (3 * hit + miss) / 4
    assert lm._loss(batch).item() == pytest.approx(expected, abs=1e-5)
    everything = (3 * hit + 4 * miss) / 7  # what a loss on prefix tokens too would give
    assert abs(lm._loss(batch).item() - everything) > 0.5
    # gradients reach only the table rows of the scored transitions' source tokens
    lm._loss(batch).backward()
    touched = lm.model.table.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert touched == [1, 9, 10, 11]


def test_next_token_plain_batches_unchanged(tiny_random_lm):
    """``input_ids`` / ``labels`` batches keep Hugging Face's own loss (the pre-training path)."""
    lm = NextTokenLM(model=tiny_random_lm)
    lm.configure_model()
    ids = torch.tensor([[1, 40, 41, 42, 2], [1, 50, 51, 2, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": ids.masked_fill(ids == 0, -100)}
    ref = lm.model(**batch).loss
    assert lm._loss(batch).item() == pytest.approx(ref.item(), abs=1e-6)
