"""``python -m lit_selfimprove lm-eval``: standard-benchmark scores of a policy (lm-evaluation-harness).

    python -m lit_selfimprove lm-eval --model runs/sip_dpo_continual/version_0/checkpoints/last.ckpt \\
        --tasks boolq,piqa,social_iqa,hellaswag,arc_easy,arc_challenge,openbookqa,mmlu --output lm_eval.json
    python -m lit_selfimprove lm-eval --model builtin:tiny-sip-policy --tasks my_task --include-path my_tasks/

``--model`` is read by :func:`~lit_selfimprove.evaluation.checkpoint.load_eval_model` (an HF folder,
a hub id, ``builtin:NAME`` or a Lightning checkpoint) and evaluated in memory by
:func:`~lit_selfimprove.evaluation.lm_eval_adapter.evaluate_model` (task YAMLs of your own, offline
datasets and the scores: see that module). Unknown task names fail before the model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_selfimprove.evaluation.checkpoint import load_eval_model
from lit_selfimprove.evaluation.lm_eval_adapter import (
    METRICS,
    PAPER_TASKS,
    LMEvalError,
    evaluate_model,
    require_lm_eval,
    split_names,
    task_manager,
)


def evaluate_path(
    path: str,
    tasks: str | Sequence[str],
    tokenizer: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    **kwargs: Any,
) -> dict[str, Any] | None:
    """:func:`load_eval_model` then :func:`evaluate_model` (``kwargs``); the summary names the model."""
    model, tok = load_eval_model(path, tokenizer=tokenizer, dtype=dtype, device=device)
    summary = evaluate_model(model, tok, tasks, **kwargs)
    if summary is not None:
        summary["model"] = str(path)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of the summary's tasks and average."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    width = max([len("average")] + [len(t) for t in summary["tasks"]])
    lines = [f"{'task':<{width}}  {'acc':>7}  {'acc_norm':>8}  {'score':>7}  n"]
    for name, e in summary["tasks"].items():
        n = "-" if e["num_samples"] is None else str(e["num_samples"])
        lines.append(
            f"{name:<{width}}  {fmt(e['acc']):>7}  {fmt(e['acc_norm']):>8}  {fmt(e['score']):>7}  {n}"
        )
    lines.append(f"{'average':<{width}}  {'':>7}  {'':>8}  {fmt(summary['average']):>7}")
    return "\n".join(lines)


def _limit(text: str) -> int | float:
    """``--limit`` (> 0): a whole number is a count of documents per task, any other a share of them."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("--limit must be > 0")
    return int(value) if value >= 1 and value == int(value) else value


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """``lit-selfimprove lm-eval``: print the scores table (and write ``--output``); returns the summary."""
    p = argparse.ArgumentParser(
        prog="lit_selfimprove lm-eval",
        description="Evaluate a policy on lm-evaluation-harness tasks (acc / acc_norm per task, average).",
    )
    p.add_argument(
        "--model", required=True, help="HF folder / hub id / builtin:NAME, or a Lightning checkpoint"
    )
    p.add_argument("--tokenizer", default=None, help="default: the model's (a checkpoint's hyper-parameters)")
    p.add_argument(
        "--tasks", required=True, help=f"comma-separated lm-eval tasks (paper: {','.join(PAPER_TASKS)})"
    )
    p.add_argument("--include-path", action="append", default=None, help="folder of task YAMLs (repeatable)")
    p.add_argument("--limit", type=_limit, default=None, help="documents per task (N, or a share < 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--metric", choices=METRICS, default="auto", help="the per-task score that is averaged")
    p.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", default="float32", help="float32 (CPU), bfloat16, float16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the summary (and lm-eval's results) as JSON")
    p.add_argument("--log-samples", action="store_true", help="keep per-document records in --output")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    tasks = split_names(args.tasks)
    try:
        require_lm_eval()
        print(f"lm-eval: checking tasks {tasks} ...", file=sys.stderr, flush=True)
        task_manager(tasks, args.include_path)  # unknown names fail before the model loads
        print(f"lm-eval: loading {args.model} ...", file=sys.stderr, flush=True)
        summary = evaluate_path(
            args.model,
            tasks,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            device=args.device,
            include_path=args.include_path,
            limit=args.limit,
            batch_size=args.batch_size,
            num_fewshot=args.num_fewshot,
            metric=args.metric,
            max_length=args.max_length,
            seed=args.seed,
            log_samples=args.log_samples,
        )
    except (LMEvalError, ImportError, FileNotFoundError) as err:
        raise SystemExit(f"lm-eval: {err}") from err
    if summary is None:
        return None
    print(format_table(summary))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2, default=str))
        print(f"lm-eval: wrote {out}", file=sys.stderr)
    return summary
