"""Self-Improving Pretraining from scratch: ``SuffixPolicyDPO(from_scratch=True)`` starts from random
weights in the architecture of ``model``; the paper config (configs/paper/sip_dpo_scratch.yaml) has
the paper's numbers and otherwise the continual config's judge and data; the tiny config
(configs/tiny/sip_dpo_scratch.yaml) trains one rollout + the suffix for a few steps."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from lit_selfimprove.cli import main
from lit_selfimprove.evaluation import PAPER_TASKS
from lit_selfimprove.judges import KBSafetyJudge
from lit_selfimprove.modeling import load_causal_lm
from lit_selfimprove.modules import SuffixPolicyDPO
from lit_selfimprove.modules._shared import scratch_model
from tests.helpers import REPO, needs_assets

PAPER = REPO / "configs" / "paper"
TINY = REPO / "configs" / "tiny" / "sip_dpo_scratch.yaml"


def _printed(config: Path, capsys) -> dict:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_paper_scratch_config_has_the_papers_numbers(capsys):
    scratch = _printed(PAPER / "sip_dpo_scratch.yaml", capsys)
    continual = _printed(PAPER / "sip_dpo_continual.yaml", capsys)
    trainer, model = scratch["trainer"], scratch["model"]["init_args"]
    # METHODS.md section 2: from scratch, 21,000 steps, lr 5e-4, 2,000 warmup, 1 rollout
    assert trainer["max_steps"] == 21000
    optim, candidates = model["optim"], model["candidates"]
    assert (optim["lr"], optim["warmup_steps"], candidates["num_rollouts"]) == (5e-4, 2000, 1)
    assert model["from_scratch"] is True and candidates["include_suffix"]
    assert model["objective"]["loss"] == "dpo"
    # same judge, data, model architecture and hardware as the continual setting
    assert model["judge"] == continual["model"]["init_args"]["judge"]
    assert scratch["data"] == continual["data"]
    assert model["model"] == continual["model"]["init_args"]["model"]
    for key in ("devices", "num_nodes", "strategy", "precision"):
        assert trainer[key] == continual["trainer"][key], key
    # the paper's benchmarks, through the LMEval callback
    lm_eval = [c for c in trainer["callbacks"] if c["class_path"].endswith("LMEval")]
    assert len(lm_eval) == 1 and tuple(lm_eval[0]["init_args"]["tasks"]) == PAPER_TASKS


def test_from_scratch_is_checked_at_construction():
    judge = KBSafetyJudge()
    for bad in ({"lora": {"r": 4}}, {"quantization": {"load_in_8bit": True}}, {"ref_quantization": "8bit"}):
        with pytest.raises((ValueError, ImportError)):
            SuffixPolicyDPO("builtin:tiny-sip-policy", judge=judge, from_scratch=True, **bad)


@needs_assets("tiny-sip-policy", "tiny-facts")
def test_scratch_model_is_random_seeded_and_leaves_the_global_rng():
    pretrained = load_causal_lm("builtin:tiny-sip-policy")
    torch.manual_seed(7)
    a, ref = scratch_model("builtin:tiny-sip-policy", reference=True, seed=0)
    after = torch.rand(2)
    b, _ = scratch_model("builtin:tiny-sip-policy", seed=0)
    c, _ = scratch_model("builtin:tiny-sip-policy", seed=1)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(2))  # the global RNG did not move
    assert type(a) is type(pretrained) and a.config.hidden_size == pretrained.config.hidden_size
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    pre = dict(pretrained.named_parameters())
    assert pa.keys() == pre.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)  # same seed, same weights
    assert not torch.equal(pa["model.embed_tokens.weight"], pc["model.embed_tokens.weight"])
    assert not torch.equal(pa["model.embed_tokens.weight"], pre["model.embed_tokens.weight"])
    assert a.training and all(p.dtype == torch.float32 for p in a.parameters())
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


@needs_assets("tiny-sip-policy", "tiny-facts")
def test_tiny_scratch_config_trains_one_rollout_and_the_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the tiny config's paths are repo-relative
    steps = 3
    cli = main(
        [
            "fit",
            "--config",
            str(TINY),
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.log_samples_every=0",
            "--data.init_args.batch_size=4",
            "--data.init_args.shuffle_buffer_size=16",
        ]
    )
    module = cli.model
    hp = module.hparams
    candidates = module.candidates
    assert hp.from_scratch and candidates.num_rollouts == 1 and candidates.include_suffix
    assert module.objective.loss == "dpo"
    assert module.sources == ["rollout", "suffix"]
    assert cli.trainer.global_step == steps
    # the DPO reference is the random initial policy: seed_everything(0) drew it
    ref = module._frozen["ref"]
    initial, _ = scratch_model("builtin:tiny-sip-policy", seed=0)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), initial.parameters()))
    pretrained = load_causal_lm("builtin:tiny-sip-policy")
    assert not torch.equal(ref.model.embed_tokens.weight, pretrained.model.embed_tokens.weight)
    # the policy moved away from it
    moved = [not torch.equal(p, q) for p, q in zip(module.policy.parameters(), ref.parameters())]
    assert all(moved)
    with open(Path(cli.trainer.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("select/pairs")]
    assert len(rows) == steps
    for r in rows:
        assert float(r["select/pairs"]) + float(r["select/skipped"]) == 4  # prefixes per step
        for key in ("judge/score_rollout", "judge/score_suffix"):
            assert math.isfinite(float(r[key])), (key, r[key])
    trained = [r for r in rows if r.get("train/loss")]  # a step whose prefixes all tie trains nothing
    assert trained and sum(float(r["select/pairs"]) for r in rows) > 0
    for r in trained:
        for key in ("train/loss", "train/nll_chosen", "train/dpo_margin"):
            assert math.isfinite(float(r[key])), (key, r[key])


def test_scratch_reference_is_the_same_after_a_resume_under_another_seed(tiny_random_lm, tmp_path):
    """The DPO reference (the random initial policy) is not in the checkpoint: a resumed run, whose
    process has another torch seed (``seed_everything: true``, per-rank seeds), rebuilds the same one
    from the seed the checkpoint keeps, and the policy comes from the checkpoint."""
    import lightning as L

    from tests.helpers import ScriptedJudge, ToyPrefixSuffixData, tiny_trainer, toy_documents, vowel_share

    def run(steps: int, ckpt=None) -> tuple[SuffixPolicyDPO, L.Trainer]:
        judge = ScriptedJudge(lambda p, c, r: [vowel_share(x) for x in c])
        module = SuffixPolicyDPO(
            tiny_random_lm,
            judge=judge,
            from_scratch=True,
            candidates={"num_rollouts": 2},
            optim={"warmup_steps": 0, "lr": 1e-2},
            log_samples_every=0,
        )
        trainer = tiny_trainer(steps, tmp_path)
        trainer.fit(module, ToyPrefixSuffixData(toy_documents(4), batch_size=2), ckpt_path=ckpt)
        return module, trainer

    torch.manual_seed(1)
    first, trainer = run(2)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    reference = {k: v.clone() for k, v in first.ref_model.state_dict().items()}
    policy = {k: v.clone() for k, v in first.policy.state_dict().items()}
    torch.manual_seed(2)  # the resumed process draws another seed
    other, _ = scratch_model(tiny_random_lm, seed=2)
    assert not torch.equal(other.lm_head.weight, reference["lm_head.weight"])
    second, trainer = run(2, ckpt=str(tmp_path / "step2.ckpt"))  # restores, trains no further step
    assert trainer.global_step == 2
    assert all(torch.equal(v, reference[k]) for k, v in second.ref_model.state_dict().items())
    assert all(torch.equal(v, policy[k]) for k, v in second.policy.state_dict().items())


RANK_SCRIPT = """
import sys
import torch
from lightning.fabric.utilities.data import AttributeDict
from lit_selfimprove.modules._shared import load_policy

def rank_main(rank, model, out):
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(10 + rank)  # per-rank seeds
    module = type("Module", (), {})()
    module.policy, module._frozen, module._trainer, module.device = None, {}, None, torch.device("cpu")
    module.hparams = AttributeDict(
        model=model, dtype="float32", attn_implementation=None, quantization=None, lora=None, from_scratch=True
    )
    load_policy(module, reference=True)
    weights = {k: v.clone() for k, v in module.policy.state_dict().items()}
    ref = {k: v.clone() for k, v in module._frozen["ref"].state_dict().items()}
    torch.save({"policy": weights, "ref": ref, "seed": module._scratch_seed}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()

if __name__ == "__main__":
    torch.multiprocessing.spawn(rank_main, args=(sys.argv[1], sys.argv[2]), nprocs=2, join=True)
"""


@pytest.mark.slow  # two spawned processes importing the library
def test_scratch_policy_and_reference_are_rank_zeros_under_per_rank_seeds(tiny_random_lm, tmp_path):
    from tests._launch import run_ranks

    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    r0, r1 = run_ranks(script, [tiny_random_lm], tmp_path, 300)
    assert r0["seed"] == r1["seed"] == 10  # rank 0's
    expected, _ = scratch_model(tiny_random_lm, seed=10)
    for r in (r0, r1):
        for part in ("policy", "ref"):
            assert all(torch.equal(v, expected.state_dict()[k]) for k, v in r[part].items()), part
