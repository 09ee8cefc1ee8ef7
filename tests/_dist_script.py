"""Two-process CPU (gloo) run of ``StudentRLVR`` used by ``tests/test_distributed.py``.

Usage: ``python tests/_dist_script.py {ddp|fsdp2} MODEL_DIR OUT_DIR``. Lightning's script launcher
re-runs this file for rank 1 (same argv, ``LOCAL_RANK=1``), so it must not create files both ranks
would race on. Each rank trains 3 steps, then writes ``OUT_DIR/rank{r}.pt`` with its *full* policy
weights (FSDP2: gathered from the shards), the questions it trained on, the completions it sampled
and a few facts about the setup (param types, optimizer params, reference model).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning import Callback, Trainer, seed_everything

from lit_selfimprove.datamodules.arithmetic import ArithmeticProblemDataModule
from lit_selfimprove.generation import generate
from lit_selfimprove.generation.sampler import _cache_kwarg
from lit_selfimprove.modules.student_rlvr import StudentRLVR
from lit_selfimprove.rl.rlvr_config import RLVRConfig
from tests._launch import full_weights, is_dtensor


class DigitFractionReward:
    """Deterministic, cheap, non-constant reward: fraction of digit characters in a completion."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, completions, answers):
        self.seen.extend(completions)
        return torch.tensor([sum(c.isdigit() for c in t) / max(1, len(t)) for t in completions])


class RecordQuestions(Callback):
    def __init__(self):
        self.questions: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.questions.extend(batch["question"])


class AllTokensEos:
    """A tokenizer view in which every token id is an EOS: generation stops after one token."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = list(range(len(tokenizer)))

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def uneven_generation(module: StudentRLVR, rank: int) -> dict:
    """Rank 0 is done after one token, rank 1 samples ``max_new_tokens``: with ``sync_ranks``
    both must run the same number of forward passes (FSDP2 would hang otherwise)."""
    calls = []
    hook = module.policy.register_forward_hook(lambda *_: calls.append(1))
    tok = AllTokensEos(module.tokenizer) if rank == 0 else module.tokenizer
    rollouts = generate(module.policy, tok, ["Q: 1+1\nA: "], num_samples=2, max_new_tokens=6)
    hook.remove()
    return {"forwards": len(calls), "lengths": rollouts.lengths.tolist()}


def main() -> None:
    which, model_dir, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    if which == "ddp":
        strategy = "ddp"
    elif which == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        raise SystemExit(f"unknown strategy {which!r}")
    seed_everything(0, verbose=False)
    reward = DigitFractionReward()
    module = StudentRLVR(
        model=model_dir,
        prompt_template="Q: {question}\nA: ",
        reward=reward,
        # micro_batch_size 4: 2 questions x 4 samples, two backward passes per step
        rl=RLVRConfig(group_size=4, max_new_tokens=8, micro_batch_size=4, kl_coef=0.001),
        lr=1e-2,
        val_num_samples=0,
        log_samples_every=0,
    )
    data = ArithmeticProblemDataModule(levels=[2], num_train=64, num_test=8, batch_size=2)
    recorder = RecordQuestions()
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=data)

    policy, ref = module.policy, module.ref_model
    opt = trainer.optimizers[0]
    opt_params = [p for group in opt.param_groups for p in group["params"]]
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "global_step": trainer.global_step,
        "questions": recorder.questions,
        "completions": reward.seen,
        "weights": full_weights(policy),
        "ref_weights": full_weights(ref) if ref is not None else None,
        "policy_dtensor": all(is_dtensor(p) for p in policy.parameters()),
        "ref_dtensor": ref is not None and all(is_dtensor(p) for p in ref.parameters()),
        "ref_requires_grad": ref is not None and any(p.requires_grad for p in ref.parameters()),
        "optimizer_over_policy": len(opt_params) == len(policy_params)
        and all(a is b for a, b in zip(opt_params, policy_params)),
        "state_dict_keys": sorted(module.state_dict()),
        "cache_kwarg": _cache_kwarg(policy),
        "uneven_generation": uneven_generation(module, trainer.global_rank),
    }
    torch.save(result, out_dir / f"rank{trainer.global_rank}.pt")
    # rank 0 (the launcher) must not exit before rank 1 has written its file
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
