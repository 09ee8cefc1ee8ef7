"""Two-process CPU (gloo) run of ``SuffixPolicyDPO`` used by ``tests/test_suffix_policy_dpo.py``.

Usage: ``python tests/_dist_sip_script.py {ddp|fsdp2} MODEL_DIR OUT_DIR``. Lightning's script
launcher re-runs this file for rank 1 (same argv, ``LOCAL_RANK=1``), so it must not create files
both ranks would race on. Each rank trains ``STEPS`` steps, then writes ``OUT_DIR/rank{r}.pt``
with its *full* policy weights (FSDP2: gathered from the shards), the prefixes and candidates it
judged, the selection counts of every step and a few facts about the setup.

The judge makes the ranks disagree on purpose (see :class:`UnevenJudge`): at step 1 rank 0 has
no pair at all, at step 2 no rank has one, at step 3 rank 0 has one pair and rank 1 two. Ranks
must still run the same number of forward/backward passes (FSDP2 and DDP hang otherwise), and
the all-skipped step must count as a step without an update.

The toy prefix-suffix data and the scripted judge are those of the tests (``tests/helpers.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning import Callback, Trainer, seed_everything

from lit_selfimprove.judges.base import CandidateScores
from tests._launch import full_weights, is_dtensor
from tests.helpers import ScriptedJudge, ToyPrefixSuffixData, toy_documents, vowel_share

STEPS, BATCH, ROLLOUTS = 4, 2, 3  # per rank; read by the test


class UnevenJudge(ScriptedJudge):
    """Vowel share, except: at its 2nd call all rows of rank 0 are equal; at its 3rd call all
    rows of every rank; at its 4th call row 0 of rank 0 (see the module docstring)."""

    def __init__(self):
        super().__init__(lambda p, c, r: [vowel_share(x) for x in c])

    def score_candidates(
        self,
        prefixes: Sequence[str],
        candidates: Sequence[Sequence[str]],
        references: Sequence[str] | None = None,
    ) -> CandidateScores:
        out = super().score_candidates(prefixes, candidates, references)
        call, rank = len(self.calls), torch.distributed.get_rank()
        if (call == 2 and rank == 0) or call == 3:
            out.total[:] = 0.5
        elif call == 4 and rank == 0:
            out.total[0] = 0.5
        return out


class RecordSelection(Callback):
    """Each step's (global) selection counts, and the policy / reference forward passes of
    this rank: with and without gradients (the ranks' counts must match)."""

    def __init__(self):
        self.selections: list[dict] = []
        self.forwards = {"policy_grad": 0, "policy_no_grad": 0, "ref": 0}

    def _count(self, key: str):
        def hook(*_):
            if key == "policy" and torch.is_grad_enabled():
                self.forwards["policy_grad"] += 1
            else:
                self.forwards["policy_no_grad" if key == "policy" else "ref"] += 1

        return hook

    def on_train_start(self, trainer, pl_module):
        pl_module.policy.register_forward_hook(self._count("policy"))
        pl_module.ref_model.register_forward_hook(self._count("ref"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.selections.append(dict(pl_module.last_selection))


def main() -> None:
    from lit_selfimprove.modules.suffix_policy_dpo import SuffixPolicyDPO

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
    judge = UnevenJudge()
    module = SuffixPolicyDPO(
        model=model_dir,
        judge=judge,
        candidates={"num_rollouts": ROLLOUTS, "max_new_tokens": 6},
        # one pair per forward/backward: ranks with fewer pairs run dummies
        optim={"micro_batch_size": 1, "lr": 1e-2, "warmup_steps": 0},
        log_samples_every=0,
    )
    data = ToyPrefixSuffixData(toy_documents(2 * BATCH * STEPS), batch_size=BATCH)
    recorder = RecordSelection()
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=STEPS,
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
        "lr_steps": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        "prefixes": [p for call in judge.calls for p in call["prefixes"]],
        "candidates": [c for call in judge.calls for c in call["candidates"]],
        "selections": recorder.selections,
        "forwards": recorder.forwards,
        "weights": full_weights(policy),
        "ref_weights": full_weights(ref),
        "policy_dtensor": all(is_dtensor(p) for p in policy.parameters()),
        "ref_dtensor": all(is_dtensor(p) for p in ref.parameters()),
        "ref_requires_grad": any(p.requires_grad for p in ref.parameters()),
        "optimizer_over_policy": len(opt_params) == len(policy_params)
        and all(a is b for a, b in zip(opt_params, policy_params)),
        "state_dict_keys": sorted(module.state_dict()),
    }
    torch.save(result, out_dir / f"rank{trainer.global_rank}.pt")
    # rank 0 (the launcher) must not exit before rank 1 has written its file
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
