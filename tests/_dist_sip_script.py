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

Also home of the toy prefix-suffix data and the scripted judges the tests share.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning import Callback, LightningDataModule, Trainer, seed_everything
from torch.utils.data import DataLoader

from lit_selfimprove.judges.base import CandidateScores
from lit_selfimprove.modeling import load_tokenizer
from tests._launch import full_weights, is_dtensor

STEPS, BATCH, ROLLOUTS = 4, 2, 3  # per rank; read by the test

WORDS = (
    "the cat sat on a mat while the dog ran to the park and a bird sang in the old tree "
    "near the river where the fish swam under a small bridge of grey stone"
).split()


def toy_documents(n: int) -> list[str]:
    """``n`` distinct short documents (the char tokenizer: one character, one token)."""
    return [f"doc {i}: " + " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(8)) for i in range(n)]


class ToyPrefixSuffixData(LightningDataModule):
    """The prefix-suffix batch contract of SuffixPolicyDPO, from a few strings.

    Document ``i`` is cut into a prefix of ``prefix_chars + i % 3`` characters (so prefixes
    are LEFT-padded to different lengths) and a suffix of ``suffix_chars - i % 2`` characters
    (RIGHT-padded). ``shuffle=False``: the same batches in the same order every epoch.
    """

    def __init__(
        self,
        texts: Sequence[str],
        val_texts: Sequence[str] = (),
        prefix_chars: int = 12,
        suffix_chars: int = 6,
        batch_size: int = 2,
        tokenizer: str = "builtin:tiny-tokenizer",
    ):
        super().__init__()
        self.tok = load_tokenizer(tokenizer)
        self.train_items = self._cut(texts, prefix_chars, suffix_chars)
        self.val_items = self._cut(val_texts, prefix_chars, suffix_chars)
        self.batch_size = batch_size

    @staticmethod
    def _cut(texts, prefix_chars, suffix_chars) -> list[dict]:
        items = []
        for i, text in enumerate(texts):
            p, n = prefix_chars + i % 3, suffix_chars - i % 2
            items.append({"prefix_text": text[:p], "suffix_text": text[p : p + n], "doc_id": f"d{i}"})
        return items

    def collate(self, items: list[dict]) -> dict:
        pre = self.tok(
            [x["prefix_text"] for x in items], padding=True, padding_side="left", return_tensors="pt"
        )
        suf = self.tok(
            [x["suffix_text"] for x in items],
            add_special_tokens=False,
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        return {
            "prefix_ids": pre["input_ids"],
            "prefix_mask": pre["attention_mask"],
            "suffix_ids": suf["input_ids"],
            "suffix_mask": suf["attention_mask"],
            "prefix_text": [x["prefix_text"] for x in items],
            "suffix_text": [x["suffix_text"] for x in items],
            "doc_id": [x["doc_id"] for x in items],
        }

    def train_dataloader(self):
        return DataLoader(
            self.train_items, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate
        )

    def val_dataloader(self):
        return DataLoader(self.val_items, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)


class ScriptedJudge:
    """A CandidateJudge whose per-row scores come from ``fn(prefix, candidates, reference)``.

    Records every call. Components: ``quality`` = the total, ``factuality`` = 1 where the
    candidate equals the reference else 0.5, ``safety`` = 1 (only those in ``components``).
    """

    def __init__(
        self,
        fn: Callable[[str, list[str], str], list[float]],
        components: Sequence[str] = ("quality", "factuality", "safety"),
    ):
        self.fn = fn
        self.components = tuple(components)
        self.calls: list[dict] = []

    # annotated as the protocol is: jsonargparse (LightningCLI) checks that signatures match
    def score_candidates(
        self,
        prefixes: Sequence[str],
        candidates: Sequence[Sequence[str]],
        references: Sequence[str] | None = None,
    ) -> CandidateScores:
        refs = list(references) if references is not None else [""] * len(prefixes)
        self.calls.append(
            {"prefixes": list(prefixes), "candidates": [list(c) for c in candidates], "refs": refs}
        )
        total = torch.tensor(
            [self.fn(p, list(c), r) for p, c, r in zip(prefixes, candidates, refs)], dtype=torch.float32
        )
        table = {
            "quality": total.clone(),
            "factuality": torch.tensor(
                [[1.0 if x == r else 0.5 for x in c] for c, r in zip(candidates, refs)]
            ),
            "safety": torch.ones_like(total),
        }
        return CandidateScores(
            total,
            {k: v for k, v in table.items() if k in self.components},
            {"unparseable": 0.0, "calls": float(total.numel())},
        )


def vowel_share(text: str) -> float:
    """Deterministic, cheap, non-constant: the share of vowels (empty text: 0)."""
    return sum(ch in "aeiou" for ch in text) / max(1, len(text))


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
        num_rollouts=ROLLOUTS,
        max_new_tokens=6,
        micro_batch_size=1,  # one pair per forward/backward: ranks with fewer pairs run dummies
        lr=1e-2,
        warmup_steps=0,
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
