"""SIP on the tiny facts world with a TRAINED judge and rewriter in place of the rule-based oracle.

    python experiments/sip_trained_judges.py            # 590 s (10 min) measured on 2 shared CPU cores
    python experiments/sip_trained_judges.py --quick    # a smoke run (seconds; tests/test_sip_trained_judges.py)

1. Labels: the knowledge-base oracle labels the tiny world's ``judge`` split (safety and pairwise
   quality, :func:`lit_selfimprove.datamodules.tiny_judge_labels.tiny_judge_rows`) and rewrites the chunks of
   the ``rewriter`` split (``KBRewriter``). Rows are held out by document (stable hash of
   ``doc_id``, ``--val-fraction``), as ``JudgeExamplesDataModule`` / ``RewriterExamplesDataModule``
   split them.
2. One tiny judge (quality + safety in one model, as the paper's judge) and one tiny rewriter, both
   from ``builtin:tiny-sip-policy``: a supervised warm-up on the oracle's answers (``NextTokenLM``,
   loss on the answer tokens only), then GRPO (``StudentRLVR`` through ``configs/tiny/judge_grpo.yaml``
   with ``JudgeVerdictReward`` / ``configs/tiny/rewriter_grpo.yaml`` with ``RewriteReward``).
3. Agreement with the oracle on the held-out rows, greedy, through ``HFChatBackend`` on exactly the
   prompts ``LLMSafetyJudge`` / ``LLMPairwiseJudge`` / ``LLMRewriter`` send: accuracy, confusion
   matrix and unparseable rate (judge); exact match with the oracle's rewrite, safety and
   factuality of the rewrites, the paper's rewrite reward (rewriter); after SFT and after GRPO.
4. SIP (``configs/tiny/sip_dpo.yaml``, fewer steps) with judge = pairwise quality (all pairs) +
   safety, and the rewrite as a candidate: once with the oracle (``KBQualityJudge``,
   ``KBSafetyJudge``, ``KBRewriter``), once with the trained models (``LLMPairwiseJudge``,
   ``LLMSafetyJudge``, ``LLMRewriter`` over ``HFChatBackend``), plus the next-token baseline with the
   same steps. No trained factuality judge: both SIP arms leave the pointwise factuality component
   out (``KBQualityJudge`` prefers the factual text on a coherence tie, so the pairwise labels carry
   factuality). The policies are then scored BY THE ORACLE on held-out prefixes, as in
   ``experiments/sip_tiny_comparison.py`` (its ``Evaluator``): factuality, fact accuracy, safety,
   win rate vs next-token and vs the original suffix.

Writes ``docs/sip_trained_judges.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

TOKENIZER = "builtin:tiny-tokenizer"
BASE = "builtin:tiny-sip-policy"
MAX_PREFIX_CHARS = 60
JUDGE_MAX_TOKENS = 24  # "FINAL DECISION: YES" is 19 characters (= tokens)
REWRITE_MAX_TOKENS = 48


# ------------------------------------------------------------------------------- SFT warm-up
def sft_batches(tokenizer, records: list[tuple[str, str]], max_length: int = 256) -> list[dict]:
    """``(question, answer)`` pairs -> rows of ``input_ids`` / ``labels`` (loss on answer + EOS only).

    The question is tokenized as ``generate`` tokenizes a prompt (with the tokenizer's BOS), the
    answer appended without special tokens, then EOS, so the model learns to stop."""
    rows = []
    for question, answer in records:
        q = tokenizer(question)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (q + a)[-max_length:]
        labels = ([-100] * len(q) + a)[-max_length:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def make_sft_datamodule(tokenizer, records: list[tuple[str, str]], batch_size: int, seed: int):
    import torch
    from lightning import LightningDataModule
    from torch.utils.data import DataLoader

    rows = sft_batches(tokenizer, records)
    pad = tokenizer.pad_token_id

    def collate(batch):
        n = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, r in enumerate(batch):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    class SFTData(LightningDataModule):
        def train_dataloader(self):
            gen = torch.Generator().manual_seed(seed)
            return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=collate)

    return SFTData()


def sft(
    start: str, records: list[tuple[str, str]], out: Path, steps: int, lr: float, batch_size: int, seed: int
):
    """Supervised warm-up with ``NextTokenLM``; the model and tokenizer are written to ``out``."""
    import lightning as L

    from lit_selfimprove.modeling import load_tokenizer
    from lit_selfimprove.modules import NextTokenLM

    L.seed_everything(seed, verbose=False)
    module = NextTokenLM(
        model=start,
        tokenizer=TOKENIZER,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        save_to=str(out),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=make_sft_datamodule(load_tokenizer(TOKENIZER), records, batch_size, seed))
    return out


# ------------------------------------------------------------------------------------ GRPO
def cli_fit(args: list[str]):
    from lit_selfimprove.cli import main as cli_main

    return cli_main(["fit", *args])


def grpo(config: str, start: Path, root: Path, name: str, steps: int, extra: list[str]) -> Path:
    """``StudentRLVR`` from ``start`` with ``config``; the ``SaveHFModel`` folder of the run."""
    cli = cli_fit(
        [
            "--config", config, f"--model.init_args.model={start}",
            f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={root}", f"--trainer.logger.init_args.name={name}",
            *extra,
        ]
    )  # fmt: skip
    return Path(cli.trainer.log_dir) / "hf"


# ------------------------------------------------------------------------------ agreement
def backend(folder: Path | str, batch_size: int = 64):
    from lit_selfimprove.judges import HFChatBackend

    return HFChatBackend(str(folder), tokenizer=TOKENIZER, batch_size=batch_size)


def judge_agreement(folder: Path | str, records: list[dict]) -> dict:
    """Greedy verdicts of the judge in ``folder`` on held-out ``{"question", "answer"}`` records
    (the questions are exactly what LLMSafetyJudge / LLMPairwiseJudge send): per kind accuracy,
    confusion matrix (label -> predicted, ``"unparseable"`` included) and unparseable rate."""
    from lit_selfimprove.rewards.judge_verdict import JUDGE_KINDS, _kind_of

    names = {"safety": {1.0: "safe", 0.0: "unsafe"}, "pairwise": {1.0: "first", 0.0: "second"}}
    answers = backend(folder).complete([r["question"] for r in records], max_tokens=JUDGE_MAX_TOKENS)
    out: dict = {}
    for rec, (text,) in zip(records, answers):
        kind = _kind_of(rec["answer"])
        parse = JUDGE_KINDS[kind]
        label, pred = parse(rec["answer"]), parse(text)
        o = out.setdefault(kind, {"n": 0, "correct": 0, "unparseable": 0, "confusion": {}, "examples": []})
        o["n"] += 1
        o["correct"] += pred is not None and abs(pred - label) < 1e-6
        o["unparseable"] += pred is None
        row = o["confusion"].setdefault(names[kind][label], Counter())
        row["unparseable" if pred is None else names[kind][pred]] += 1
        if len(o["examples"]) < 3:
            o["examples"].append(text)
    for o in out.values():
        o["accuracy"] = o["correct"] / o["n"]
        o["unparseable_rate"] = o["unparseable"] / o["n"]
        labels = Counter({k: sum(v.values()) for k, v in o["confusion"].items()})
        o["majority_baseline"] = max(labels.values()) / o["n"]
        o["confusion"] = {k: dict(v) for k, v in sorted(o["confusion"].items())}
    return out


def rewriter_agreement(folder: Path | str | None, rows: list[dict]) -> dict:
    """Greedy rewrites (``LLMRewriter`` over ``HFChatBackend``; ``None``: the input suffix unchanged)
    of held-out ``{"prefix", "suffix"}`` rows against the oracle (``KBRewriter``)."""
    from lit_selfimprove.datamodules.tiny_judge_labels import TINY_REWRITER_TEMPLATE
    from lit_selfimprove.judges import (
        KBFactualityJudge,
        KBQualityJudge,
        KBRewriter,
        KBSafetyJudge,
        LLMRewriter,
    )
    from lit_selfimprove.rewards import RewriteReward
    from lit_selfimprove.rewards.rewrite import rewrite_answer

    prefixes, suffixes = [r["prefix"] for r in rows], [r["suffix"] for r in rows]
    oracle = KBRewriter().rewrite(prefixes, suffixes)
    if folder is None:
        texts, unparseable = list(suffixes), 0
    else:
        rw = LLMRewriter(
            backend(folder),
            template=TINY_REWRITER_TEMPLATE,
            max_tokens=REWRITE_MAX_TOKENS,
            seed_words=0,
            max_prefix_chars=MAX_PREFIX_CHARS,
        )
        texts = rw.rewrite(prefixes, suffixes)
        unparseable = rw.stats["unparseable"]
    safe_in = KBSafetyJudge().score(prefixes, suffixes)
    safety = KBSafetyJudge().score(prefixes, texts)
    fact = KBFactualityJudge().score(prefixes, texts)
    reward = RewriteReward(KBSafetyJudge(), KBQualityJudge(), seed_words=0)
    # the reward reads a completion as LLMRewriter does (strip_seed); an unparseable answer became
    # the input suffix above, which the reward scores as a copy: use the rewrite texts themselves
    rewards = reward(texts, [rewrite_answer(p, s) for p, s in zip(prefixes, suffixes)]).tolist()
    n = len(rows)
    safe_idx = [i for i, s in enumerate(safe_in) if s]
    unsafe_idx = [i for i, s in enumerate(safe_in) if not s]
    return {
        "n": n,
        "unsafe_inputs": len(unsafe_idx),
        "exact_match_oracle": sum(t.strip() == o.strip() for t, o in zip(texts, oracle)) / n,
        "copy_rate_safe_inputs": sum(texts[i].strip() == suffixes[i].strip() for i in safe_idx)
        / max(1, len(safe_idx)),
        "safety": sum(safety) / n,
        "safety_unsafe_inputs": sum(safety[i] for i in unsafe_idx) / max(1, len(unsafe_idx)),
        "factuality": sum(fact) / n,
        "rewrite_reward": sum(rewards) / n,
        "unparseable_rate": unparseable / n,
        "examples": [[s, t, o] for s, t, o in list(zip(suffixes, texts, oracle))[:3]],
    }


# ------------------------------------------------------------------------------------- SIP
def sip_args(
    kind: str, args, root: Path, judge_folder: Path | None, rewriter_folder: Path | None
) -> list[str]:
    from lit_selfimprove.datamodules.tiny_judge_labels import TINY_PAIRWISE_TEMPLATE, TINY_SAFETY_TEMPLATE

    common = [
        f"--trainer.max_steps={args.sip_steps}", f"--trainer.val_check_interval={args.sip_steps}",
        f"--trainer.logger.init_args.save_dir={root}", f"--trainer.logger.init_args.name=sip_{kind}",
        "--trainer.enable_progress_bar=false", f"--seed_everything={args.seed}",
        f"--data.init_args.seed={args.seed}", f"--data.init_args.batch_size={args.sip_batch}",
    ]  # fmt: skip
    if kind == "next_token":
        return ["--config", "configs/tiny/sip_next_token.yaml", *common]
    cmd = [
        "--config", "configs/tiny/sip_dpo.yaml", *common, f"--model.init_args.seed={args.seed}",
        f"--model.init_args.candidates.num_rollouts={args.k}",
        "--model.init_args.candidates.include_rewrite=true",
        '--model.init_args.judge_health={"fail_after_steps": null}',  # (a dotted null fails in jsonargparse)
        "--trainer.callbacks=[]",
    ]  # fmt: skip
    if kind == "oracle":
        judge = {
            "quality": {"class_path": "lit_selfimprove.judges.KBQualityJudge"},
            "safety": {"class_path": "lit_selfimprove.judges.KBSafetyJudge"},
        }
        rewriter = {"class_path": "lit_selfimprove.judges.KBRewriter"}
    else:

        def hf(folder):
            return {
                "class_path": "lit_selfimprove.judges.HFChatBackend",
                "init_args": {"model": str(folder), "tokenizer": TOKENIZER, "batch_size": 128},
            }

        judge = {
            "quality": {
                "class_path": "lit_selfimprove.judges.LLMPairwiseJudge",
                "init_args": {
                    "backend": hf(judge_folder),
                    "template": TINY_PAIRWISE_TEMPLATE,
                    "max_tokens": JUDGE_MAX_TOKENS,
                    "max_prefix_chars": MAX_PREFIX_CHARS,
                },
            },
            "safety": {
                "class_path": "lit_selfimprove.judges.LLMSafetyJudge",
                "init_args": {
                    "backend": hf(judge_folder),
                    "template": TINY_SAFETY_TEMPLATE,
                    "repeats": 1,
                    "temperature": 0.0,
                    "max_tokens": JUDGE_MAX_TOKENS,
                    "max_prefix_chars": MAX_PREFIX_CHARS,
                },
            },
        }
        rewriter = {
            "class_path": "lit_selfimprove.judges.LLMRewriter",
            "init_args": {
                "backend": hf(rewriter_folder),
                "template": "{prefix}|{suffix}\nRewrite:\n",
                "max_tokens": REWRITE_MAX_TOKENS,
                "seed_words": 0,
                "max_prefix_chars": MAX_PREFIX_CHARS,
            },
        }
    combined = {
        "class_path": "lit_selfimprove.judges.CombinedJudge",
        "init_args": {
            **judge,
            "factuality": None,
            "quality_mode": "all_pairs",
            "weights": {"quality": 1.0, "safety": 1.0},
        },
    }
    return cmd + [
        f"--model.init_args.judge={json.dumps(combined)}",
        f"--model.init_args.rewriter={json.dumps(rewriter)}",
    ]


def run_sip(kind: str, args, root: Path, judge_folder=None, rewriter_folder=None) -> tuple[object, dict]:
    cli_args = sip_args(kind, args, root, judge_folder, rewriter_folder)
    start = time.perf_counter()
    cli = cli_fit(cli_args)
    module = cli.model
    model = getattr(module, "policy", None) or module.model
    model.eval()
    info = {
        "command": "python -m lit_selfimprove fit " + " ".join(f"'{a}'" if "{" in a else a for a in cli_args),
        "seconds": time.perf_counter() - start,
        "steps": cli.trainer.global_step,
        "log_dir": str(cli.trainer.log_dir),
    }
    judge = getattr(module, "judge", None)
    if judge is not None:
        stats = {}
        for name in ("quality", "safety"):
            j = getattr(judge, name, None)
            if j is not None and hasattr(j, "stats"):
                stats[name] = {k: v for k, v in j.stats.items() if isinstance(v, (int, float))}
        rw = getattr(module, "rewriter", None)
        if rw is not None and hasattr(rw, "stats"):
            stats["rewriter"] = {k: v for k, v in rw.stats.items() if isinstance(v, (int, float))}
        info["judge_stats"] = stats
    return model, info


# ------------------------------------------------------------------------------------ main
def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: a handful of steps and examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--judge-sft-steps", type=int, default=800)
    p.add_argument("--judge-grpo-steps", type=int, default=30)
    p.add_argument("--rewriter-sft-steps", type=int, default=800)
    p.add_argument("--rewriter-grpo-steps", type=int, default=20)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--sip-steps", type=int, default=60)
    p.add_argument("--sip-batch", type=int, default=8)
    p.add_argument("--k", type=int, default=4, help="SIP rollouts per prefix")
    p.add_argument("--num-prefixes", type=int, default=200)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-examples", type=int, default=None, help="labelled rows per kind (default: all)")
    p.add_argument("--out-dir", default="runs/sip_trained_judges")
    p.add_argument("--json", default="docs/sip_trained_judges.json")
    args = p.parse_args(argv)
    if args.quick:
        args.judge_sft_steps = args.rewriter_sft_steps = 2
        args.judge_grpo_steps = args.rewriter_grpo_steps = 1
        args.sip_steps, args.sip_batch, args.k = 1, 2, 2
        args.num_prefixes, args.samples = 4, 1
        args.max_examples = args.max_examples or 24
        args.val_fraction = 0.5
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.chdir(REPO)  # the configs name the corpus relative to the repository
    t0 = time.perf_counter()
    root = (REPO / args.out_dir).resolve()
    times: dict[str, float] = {}

    # ---- 1. oracle labels, written once (the DataModules read the files)
    from lit_selfimprove.datamodules import JudgeExamplesDataModule, RewriterExamplesDataModule
    from lit_selfimprove.datamodules.tiny_judge_labels import (
        TINY_PAIRWISE_TEMPLATE,
        TINY_REWRITER_TEMPLATE,
        TINY_SAFETY_TEMPLATE,
        tiny_chunks,
        tiny_judge_rows,
    )
    from lit_selfimprove.judges import KBRewriter

    rows = tiny_judge_rows(("safety", "pairwise"), seed=args.seed)
    if args.max_examples:
        by_kind = [
            [r for r in rows if r["kind"] == kind][: args.max_examples] for kind in ("safety", "pairwise")
        ]
        rows = by_kind[0] + by_kind[1]
    judge_path, rewriter_path = root / "judge_rows.jsonl", root / "rewriter_rows.jsonl"
    write_jsonl(judge_path, rows)
    chunks = list(tiny_chunks("rewriter"))[: args.max_examples]
    write_jsonl(rewriter_path, chunks)
    judge_dm = JudgeExamplesDataModule(
        str(judge_path),
        tokenizer=TOKENIZER,
        kinds=["safety", "pairwise"],
        pairwise_template=TINY_PAIRWISE_TEMPLATE,
        safety_template=TINY_SAFETY_TEMPLATE,
        max_prefix_chars=MAX_PREFIX_CHARS,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    judge_dm.setup()
    rw_dm = RewriterExamplesDataModule(
        path=str(rewriter_path),
        tokenizer=TOKENIZER,
        template=TINY_REWRITER_TEMPLATE,
        max_tokens=REWRITE_MAX_TOKENS,
        seed_words=0,
        max_prefix_chars=MAX_PREFIX_CHARS,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    rw_dm.setup()
    rw_train = [json.loads(r["answer"]) for r in rw_dm.train_records]
    rw_val = [json.loads(r["answer"]) for r in rw_dm.val_records]
    oracle_rewrites = KBRewriter().rewrite([r["prefix"] for r in rw_train], [r["suffix"] for r in rw_train])
    data = {
        "judge_rows": len(rows),
        "judge_train": len(judge_dm.train_records),
        "judge_heldout": len(judge_dm.val_records),
        "judge_labels": dict(Counter(f"{r['kind']}:{r['label']}" for r in rows)),
        "rewriter_train": len(rw_train),
        "rewriter_heldout": len(rw_val),
        "heldout": f"by document: stable hash of doc_id < {args.val_fraction}",
    }
    times["labels"] = time.perf_counter() - t0
    print(json.dumps(data), flush=True)

    # ---- 2-3. the judge: SFT warm-up, agreement, GRPO, agreement
    t = time.perf_counter()
    judge_grpo_extra = [
        f"--data.init_args.path={judge_path}", "--data.init_args.kinds=[safety,pairwise]",
        f"--data.init_args.pairwise_template={TINY_PAIRWISE_TEMPLATE}",
        f"--data.init_args.val_fraction={args.val_fraction}", f"--data.init_args.seed={args.seed}",
        "--model.init_args.reward.init_args.kind=auto", "--model.init_args.warmup_steps=0",
        f"--seed_everything={args.seed}",
    ]  # fmt: skip
    judges: dict = {"base": judge_agreement(BASE, judge_dm.val_records)}
    sft_judge = sft(
        BASE,
        [(r["question"], r["answer"]) for r in judge_dm.train_records],
        root / "judge_sft",
        args.judge_sft_steps,
        args.sft_lr,
        16,
        args.seed,
    )
    times["judge_sft"] = time.perf_counter() - t
    judges["sft"] = judge_agreement(sft_judge, judge_dm.val_records)
    t = time.perf_counter()
    judge_folder = sft_judge
    if args.judge_grpo_steps > 0:
        judge_folder = grpo(
            "configs/tiny/judge_grpo.yaml",
            sft_judge,
            root,
            "judge_grpo",
            args.judge_grpo_steps,
            judge_grpo_extra,
        )
        times["judge_grpo"] = time.perf_counter() - t
        judges["sft_grpo"] = judge_agreement(judge_folder, judge_dm.val_records)
    print(
        json.dumps({k: {kk: vv["accuracy"] for kk, vv in v.items()} for k, v in judges.items()}), flush=True
    )

    # ---- the rewriter: SFT warm-up on the oracle's rewrites, agreement, GRPO, agreement
    t = time.perf_counter()
    rewriters: dict = {"identity": rewriter_agreement(None, rw_val), "base": rewriter_agreement(BASE, rw_val)}
    sft_rw = sft(
        BASE,
        [(r["question"], w) for r, w in zip(rw_dm.train_records, oracle_rewrites)],
        root / "rewriter_sft",
        args.rewriter_sft_steps,
        args.sft_lr,
        16,
        args.seed,
    )
    times["rewriter_sft"] = time.perf_counter() - t
    rewriters["sft"] = rewriter_agreement(sft_rw, rw_val)
    rewriter_folder = sft_rw
    if args.rewriter_grpo_steps > 0:
        t = time.perf_counter()
        grpo_rw = grpo(
            "configs/tiny/rewriter_grpo.yaml",
            sft_rw,
            root,
            "rewriter_grpo",
            args.rewriter_grpo_steps,
            [
                "--data.init_args.corpus=null", f"--data.init_args.path={rewriter_path}",
                f"--data.init_args.val_fraction={args.val_fraction}", f"--data.init_args.seed={args.seed}",
                "--model.init_args.warmup_steps=0", f"--seed_everything={args.seed}",
            ],
        )  # fmt: skip
        times["rewriter_grpo"] = time.perf_counter() - t
        rewriters["sft_grpo"] = rewriter_agreement(grpo_rw, rw_val)
        # GRPO is kept only if it does not lower the held-out rewrite reward
        if rewriters["sft_grpo"]["rewrite_reward"] >= rewriters["sft"]["rewrite_reward"]:
            rewriter_folder = grpo_rw
    print(json.dumps({k: v["rewrite_reward"] for k, v in rewriters.items()}), flush=True)

    # ---- 4. SIP: next-token, oracle-judged, trained-judged; all scored by the oracle
    from sip_tiny_comparison import Evaluator

    ev = Evaluator(args.num_prefixes, args.samples, 40, 1234)
    from lit_selfimprove.modeling import load_causal_lm

    base_model = load_causal_lm(BASE).eval()
    results = {"base": ev.evaluate(base_model, 1.0)}
    runs = {}
    for kind in ("next_token", "oracle", "trained"):
        t = time.perf_counter()
        model, runs[kind] = run_sip(kind, args, root, judge_folder, rewriter_folder)
        times[f"sip_{kind}"] = time.perf_counter() - t
        results[kind] = ev.evaluate(model, 1.0)
    for r in results.values():
        ev.versus(r, results["next_token"])
    table = []
    for name, label in (
        ("base", "base policy (no further training)"),
        ("next_token", "next-token baseline"),
        ("oracle", "SIP, oracle judge + rewriter"),
        ("trained", "SIP, trained judge + rewriter"),
    ):
        r = results[name]
        table.append(
            {
                "name": label,
                "factuality": r["factuality"],
                "fact_accuracy": r["fact_accuracy"],
                "safety": r["safety"],
                "win_vs_next_token": r.get("vs_next_token", {}).get("win_rate"),
                "win_vs_suffix": r["vs_suffix"]["win_rate"],
                "train_seconds": runs.get(name, {}).get("seconds"),
            }
        )
    for r in results.values():
        r.pop("_texts", None)
        r.pop("_prefixes", None)
    summary = {
        "what": "tiny facts world: a trained LLM judge (safety + pairwise quality) and rewriter vs the KB oracle, "
        "then SIP with each; policies scored by the oracle",
        "command": "python experiments/sip_trained_judges.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items()},
        "data": data,
        "judge": judges,
        "judge_folder": str(judge_folder),
        "rewriter": rewriters,
        "rewriter_folder": str(rewriter_folder),
        "rewriter_grpo_kept": rewriter_folder != sft_rw,
        "sip": {"table": table, "runs": runs, "results": results},
        "seconds": {**times, "total": time.perf_counter() - t0},
    }
    out = REPO / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=float) + "\n")
    print_tables(summary)
    return summary


def print_tables(s: dict) -> None:
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    print(
        "\n| judge (held-out) | kind | n | accuracy | majority | unparseable | confusion (label -> predicted) |"
    )
    print("|---|---|---|---|---|---|---|")
    for stage, kinds in s["judge"].items():
        for kind, o in kinds.items():
            print(
                f"| {stage} | {kind} | {o['n']} | {f(o['accuracy'])} | {f(o['majority_baseline'])} | "
                f"{f(o['unparseable_rate'])} | {json.dumps(o['confusion'])} |"
            )
    print(
        "\n| rewriter (held-out) | exact = oracle | copy (safe in) | safety | safety (unsafe in) | factuality | reward | unparseable |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for stage, o in s["rewriter"].items():
        print(
            f"| {stage} | {f(o['exact_match_oracle'])} | {f(o['copy_rate_safe_inputs'])} | {f(o['safety'])} | "
            f"{f(o['safety_unsafe_inputs'])} | {f(o['factuality'])} | {f(o['rewrite_reward'])} | {f(o['unparseable_rate'])} |"
        )
    print(
        "\n| policy (oracle-scored) | factuality | fact accuracy | safety | win vs next-token | win vs suffix | train (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in s["sip"]["table"]:
        wall = f"{r['train_seconds']:.0f}" if r["train_seconds"] else ""
        print(
            f"| {r['name']} | {f(r['factuality'])} | {f(r['fact_accuracy'])} | {f(r['safety'])} | "
            f"{f(r['win_vs_next_token'])} | {f(r['win_vs_suffix'])} | {wall} |"
        )
    print(
        f"\ntotal {s['seconds']['total']:.0f} s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items())
    )


if __name__ == "__main__":
    main()
