"""StudentRLVR under DDP and FSDP2 (``ModelParallelStrategy``): two gloo processes on CPU.

``tests/_dist_script.py`` trains 3 steps on 2 ranks in a subprocess (this pytest process never
initialises torch.distributed) and saves, per rank, the full policy weights and what the rank saw.
The ranks see different questions, so weights that stay identical prove that gradients are
synchronised (they diverge as soon as a backward bypasses DDP's all-reduce). FSDP2 ranks hold
shards, so there the proof is that FSDP2 ends with the same weights as DDP.

Also here, in-process: checkpoints hold the policy only, never the frozen KL reference.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_selfimprove.datamodules import ArithmeticProblemDataModule
from lit_selfimprove.modeling import load_causal_lm
from lit_selfimprove.modules import StudentRLVR

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("_dist_script.py")
TIMEOUT_S = 240  # a run takes ~10 s alone, ~30 s on loaded cores; a hang fails instead of blocking CI
STEPS, BATCH, GROUP = 3, 2, 4  # as in _dist_script.py
PROMPT = "Q: {question}\nA: "
_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(strategy: str, model_dir: str, out: Path) -> list[dict]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCH_ENV and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_", "LT_"))
    }
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    # own session: Lightning's launcher (rank 0) starts rank 1, and a hang must not leave it behind
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), strategy, model_dir, str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{strategy}: 2-rank run hung for {TIMEOUT_S} s\n{log[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftover ranks of a failed run
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{strategy}: exit code {proc.returncode}\n{log[-4000:]}"
    missing = [r for r in (0, 1) if not (out / f"rank{r}.pt").exists()]
    assert not missing, f"{strategy}: ranks {missing} wrote no result\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def two_rank_runs(tiny_random_lm, tmp_path_factory):
    """``strategy -> [rank0, rank1]`` results, each strategy run once per module."""
    runs: dict[str, list[dict]] = {}

    def get(strategy: str) -> list[dict]:
        if strategy not in runs:
            runs[strategy] = _run_two_ranks(strategy, tiny_random_lm, tmp_path_factory.mktemp(strategy))
        return runs[strategy]

    return get


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


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
    assert _max_diff(r0["weights"], r1["weights"]) <= 1e-6
    # (b) training happened; the frozen reference did not move
    assert _max_diff(r0["weights"], initial) > 1e-3
    for res in (r0, r1):
        assert not res["ref_requires_grad"]
        assert _max_diff(res["ref_weights"], initial) == 0.0
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
        assert _max_diff(a["weights"], b["weights"]) < 1e-4  # different reduction order only


@pytest.mark.parametrize("kl_coef", [0.001, 0.0])
def test_checkpoint_holds_only_the_policy(tiny_random_lm, tmp_path, kl_coef):
    module = StudentRLVR(
        tiny_random_lm,
        reward=lambda completions, answers: torch.tensor(
            [float(any(c.isdigit() for c in t)) for t in completions]
        ),
        prompt_template=PROMPT,
        group_size=2,
        max_new_tokens=4,
        kl_coef=kl_coef,
        val_num_samples=0,
        log_samples_every=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, ArithmeticProblemDataModule(levels=[1], num_train=4, num_test=2, batch_size=2))
    # a reference model only when the KL term needs one; never a registered submodule
    assert (module.ref_model is not None) == (kl_coef > 0)
    assert not any(name.startswith("_frozen") for name, _ in module.named_modules())
    path = tmp_path / "rlvr.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == {f"policy.{k}" for k in module.policy.state_dict()}
