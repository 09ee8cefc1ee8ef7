"""SOAR's claims on the tiny world, with seeds and confidence intervals.

    python experiments/soar_tiny_comparison.py       # 10 seeds: 38 + 18 min measured (two invocations, 2 cores)
    python experiments/soar_tiny_comparison.py --seeds 0 --vendi-seeds 0 --ablation-seeds 0   # smoke

Everything runs on the **strict** hard set (``builtin:tiny-strict-train`` / ``-test``: 5-6 digit sums
with >= 5 carries that the base student solved 0/128 times) with the bundled tiny teacher and student.
The paper's claims, each measured here:

1. Hard-Only gets (almost) no learning signal: the base student's success rate on the hard set, and
   Hard-Only's training reward (``configs/tiny/soar_pq.yaml`` on D_train alone); stepping stones
   exist: the base student's success rate on 3-4 digit sums (``levels``).
2. SOAR-PQ > Hard-Only on the hard test split: per seed, SOAR (``configs/tiny/soar.yaml``) writes
   its promotion questions (PQ), then a fresh base student trains on PQ + D_train with the
   Hard-Only budget; greedy and pass@1/4/16 from 16 samples per test problem; the difference with a
   95% bootstrap confidence interval paired by seed.
3. Diversity: Vendi (n-gram) of 128 questions from the base teacher, the final grounded (SOAR)
   teacher and the final intrinsic teacher (``configs/tiny/soar_intrinsic.yaml``).
4. Structure vs answers: the share of PQ whose answer is right vs whose question is a well-formed
   problem of the world; and an ablation the paper could not run: the same PQ questions with the
   true answers (the world knows them), trained with the same budget.

Trainings are single-threaded processes, ``--jobs`` at a time. Writes ``--out`` (json: every number,
the per-seed values and the commands), ``--plot`` (png), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_selfimprove.callbacks.metrics_plot import read_metrics_csv  # noqa: E402
from lit_selfimprove.metrics.paired import paired_difference  # noqa: E402
from lit_selfimprove.prompts import TINY_STUDENT_PROMPT, TINY_TEACHER_PROMPT  # noqa: E402

STUDENT_ARMS = ("hard_only", "soar_pq", "soar_pq_true_answers")
LABELS = {
    "base": "base student",
    "hard_only": "Hard-Only",
    "soar_pq": "SOAR-PQ",
    "soar_pq_true_answers": "SOAR-PQ, true answers",
}
METRICS = ("val/accuracy", "val/pass@1", "val/pass@4", "val/pass@16")
TRAIN, TEST = "builtin:tiny-strict-train", "builtin:tiny-strict-test"
WELL_FORMED = re.compile(r"^\d{1,6}\+\d{1,6}$")  # a sum of two numbers of the world's levels 1-6


def run(cmd: list[str], log: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    print(f"  {time.time() - t0:5.0f} s  {log.stem}", flush=True)
    return time.time() - t0


def lightning(sub: str, config: str, root: Path, name: str, seed: int, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "lit_selfimprove", sub, "--config", config, f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={root}", f"--trainer.logger.init_args.name={name}",
        "--trainer.enable_progress_bar=false", f"--data.init_args.train_source={TRAIN}",
        f"--data.init_args.test_source={TEST}", *overrides,
    ]  # fmt: skip


def last_values(metrics_csv: Path) -> dict[str, float]:
    return {k: v[-1][1] for k, v in read_metrics_csv(metrics_csv).items()}


def series(metrics_csv: Path, key: str) -> list[float]:
    return [v for _, v in read_metrics_csv(metrics_csv).get(key, [])]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.exists() else []


def true_sum(question: str) -> str | None:
    return str(sum(int(x) for x in question.split("+"))) if WELL_FORMED.match(question) else None


def structure_vs_answers(rows: list[dict]) -> dict:
    """Claim 4: the share of pairs whose question is well-formed vs whose answer is right."""
    if not rows:
        return {"n": 0, "well_formed": None, "answer_right": None}
    well = [true_sum(r["question"]) is not None for r in rows]
    right = [true_sum(r["question"]) == r["answer"].strip() for r in rows]
    return {"n": len(rows), "well_formed": sum(well) / len(rows), "answer_right": sum(right) / len(rows)}


def with_true_answers(src: Path, dst: Path) -> None:
    rows = [dict(r, answer=true_sum(r["question"])) for r in read_jsonl(src)]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows if r["answer"] is not None))


def student(root: Path, arm: str, seed: int, args, extra: Path | None) -> dict:
    """A fresh base student trained by RLVR on D_train (+ ``extra``); its held-out metrics and rewards."""
    source = f"[{extra}]" if extra else "null"
    cmd = lightning("fit", "configs/tiny/soar_pq.yaml", root, f"student_{arm}", seed,
                    f"--trainer.max_steps={args.student_steps}", f"--data.init_args.extra_train_sources={source}",
                    f"--trainer.val_check_interval={args.student_steps}")  # fmt: skip
    seconds = run(cmd, root / f"student_{arm}.log")
    csv = root / f"student_{arm}" / "version_0" / "metrics.csv"
    vals = last_values(csv)
    return {
        **{m: vals.get(m) for m in METRICS},
        "train_reward": series(csv, "train/reward"),
        "train_zero_std_frac": series(csv, "train/zero_std_frac"),
        "seconds": seconds,
    }


def questions(root: Path, name: str, teacher: str, seed: int, args) -> dict:
    out = root / f"{name}_questions.jsonl"
    cmd = [
        sys.executable, "-m", "lit_selfimprove", "sample-questions", "--teacher", teacher,
        "--prompt", TINY_TEACHER_PROMPT, "--num", str(args.questions), "--batch", "64", "--max-new-tokens", "160",
        "--answer-check", "light", "--seed", str(seed), "--out", str(out),
    ]  # fmt: skip
    run(cmd, root / f"{name}_questions.log")
    summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    return {"vendi_ngram": summary["vendi_ngram"], **structure_vs_answers(read_jsonl(out))}


def soar_chain(seed: int, root: Path, args) -> dict:
    """SOAR's teacher run, then fresh students on its PQ (as written, and with the true answers)."""
    root.mkdir(parents=True, exist_ok=True)
    cmd = lightning(
        "fit", "configs/tiny/soar.yaml", root, "soar", seed, f"--trainer.max_steps={args.outer_steps}"
    )
    out = {"seconds": run(cmd, root / "soar.log")}
    folder = root / "soar" / "version_0"
    pq = folder / "promotion_questions.jsonl"
    rows = read_jsonl(pq)
    firsts = {r["promotion"]: r for r in reversed(rows)}  # the first row of each promotion
    out["promotions"] = [{"step": r["step"], "R_k*": r["reward"]} for _, r in sorted(firsts.items())]
    out["promotion_count"] = len(out["promotions"])
    # the baseline student's greedy accuracy on the hard test split (validation every N outer steps):
    # the last value is the promoted student's (SOAR-PS) when a promotion happened
    out["baseline_test_accuracy"] = series(folder / "metrics.csv", "val/accuracy")
    out["pq"] = structure_vs_answers(rows)
    out["students"] = {}
    if out["pq"]["n"]:
        out["students"]["soar_pq"] = student(root, "soar_pq", seed, args, pq)
        if seed in args.ablation_seeds:
            fixed = root / "pq_true_answers.jsonl"
            with_true_answers(pq, fixed)
            out["students"]["soar_pq_true_answers"] = student(root, "soar_pq_true_answers", seed, args, fixed)
    if seed in args.vendi_seeds:
        out["grounded_t"] = questions(root, "grounded_t", str(folder / "teacher"), seed, args)
    return out


def intrinsic_chain(seed: int, root: Path, args) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    cmd = lightning("fit", "configs/tiny/soar_intrinsic.yaml", root, "soar_intrinsic", seed,
                    f"--trainer.max_steps={args.outer_steps}")  # fmt: skip
    seconds = run(cmd, root / "soar_intrinsic.log")
    teacher = root / "soar_intrinsic" / "version_0" / "teacher"
    return {"seconds": seconds, **questions(root, "intrinsic_t", str(teacher), seed, args)}


def base_eval(root: Path, args) -> dict:
    """Claim 1's measurements: the base student's success rates on the hard sets and the stepping stones."""
    import torch

    from lit_selfimprove.datamodules.problem_sources import load_problems
    from lit_selfimprove.generation import generate
    from lit_selfimprove.metrics.pass_at_k import pass_at_k
    from lit_selfimprove.modeling import load_causal_lm, load_tokenizer
    from lit_selfimprove.worlds.arithmetic import generate_problems, quick_correct

    torch.set_num_threads(1)
    model, tok = load_causal_lm("builtin:tiny-student"), load_tokenizer("builtin:tiny-student")
    gen = torch.Generator().manual_seed(0)
    sets = {
        "strict_train": load_problems(TRAIN)[0],
        "strict_test": load_problems(TEST)[0],
        "fail128_train": load_problems("builtin:tiny-hard-train")[0],
        "stones_L3_L4": generate_problems([3, 4], 64, seed=99),
    }
    out = {}
    for name, rows in sets.items():
        n = args.base_samples
        correct = []
        for i in range(0, len(rows), 16):
            batch = rows[i : i + 16]
            prompts = [TINY_STUDENT_PROMPT.format(question=r["question"]) for r in batch]
            with torch.no_grad():
                ro = generate(
                    model, tok, prompts, num_samples=n, max_new_tokens=80, temperature=1.0, generator=gen
                )
            for j, r in enumerate(batch):
                correct.append(sum(quick_correct(ro.texts[j * n + s], r["answer"]) for s in range(n)))
        samples = n * len(rows)
        out[name] = {
            "problems": len(rows),
            "samples": samples,
            "correct": sum(correct),
            "success_rate": sum(correct) / samples,
            **{
                f"pass@{k}": statistics.mean(pass_at_k(n, c, k) for c in correct)
                for k in (1, 4, 16)
                if k <= n
            },
        }
        print(f"  base student on {name}: {sum(correct)}/{samples} samples right", flush=True)
    return out


def pq_arm(runs: dict, arm: str, seeds: list[int], ablation_seeds: list[int]) -> dict:
    """Per seed, the student of a PQ arm. A seed whose SOAR run never promoted has no PQ: the method
    then gives a student trained on D_train alone, which is that seed's Hard-Only run (the same
    command, seed and budget), so it counts as such instead of leaving the pairing."""
    wanted = seeds if arm == "soar_pq" else [s for s in seeds if s in ablation_seeds]
    out = {}
    for s in wanted:
        trained = runs["soar"][s]["students"].get(arm)
        if trained is None and runs["soar"][s]["promotion_count"] == 0:
            trained = {**runs["hard_only"][s], "no_pq": True}  # no promotion: D_train alone = Hard-Only
        if trained is not None:
            out[s] = trained
    return out


def summarize(runs: dict, base: dict, ablation_seeds: list[int]) -> dict:
    seeds = sorted(runs["soar"])
    arms = {"hard_only": {s: runs["hard_only"][s] for s in seeds}}
    for arm in ("soar_pq", "soar_pq_true_answers"):
        arms[arm] = pq_arm(runs, arm, seeds, ablation_seeds)
    table = {}
    for arm, per_seed in arms.items():
        table[arm] = {}
        for m in METRICS:
            values = [per_seed[s][m] for s in per_seed if per_seed[s].get(m) is not None]
            table[arm][m] = (
                {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                 "n": len(values), "per_seed": values}
                if values else None
            )  # fmt: skip

    def paired(a: str, b: str) -> dict:
        common = sorted(set(arms[a]) & set(arms[b]))
        out = {"seeds": common}
        for m in METRICS:
            if common:
                out[m] = paired_difference([arms[a][s][m] for s in common], [arms[b][s][m] for s in common])
        return out

    vendi = {"base_teacher": [runs["base_teacher"][s]["vendi_ngram"] for s in sorted(runs["base_teacher"])]}
    vendi["grounded_t"] = [
        runs["soar"][s]["grounded_t"]["vendi_ngram"] for s in seeds if "grounded_t" in runs["soar"][s]
    ]
    vendi["intrinsic_t"] = [runs["intrinsic"][s]["vendi_ngram"] for s in sorted(runs["intrinsic"])]
    hard_reward = [r for s in seeds for r in runs["hard_only"][s]["train_reward"]]
    pq = [runs["soar"][s]["pq"] for s in seeds if runs["soar"][s]["pq"]["n"]]
    return {
        "students": table,
        "soar_pq_minus_hard_only": paired("soar_pq", "hard_only"),
        "true_answers_minus_pq": paired("soar_pq_true_answers", "soar_pq"),
        "vendi": {k: {"mean": statistics.mean(v), "per_seed": v} for k, v in vendi.items() if v},
        "questions": {
            "base_teacher": [runs["base_teacher"][s] for s in sorted(runs["base_teacher"])],
            "pq_well_formed": statistics.mean(p["well_formed"] for p in pq) if pq else None,
            "pq_answer_right": statistics.mean(p["answer_right"] for p in pq) if pq else None,
        },
        "promotions": {s: runs["soar"][s]["promotion_count"] for s in seeds},
        # seeds whose SOAR run promoted at least once; the others count as Hard-Only in SOAR-PQ
        "promotion_rate": {
            "promoted_seeds": sum(runs["soar"][s]["promotion_count"] > 0 for s in seeds),
            "seeds": len(seeds),
            "rate": sum(runs["soar"][s]["promotion_count"] > 0 for s in seeds) / len(seeds),
            "counted_as_hard_only": [s for s in seeds if runs["soar"][s]["promotion_count"] == 0],
        },
        "hard_only_signal": {
            "base_success_rate_strict_train": base["strict_train"]["success_rate"],
            "train_reward_mean": statistics.mean(hard_reward) if hard_reward else None,
            "train_reward_max": max(hard_reward) if hard_reward else None,
        },
        "stepping_stones_base_success_rate": base["stones_L3_L4"]["success_rate"],
    }


def plot(summary: dict, base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), gridspec_kw={"width_ratios": [1.4, 1.1, 0.8]})
    ax = axes[0]
    names = ["base", *STUDENT_ARMS]
    width = 0.8 / len(names)
    for i, arm in enumerate(names):
        if arm == "base":
            means = [
                0.0 if m == "val/accuracy" else base["strict_test"].get(m[4:], 0.0) * 100 for m in METRICS
            ]
            sds = [0.0] * len(METRICS)
        else:
            cells = [summary["students"].get(arm, {}).get(m) for m in METRICS]
            means = [c["mean"] * 100 if c else 0 for c in cells]
            sds = [c["sd"] * 100 if c else 0 for c in cells]
        ax.bar(
            [j + i * width for j in range(len(METRICS))], means, width, yerr=sds, capsize=2, label=LABELS[arm]
        )
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(METRICS))], ["greedy", "pass@1", "pass@4", "pass@16"]
    )
    ax.set_ylabel("% of strict hard test problems")
    n = summary["students"]["hard_only"]["val/accuracy"]["n"]
    ax.set_title(f"fresh students, same budget (mean ± sd, {n} seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    diff = summary["soar_pq_minus_hard_only"]
    for j, m in enumerate(METRICS):
        cell = diff.get(m)
        if not cell:
            continue
        lo, hi = cell["ci"]
        ax.errorbar([j], [cell["mean"] * 100], yerr=[[(cell["mean"] - lo) * 100], [(hi - cell["mean"]) * 100]],
                    fmt="o", capsize=4, color="tab:blue")  # fmt: skip
        ax.scatter([j + 0.15] * len(cell["per_seed"]), [d * 100 for d in cell["per_seed"]], s=8, color="gray")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(METRICS)), ["greedy", "pass@1", "pass@4", "pass@16"])
    ax.set_ylabel("percentage points")
    rate = summary["promotion_rate"]
    ax.set_title(
        f"SOAR-PQ - Hard-Only, paired by seed (95% bootstrap CI; dots: seeds)\n"
        f"SOAR promoted in {rate['promoted_seeds']}/{rate['seeds']} seeds; the others count as Hard-Only",
        fontsize=9,
    )
    ax = axes[2]
    vendi = summary["vendi"]
    keys = [k for k in ("base_teacher", "grounded_t", "intrinsic_t") if k in vendi]
    ax.bar(
        range(len(keys)),
        [vendi[k]["mean"] for k in keys],
        color=["gray", "tab:blue", "tab:orange"][: len(keys)],
    )
    for j, k in enumerate(keys):
        ax.scatter([j] * len(vendi[k]["per_seed"]), vendi[k]["per_seed"], s=10, color="k", zorder=3)
    ax.set_xticks(range(len(keys)), ["base T", "Grounded-T", "Intrinsic-T"][: len(keys)])
    ax.set_title("question diversity (Vendi, n-gram, 128 questions)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_tables(summary: dict) -> None:
    print("| arm | " + " | ".join(m[4:] for m in METRICS) + " |")
    for arm, cells in summary["students"].items():
        if cells:
            row = " | ".join(
                f"{c['mean'] * 100:.1f} ± {c['sd'] * 100:.1f}" if c else "-" for c in cells.values()
            )
            print(f"| {LABELS[arm]} | {row} |")
    for key in ("soar_pq_minus_hard_only", "true_answers_minus_pq"):
        d = summary[key]
        cells = [f"{d[m]['mean'] * 100:+.1f} [{d[m]['ci'][0] * 100:+.1f}, {d[m]['ci'][1] * 100:+.1f}]"
                 f" ({d[m]['wins']}/{d[m]['n']})" for m in METRICS if m in d]  # fmt: skip
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("Vendi:", json.dumps({k: round(v["mean"], 2) for k, v in summary["vendi"].items()}))
    print(
        "PQ well-formed / answer right:",
        summary["questions"]["pq_well_formed"],
        summary["questions"]["pq_answer_right"],
    )
    rate = summary["promotion_rate"]
    print(
        f"SOAR promoted in {rate['promoted_seeds']}/{rate['seeds']} seeds (without a promotion, no PQ: "
        f"SOAR-PQ = Hard-Only for seeds {rate['counted_as_hard_only']})"
    )
    print("promotions per seed:", summary["promotions"], "Hard-Only signal:", summary["hard_only_signal"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument(
        "--vendi-seeds", type=int, nargs="*", default=[0, 1, 2], help="claim 3 (intrinsic teachers)"
    )
    p.add_argument(
        "--ablation-seeds", type=int, nargs="*", default=[0, 1, 2], help="claim 4 (PQ, true answers)"
    )
    p.add_argument(
        "--outer-steps", type=int, default=12, help="SOAR / Intrinsic-T outer steps (main job: 20)"
    )
    p.add_argument("--student-steps", type=int, default=60)
    p.add_argument("--questions", type=int, default=128, help="questions per teacher for Vendi")
    p.add_argument(
        "--base-samples", type=int, default=64, help="samples per problem for the base student's rates"
    )
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--root", default="runs/soar_comparison")
    p.add_argument("--out", default="docs/soar_comparison.json")
    p.add_argument("--plot", default="docs/soar_comparison.png")
    p.add_argument(
        "--summarize",
        metavar="JSON",
        nargs="+",
        help="only recompute the summary, tables and plot of records (merged by seed)",
    )
    args = p.parse_args()
    if args.summarize:
        records = [json.loads(Path(f).read_text()) for f in args.summarize]
        record = {
            **records[0],
            # one record keeps its own command and time; merged ones list each
            "command": [r["command"] for r in records] if len(records) > 1 else records[0]["command"],
            "wall_s": [r["wall_s"] for r in records] if len(records) > 1 else records[0]["wall_s"],
        }
        runs = {k: {} for k in records[0]["runs"]}
        for r in records:
            for k, arms in r["runs"].items():
                runs[k].update({int(s): v for s, v in arms.items()})
        record["runs"] = runs
        ablation = sorted({s for r in records for s in r["args"]["ablation_seeds"]})
        record["summary"] = summarize(runs, record["base_student"], ablation)
        Path(args.out).write_text(json.dumps(record, indent=2))
        plot(record["summary"], record["base_student"], Path(args.plot))
        print_tables(record["summary"])
        return
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:  # longest chains first
        soar = {s: pool.submit(soar_chain, s, root / f"seed{s}", args) for s in args.seeds}
        intrinsic = {s: pool.submit(intrinsic_chain, s, root / f"seed{s}", args) for s in args.vendi_seeds}
        hard = {s: pool.submit(student, root / f"seed{s}", "hard_only", s, args, None) for s in args.seeds}
        for s in args.seeds:
            (root / f"seed{s}").mkdir(exist_ok=True)
        base_teacher = {
            s: pool.submit(questions, root / f"seed{s}", "base_teacher", "builtin:tiny-teacher", s, args)
            for s in args.vendi_seeds
        }
        base = pool.submit(base_eval, root, args)
        runs = {
            "soar": {s: f.result() for s, f in soar.items()},
            "intrinsic": {s: f.result() for s, f in intrinsic.items()},
            "hard_only": {s: f.result() for s, f in hard.items()},
            "base_teacher": {s: f.result() for s, f in base_teacher.items()},
        }
        base_rates = base.result()
    summary = summarize(runs, base_rates, args.ablation_seeds)
    record = {
        "command": " ".join(sys.argv),
        "wall_s": time.time() - t0,
        "args": vars(args),
        "hard_set": {"train": TRAIN, "test": TEST},
        "base_student": base_rates,
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    plot(summary, base_rates, Path(args.plot))
    print_tables(summary)
    print(f"wrote {args.out} and {args.plot} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
