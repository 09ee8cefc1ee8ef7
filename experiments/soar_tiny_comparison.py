"""Does SOAR work on the tiny world? Hard-Only vs SOAR-PQ vs Intrinsic-T (and Grounded-T), several seeds.

    python experiments/soar_tiny_comparison.py --seeds 0 1 2 --jobs 2

Per seed, with the bundled tiny teacher, student and fail@128 hard set:
1. SOAR (``configs/tiny/soar.yaml``, grounded reward): promotions -> PQ file, final teacher;
2. Intrinsic-T (``configs/tiny/soar_intrinsic.yaml``): the teacher trained on learnability;
3. ``sample-questions`` from both final teachers -> Grounded-T / Intrinsic-T question sets, with
   their Vendi scores (the paper: intrinsic rewards collapse diversity);
4. a fresh base student trained by RLVR with the same budget (``configs/tiny/soar_pq.yaml``) on
   D_train alone (Hard-Only), PQ + D_train (SOAR-PQ), Intrinsic-T + D_train, Grounded-T + D_train;
   pass@k on the hard test split (D_test, never seen by teacher or students).

Writes ``--out`` (json, every number and the commands), ``--plot`` (png), and prints the table.
``--jobs 2`` runs two single-threaded trainings side by side (a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_selfimprove.callbacks.metrics_plot import read_metrics_csv  # noqa: E402

ARMS = ("hard_only", "soar_pq", "intrinsic_t", "grounded_t")
LABELS = {
    "hard_only": "Hard-Only",
    "soar_pq": "SOAR-PQ",
    "intrinsic_t": "Intrinsic-T",
    "grounded_t": "Grounded-T",
}


def run(cmd: list[str], log: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t0


def fit(config: str, root: Path, name: str, seed: int, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "lit_selfimprove", "fit", "--config", config, f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={root}", f"--trainer.logger.init_args.name={name}",
        "--trainer.enable_progress_bar=false", *overrides,
    ]  # fmt: skip


def last_values(metrics_csv: Path) -> dict[str, float]:
    return {k: v[-1][1] for k, v in read_metrics_csv(metrics_csv).items()}


def pq_answer_correct(path: Path) -> tuple[int, float | None]:
    """Size of the PQ file and the share of its answers that are the true sums (the tiny world knows)."""
    if not path.exists():
        return 0, None
    rows = [json.loads(line) for line in open(path)]
    ok = 0
    for r in rows:
        parts = r["question"].split("+")
        ok += (
            len(parts) == 2
            and all(p.isdigit() for p in parts)
            and str(int(parts[0]) + int(parts[1])) == r["answer"]
        )
    return len(rows), (ok / len(rows) if rows else None)


def one_seed(seed: int, root: Path, args, pool: ThreadPoolExecutor) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.jobs > 1 else 2
    teachers = {
        "soar": fit("configs/tiny/soar.yaml", root, "soar", seed, f"--trainer.max_steps={args.outer_steps}"),
        "soar_intrinsic": fit(
            "configs/tiny/soar_intrinsic.yaml",
            root,
            "soar_intrinsic",
            seed,
            f"--trainer.max_steps={args.outer_steps}",
        ),
    }
    times = {}
    futures = {k: pool.submit(run, cmd, root / f"{k}.log", threads) for k, cmd in teachers.items()}
    for k, f in futures.items():
        times[k] = f.result()
    soar_dir, intr_dir = root / "soar" / "version_0", root / "soar_intrinsic" / "version_0"
    out = {"seed": seed, "times_s": times}
    out["soar"] = last_values(soar_dir / "metrics.csv")
    out["intrinsic"] = last_values(intr_dir / "metrics.csv")
    pq = soar_dir / "promotion_questions.jsonl"
    out["pq_size"], out["pq_answers_correct"] = pq_answer_correct(pq)
    # Grounded-T / Intrinsic-T question sets from the final teachers
    sets = {}
    for arm, folder in (("grounded_t", soar_dir), ("intrinsic_t", intr_dir)):
        qfile = root / f"{arm}.jsonl"
        cmd = [
            sys.executable, "-m", "lit_selfimprove", "sample-questions", "--teacher", str(folder / "teacher"),
            "--prompt", "Write a new problem.\n", "--num", str(args.questions), "--batch", "64",
            "--max-new-tokens", "160", "--answer-check", "light", "--seed", str(seed), "--out", str(qfile),
        ]  # fmt: skip
        run(cmd, root / f"{arm}_sample.log", 2)
        sets[arm] = qfile
        out[f"{arm}_questions"] = json.loads(qfile.with_name(qfile.stem + ".summary.json").read_text())
        out[f"{arm}_questions"]["answers_correct"] = pq_answer_correct(qfile)[1]
    # fresh students, same budget
    extra = {"hard_only": None, "soar_pq": pq if out["pq_size"] else None, **sets}
    students = {}
    for arm in ARMS:
        if arm == "soar_pq" and extra[arm] is None:
            continue  # no promotion happened: SOAR-PQ is undefined for this seed
        source = f"[{extra[arm]}]" if extra[arm] else "null"
        students[arm] = fit(
            "configs/tiny/soar_pq.yaml", root, f"student_{arm}", seed,
            f"--trainer.max_steps={args.student_steps}", f"--data.init_args.extra_train_sources={source}",
        )  # fmt: skip
    futures = {k: pool.submit(run, cmd, root / f"student_{k}.log", threads) for k, cmd in students.items()}
    out["students"] = {}
    for k, f in futures.items():
        times[f"student_{k}"] = f.result()
        vals = last_values(root / f"student_{k}" / "version_0" / "metrics.csv")
        out["students"][k] = {m: v for m, v in vals.items() if m.startswith("val/")}
    return out


def summarize(results: list[dict]) -> dict:
    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {
            "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
        }

    table = {}
    for arm in ARMS:
        metrics = sorted({m for r in results for m in r["students"].get(arm, {})})
        table[arm] = {m: stat([r["students"].get(arm, {}).get(m) for r in results]) for m in metrics}
    diversity = {
        arm: stat([r[f"{arm}_questions"]["vendi_ngram"] for r in results])
        for arm in ("grounded_t", "intrinsic_t")
    }
    return {
        "students": table,
        "vendi": diversity,
        "promotions": stat([r["soar"].get("promotion/count", 0.0) for r in results]),
        "pq_answers_correct": stat([r["pq_answers_correct"] for r in results]),
    }


def plot(results: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({int(m.split("@")[1]) for arm in summary["students"].values() for m in arm if "pass@" in m})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(ARMS)
    for i, arm in enumerate(ARMS):
        cells = [summary["students"][arm].get(f"val/pass@{k}") for k in ks]
        means = [c["mean"] * 100 if c else 0 for c in cells]
        sds = [c["sd"] * 100 if c else 0 for c in cells]
        ax1.bar([j + i * width for j in range(len(ks))], means, width, yerr=sds, capsize=2, label=LABELS[arm])
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(ks))], [f"pass@{k}" for k in ks])
    ax1.set_ylabel("% of hard test problems")
    ax1.set_title(f"fresh students, same budget ({len(results)} seeds)", fontsize=9)
    ax1.legend(fontsize=7)
    names = ["Grounded-T", "Intrinsic-T"]
    cells = [summary["vendi"]["grounded_t"], summary["vendi"]["intrinsic_t"]]
    ax2.bar(
        names,
        [c["mean"] for c in cells],
        yerr=[c["sd"] for c in cells],
        capsize=3,
        color=["tab:blue", "tab:orange"],
    )
    ax2.set_title("diversity of the teachers' questions (Vendi, n-gram)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--outer-steps", type=int, default=None, help="SOAR / Intrinsic-T outer steps (default: the configs')"
    )
    p.add_argument("--student-steps", type=int, default=60)
    p.add_argument("--questions", type=int, default=128, help="Grounded-T / Intrinsic-T set size")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--root", default="runs/soar_comparison")
    p.add_argument("--out", default="docs/soar_comparison.json")
    p.add_argument("--plot", default="docs/soar_comparison.png")
    args = p.parse_args()
    if args.outer_steps is None:
        import yaml

        args.outer_steps = yaml.safe_load(open(REPO / "configs/tiny/soar.yaml"))["trainer"]["max_steps"]
    t0 = time.time()
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for seed in args.seeds:
            results.append(one_seed(seed, Path(args.root) / f"seed{seed}", args, pool))
            print(json.dumps(results[-1]["students"]), flush=True)
    summary = summarize(results)
    record = {
        "command": " ".join(sys.argv),
        "wall_s": time.time() - t0,
        "args": vars(args),
        "summary": summary,
        "runs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    plot(results, summary, Path(args.plot))
    print("| arm | " + " | ".join(sorted(next(iter(summary["students"].values())))) + " |")
    for arm, cells in summary["students"].items():
        row = " | ".join(f"{c['mean'] * 100:.1f} ± {c['sd'] * 100:.1f}" if c else "-" for c in cells.values())
        print(f"| {LABELS[arm]} | {row} |")
    print("Vendi:", json.dumps(summary["vendi"]), "promotions:", summary["promotions"])
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
