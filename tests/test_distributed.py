"""StudentRLVR under DDP and FSDP2 (``ModelParallelStrategy``): two gloo processes on CPU.

``tests/_dist_script.py`` trains 3 steps on 2 ranks in a subprocess (this pytest process never
initialises torch.distributed) and saves, per rank, the full policy weights and what the rank saw.
The ranks see different questions, so weights that stay identical prove that gradients are
synchronised (they diverge as soon as a backward bypasses DDP's all-reduce). FSDP2 ranks hold
shards, so there the proof is that FSDP2 ends with the same weights as DDP.

Also here, in-process: checkpoints hold the policy only, never the frozen KL reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_selfimprove.datamodules import ArithmeticProblemDataModule
from lit_selfimprove.modeling import load_causal_lm
from lit_selfimprove.modules import StudentRLVR
from lit_selfimprove.rl.rlvr_config import RLVRConfig
from tests._launch import cached_runs, max_diff
from tests.helpers import PROMPT, tiny_trainer

SCRIPT = Path(__file__).with_name("_dist_script.py")
TIMEOUT_S = 240  # a run takes ~10 s alone, ~30 s on loaded cores; a hang fails instead of blocking CI
STEPS, BATCH, GROUP = 3, 2, 4  # as in _dist_script.py


@pytest.fixture(scope="module")
def two_rank_runs(tiny_random_lm, tmp_path_factory):
    """``strategy -> [rank0, rank1]`` results, each strategy run once per module."""
    return cached_runs(SCRIPT, tiny_random_lm, tmp_path_factory, TIMEOUT_S)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_split_the_data_and_stay_in_sync(two_rank_runs, tiny_random_lm, strategy):
    r0, r1 = two_rank_runs(strategy)
    initial = {k: v.float() for k, v in load_causal_lm(tiny_random_lm).state_dict().items()}
    expected = {"ddp": "DDPStrategy", "fsdp2": "ModelParallelStrategy"}[strategy]
    for r, res in enumerate((r0, r1)):
        assert res["rank"] == r and res["world_size"] == 2 and res["strategy"] == expected
        assert res["global_step"] == STEPS
        assert len(res["questions"]) == STEPS * BATCH and len(res["completions"]) == STEPS * BATCH * GROUP
        # FSDP2: policy and reference are sharded (DTensor); DDP: plain per-rank replicas
        assert res["policy_dtensor"] == res["ref_dtensor"] == (strategy == "fsdp2")
        assert res["optimizer_over_policy"]  # the optimizer holds the (sharded) policy parameters
        assert all(k.startswith("policy.") for k in res["state_dict_keys"])  # no reference weights
        assert res["cache_kwarg"] == "cache"  # KV cache still found on FSDP2's swapped class
    # (c) the data is split across ranks, and each rank samples its own completions
    assert set(r0["questions"]).isdisjoint(r1["questions"])
    assert r0["completions"] != r1["completions"]  # per-rank sampling RNG (not the shared global one)
    # (a) identical weights on both ranks (gradients all-reduced / reduce-scattered)
    assert max_diff(r0["weights"], r1["weights"]) <= 1e-6
    # (b) training happened; the frozen reference did not move
    assert max_diff(r0["weights"], initial) > 1e-3
    for res in (r0, r1):
        assert not res["ref_requires_grad"]
        assert max_diff(res["ref_weights"], initial) == 0.0
    # generation keeps ranks stepping together: rank 0 stops after 1 token, rank 1 samples 6, both
    # run the same number of forward passes (an unsynchronised FSDP2 rank would hang the other)
    g0, g1 = r0["uneven_generation"], r1["uneven_generation"]
    assert g0["lengths"] == [1, 1] and max(g1["lengths"]) > 1
    assert g0["forwards"] == g1["forwards"] == max(g1["lengths"])


def test_fsdp2_trains_like_ddp(two_rank_runs):
    """Same seed, data and samples: sharded training must reach DDP's weights (its ranks agree
    trivially, as they gather the same shards, so this is what proves FSDP2's gradient sync)."""
    ddp, fsdp = two_rank_runs("ddp"), two_rank_runs("fsdp2")
    first = BATCH * GROUP  # completions of step 1, sampled from identical initial weights
    for a, b in zip(ddp, fsdp):
        assert a["questions"] == b["questions"]
        assert a["completions"][:first] == b["completions"][:first]
        assert max_diff(a["weights"], b["weights"]) < 1e-4  # different reduction order only


@pytest.mark.parametrize("kl_coef", [0.001, 0.0])
def test_checkpoint_holds_only_the_policy(tiny_random_lm, tmp_path, kl_coef):
    module = StudentRLVR(
        tiny_random_lm,
        reward=lambda completions, answers: torch.tensor(
            [float(any(c.isdigit() for c in t)) for t in completions]
        ),
        prompt_template=PROMPT,
        rl=RLVRConfig(group_size=2, max_new_tokens=4, kl_coef=kl_coef),
        val_num_samples=0,
        log_samples_every=0,
    )
    trainer = tiny_trainer(1, devices=1)
    trainer.fit(module, ArithmeticProblemDataModule(levels=[1], num_train=4, num_test=2, batch_size=2))
    # a reference model only when the KL term needs one; never a registered submodule
    assert (module.ref_model is not None) == (kl_coef > 0)
    assert not any(name.startswith("_frozen") for name, _ in module.named_modules())
    path = tmp_path / "rlvr.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == {f"policy.{k}" for k in module.policy.state_dict()}
