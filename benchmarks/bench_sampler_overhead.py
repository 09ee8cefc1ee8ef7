"""The tiny SOAR outer step and the StudentRLVR step: this checkout against an older commit.

Measures what the built-in sampler's overhead work saved, side by side in one run::

    python benchmarks/bench_sampler_overhead.py                 # against --base 40f5829
    python benchmarks/bench_sampler_overhead.py --base HEAD~3 --soar-steps 4 --rlvr-steps 12

The older commit is checked out into a temporary ``git worktree``; each job runs the same config
(``configs/tiny/soar.yaml``, ``configs/tiny/student_rlvr.yaml``, from this checkout) in two worker
processes, one importing the old package and one this checkout's, through the package's own CLI
(``SelfImproveCLI(run=False)``) with a timing callback. The steps interleave one at a time (old,
new, new, old, ...; the idle worker is blocked), so both see the same machine load. A step's time
is ``perf_counter`` between Lightning's ``on_train_batch_start`` and ``on_train_batch_end``: one
SOAR outer step (teacher sampling, g*r inner RLVR trainings, Q_R accuracies, the teacher update)
or one StudentRLVR step (sampling, reward, KL reference, backward, AdamW).

Every metric the step logs is compared between the two workers: the change must not alter results
at a fixed seed (``identical: true``). Writes ``benchmarks/results/sampler_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_student_rlvr_vs_trl import (  # noqa: E402
    Baton,
    Worker,
    cpu_info,
    interleave,
    loadavg,
    report_to_parent,
    summarize,
    versions,
)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "sampler_overhead.json"
JOBS = {
    "soar": (REPO / "configs" / "tiny" / "soar.yaml", ["--trainer.val_check_interval=1000"]),
    "student_rlvr": (REPO / "configs" / "tiny" / "student_rlvr.yaml", ["--trainer.limit_val_batches=0"]),
}


def _fit_with_baton(name: str, conn, cfg: dict) -> None:
    """Run one job's fit from the source tree ``cfg['src']``, handing a baton around every step."""
    sys.path.insert(0, cfg["src"])
    import torch
    from lightning import Callback

    import lit_selfimprove
    from lit_selfimprove.cli import SelfImproveCLI

    if not lit_selfimprove.__file__.startswith(cfg["src"]):
        raise RuntimeError(f"{name}: imported {lit_selfimprove.__file__}, not the tree {cfg['src']}")
    torch.set_num_threads(cfg["threads"])
    baton = Baton(conn)

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            baton.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            baton.end(metrics=metrics)

    cli = SelfImproveCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        run=False,
        args=[
            f"--config={cfg['config']}",
            f"--trainer.max_steps={cfg['steps']}",
            f"--trainer.default_root_dir={cfg['workdir']}",
            "--trainer.enable_progress_bar=false",
            *cfg["overrides"],
        ],
    )
    cli.trainer.callbacks.insert(0, Timer())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def overhead_worker(name: str, conn, cfg: dict) -> None:
    report_to_parent(conn, _fit_with_baton, name, conn, cfg)


def run_job(job: str, steps: int, trees: dict[str, str], tmp: Path, threads: int, timeout: float) -> dict:
    config, overrides = JOBS[job]
    ctx = mp.get_context("spawn")
    workers = {}
    try:
        for name, src in trees.items():
            workdir = tmp / f"{job}-{name}"
            workdir.mkdir()
            cfg = {"src": src, "config": str(config), "steps": steps, "workdir": str(workdir),
                   "threads": threads, "overrides": overrides}  # fmt: skip
            workers[name] = Worker(name, ctx, cfg, timeout, target=overhead_worker)
        interleave(workers, steps, lambda i: job)
    finally:
        for w in workers.values():
            w.close()
    old, new = workers["old"], workers["new"]
    mismatches = []
    for i, (a, b) in enumerate(zip(old.extras, new.extras)):
        for key in sorted(set(a["metrics"]) | set(b["metrics"])):
            va, vb = a["metrics"].get(key), b["metrics"].get(key)
            if va != vb and not (va != va and vb != vb):  # NaN == NaN here
                mismatches.append({"step": i + 1, "metric": key, "old": va, "new": vb})
    out = {name: {"step_times_s": w.times, **summarize(w.times)} for name, w in workers.items()}
    out["ratio_new_over_old"] = out["new"]["median"] / out["old"]["median"]
    out["total_ratio_new_over_old"] = sum(new.times) / sum(old.times)
    out["metrics_compared"] = sum(len(e["metrics"]) for e in new.extras)
    out["identical"] = not mismatches
    out["mismatches"] = mismatches[:20]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="40f5829", help="the older commit (default: before the lean decoder)")
    p.add_argument("--soar-steps", type=int, default=3, help="SOAR outer steps per worker")
    p.add_argument("--rlvr-steps", type=int, default=10, help="StudentRLVR steps per worker")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for any one message")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    base = subprocess.run(
        ["git", "rev-parse", args.base], cwd=REPO, capture_output=True, text=True, check=True
    )
    base_sha = base.stdout.strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "lit_selfimprove"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.strip()  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = {"jobs": {}}
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp_str:
        tmp = Path(tmp_str)
        old_tree = tmp / "old"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(old_tree), base_sha], cwd=REPO, check=True
        )
        try:
            trees = {"old": str(old_tree), "new": str(REPO)}
            for job, steps in (("soar", args.soar_steps), ("student_rlvr", args.rlvr_steps)):
                if steps > 0:
                    result["jobs"][job] = run_job(job, steps, trees, tmp, args.threads, args.timeout)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=REPO, check=False)
    result.update(
        {
            "goal": "each step <= 1/3 of the old one (ratio <= 0.333) with identical results",
            "settings": {
                **{k: v for k, v in vars(args).items() if k != "out"},
                "base_sha": base_sha,
                "new_sha": head.stdout.strip(),
                "new_tree_modified": bool(dirty),
            },  # fmt: skip
            "versions": versions(),
            "cpu": {**cpu_info(), "loadavg_before": load_before, "loadavg_after": loadavg()},
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nold = {base_sha[:8]}, new = this checkout; {args.threads} thread(s) per worker\n")
    print("| step | old median (s) | new median (s) | new / old | identical metrics |")
    print("|---|---|---|---|---|")
    for job, r in result["jobs"].items():
        print(f"| {job} | {r['old']['median']:.2f} | {r['new']['median']:.2f} | {r['ratio_new_over_old']:.2f} "
              f"| {r['identical']} ({r['metrics_compared']} values) |")  # fmt: skip
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
