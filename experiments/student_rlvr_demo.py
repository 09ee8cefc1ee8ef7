"""The README's RLVR demonstration on the tiny world (numbers and plot in the README).

    python experiments/student_rlvr_demo.py --seeds 0 1 2

1. greedy accuracy of the base student on the 200 held-out medium problems (``validate``);
2. ``configs/tiny/student_rlvr.yaml`` for each seed, timed; the learning curves;
3. ``configs/tiny/student_rlvr_hard.yaml``: RLVR on the fail@k hard set gets no signal.

Writes ``docs/student_rlvr_demo.json`` and ``docs/student_rlvr_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lit_selfimprove.callbacks.metrics_plot import read_metrics_csv

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> tuple[Path, float]:
    """Run the CLI, return (log dir, wall seconds)."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "lit_selfimprove", *args], cwd=REPO, check=True, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    version_dirs = [
        line.split("run outputs in ")[1].split(":")[0]
        for line in (out.stdout + out.stderr).splitlines()
        if "run outputs in " in line
    ]
    if version_dirs:
        return Path(version_dirs[-1]), seconds
    save_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.logger.init_args.save_dir="))
    return max(Path(save_dir).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime).parent, seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out-dir", default="runs/demo")
    args = p.parse_args()
    cfg = "configs/tiny/student_rlvr.yaml"
    common = [f"--trainer.logger.init_args.save_dir={args.out_dir}"]

    base_dir, _ = run("validate", "--config", cfg, *common, "--trainer.logger.init_args.name=base")
    base = read_metrics_csv(base_dir / "metrics.csv")
    base_acc = base["val/accuracy"][-1][1]
    base_pass = {k: v[-1][1] for k, v in base.items() if k.startswith("val/pass@")}
    print(f"base student: greedy accuracy {base_acc:.3f} {base_pass}", flush=True)

    runs = {}
    for seed in args.seeds:
        log_dir, seconds = run(
            "fit",
            "--config",
            cfg,
            *common,
            f"--seed_everything={seed}",
            f"--trainer.logger.init_args.name=seed{seed}",
        )
        series = read_metrics_csv(log_dir / "metrics.csv")
        runs[seed] = {
            "seconds": seconds,
            "curve": series["val/accuracy"],
            "final_pass": {k: v[-1][1] for k, v in series.items() if k.startswith("val/pass@")},
        }
        print(
            f"seed {seed}: {seconds:.0f} s, greedy accuracy {series['val/accuracy'][-1][1]:.3f}", flush=True
        )

    hard_dir, hard_seconds = run(
        "fit",
        "--config",
        "configs/tiny/student_rlvr_hard.yaml",
        *common,
        "--trainer.logger.init_args.name=hard",
    )
    hard = read_metrics_csv(hard_dir / "metrics.csv")
    hard_summary = {
        "seconds": hard_seconds,
        "max_train_reward": max(v for _, v in hard["train/reward"]),
        "min_zero_std_frac": min(v for _, v in hard["train/zero_std_frac"]),
        "val_accuracy": [v for _, v in hard["val/accuracy"]],
        "val_pass": {k: v[-1][1] for k, v in hard.items() if k.startswith("val/pass@")},
    }
    print(f"hard set: {hard_summary}", flush=True)

    finals = [r["curve"][-1][1] for r in runs.values()]
    summary = {
        "base_accuracy": base_acc,
        "base_pass": base_pass,
        "final_accuracy": {s: r["curve"][-1][1] for s, r in runs.items()},
        "final_pass": {s: r["final_pass"] for s, r in runs.items()},
        "mean_final_accuracy": statistics.mean(finals),
        "gain_points_per_seed": {s: 100 * (r["curve"][-1][1] - base_acc) for s, r in runs.items()},
        "seconds": {s: r["seconds"] for s, r in runs.items()},
        "curves": {s: r["curve"] for s, r in runs.items()},
        "hard_set": hard_summary,
    }
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "student_rlvr_demo.json").write_text(json.dumps(summary, indent=1))
    plot(summary, docs / "student_rlvr_curve.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=1))


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for seed, curve in summary["curves"].items():
        steps, acc = zip(*([(0, summary["base_accuracy"])] + [tuple(x) for x in curve]))
        ax1.plot(steps, [100 * a for a in acc], marker="o", ms=3, label=f"seed {seed}")
    ax1.axhline(100 * summary["base_accuracy"], color="gray", ls="--", lw=1, label="base student")
    ax1.set(
        xlabel="RLOO step (8 questions x 8 samples)",
        ylabel="greedy accuracy (%)",
        title="medium level (3-digit), 200 held-out problems",
    )
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    hard = summary["hard_set"]
    values = [hard["max_train_reward"], hard["min_zero_std_frac"], hard["val_accuracy"][-1]]
    labels = [
        "train reward\n(max over steps)",
        "zero-variance\ngroups (min)",
        "held-out greedy\naccuracy (last)",
    ]
    bars = ax2.bar(labels, values, color=["tab:red", "tab:gray", "tab:red"])
    for bar, value in zip(bars, values):
        ax2.text(bar.get_x() + bar.get_width() / 2, value + 0.02, f"{value:.2f}", ha="center", fontsize=9)
    ax2.set(ylim=(0, 1.05), title="RLVR on the fail@k hard set: no signal")
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
