"""Does the SOAR -> SIP loop pay? Four arms on the tiny world, paired by seed.

    python experiments/soar_sip_comparison.py                    # 5 seeds (measured time: experiments/README.md)
    python experiments/soar_sip_comparison.py --seeds 0 --outer-steps 2 --steps 4   # smoke

Per seed, one SOAR run (``configs/tiny/soar.yaml``, ``--outer-steps`` outer steps, teacher samples at every
step) feeds four fresh copies of the bundled tiny student, each trained for ``--steps`` optimizer steps:

* ``sip_soar``: the loop (``python -m lit_selfimprove soar-sip``): SIP on SOAR's curriculum rendered with the
  promoted student's solutions (those agreeing with the teacher's answer), K=8 rollouts + the document's
  solution + the promoted student's rewrite, MathVerifierJudge, online DPO (``configs/tiny/soar_sip.yaml``);
* ``next_token_soar``: next-token training on the same documents, no judge
  (``configs/tiny/soar_sip_next_token.yaml``);
* ``sip_plain``: the SIP of ``sip_soar`` on a plain corpus of the world instead: problems of the student's
  pre-training mixture with its sloppy scratchpads (``worlds.arithmetic.plain_documents``), same judge and
  rewriter;
* ``soar_pq_rlvr``: the existing best arm, RLVR on SOAR's PQ + the hard set D_train
  (``configs/tiny/soar_pq.yaml``); a seed whose SOAR run never promoted has no PQ and counts as Hard-Only.

Each is measured by the same code, ``StudentRLVR``'s validation on the strict hard test set (76 problems,
greedy and pass@1/4/16 from 16 samples). Per seed the SIP arms also give the chosen candidate's source
(rollout / suffix / rewrite) over training. Writes ``--out`` (JSON: every number, the per-seed values, the
commands and the time) and ``--plot``; prints the tables.
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

ARMS = ("sip_soar", "next_token_soar", "sip_plain", "soar_pq_rlvr")
LABELS = {
    "sip_soar": "SIP on SOAR's curriculum (the loop)",
    "next_token_soar": "next-token on SOAR's curriculum",
    "sip_plain": "SIP on the plain corpus",
    "soar_pq_rlvr": "SOAR-PQ + Hard-Only RLVR",
}
CONTRASTS = (("sip_soar", "soar_pq_rlvr"), ("sip_soar", "next_token_soar"), ("sip_soar", "sip_plain"))
METRICS = ("val/accuracy", "val/pass@1", "val/pass@4", "val/pass@16")
SHARES = ("select/chosen_rollout_avg", "select/chosen_suffix_avg", "select/chosen_rewrite_avg")
TRAIN, TEST = "builtin:tiny-strict-train", "builtin:tiny-strict-test"
WELL_FORMED = re.compile(r"^\d{1,6}\+\d{1,6}$")


def run(cmd: list[str], log: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    print(f"  {time.time() - t0:5.0f} s  {log.parent.name}/{log.stem}", flush=True)
    return time.time() - t0


def lightning(sub: str, config: str, root: Path, name: str, seed: int, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "lit_selfimprove", sub, "--config", config, f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={root}", f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=0", "--trainer.enable_progress_bar=false", *overrides,
    ]  # fmt: skip


def evaluate(root: Path, name: str, model: Path, seed: int) -> dict:
    """StudentRLVR's validation of ``model`` on the strict hard test set (greedy, pass@1/4/16)."""
    cmd = lightning("validate", "configs/tiny/soar_pq.yaml", root, f"eval_{name}", seed,
                    f"--model.init_args.model={model}", "--data.init_args.extra_train_sources=null",
                    f"--data.init_args.train_source={TRAIN}", f"--data.init_args.test_source={TEST}")  # fmt: skip
    seconds = run(cmd, root / f"eval_{name}.log")
    vals = {
        k: v[-1][1] for k, v in read_metrics_csv(root / f"eval_{name}" / "version_0" / "metrics.csv").items()
    }
    return {**{m: vals[m] for m in METRICS}, "eval_seconds": seconds}


def shares(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    series = read_metrics_csv(metrics_csv)
    return {k: series.get(k, []) for k in SHARES}


def true_right(docs: list[dict]) -> float | None:
    """The share of documents whose final boxed answer is the true sum (the world knows it)."""
    from lit_selfimprove.rewards import extract_boxed

    right = [
        extract_boxed(d["text"]) == str(sum(int(x) for x in d["meta"]["question"].split("+")))
        for d in docs
        if WELL_FORMED.match(d["meta"]["question"])
    ]
    return sum(right) / len(right) if right else None


def chain(seed: int, root: Path, args) -> dict:
    """One seed: the loop (SOAR, corpus, SIP, eval), then the three other arms on the same SOAR run."""
    root.mkdir(parents=True, exist_ok=True)
    loop = root / "loop"
    cmd = [
        sys.executable, "-m", "lit_selfimprove", "soar-sip", "--run-dir", str(loop), "--seed", str(seed),
        "--soar=--model.init_args.log_samples_every=1", f"--soar=--trainer.max_steps={args.outer_steps}",
        "--soar=--trainer.enable_progress_bar=false", f"--sip=--trainer.max_steps={args.steps}",
        "--sip=--trainer.enable_progress_bar=false", "--no-eval",
    ]  # fmt: skip
    if (loop / "loop.json").is_file():
        cmd.append("--ckpt_path=last")
    out: dict = {"loop_seconds": run(cmd, root / "loop.log")}
    state = json.loads((loop / "loop.json").read_text())
    soar_run = loop / "soar" / "version_0"
    pq = soar_run / "promotion_questions.jsonl"
    promotions = len({json.loads(line)["promotion"] for line in open(pq)}) if pq.is_file() else 0
    docs = [json.loads(line) for line in open(loop / "corpus.jsonl")]
    out["soar"] = {"promotions": promotions, "stages_seconds": state["seconds"]}
    out["corpus"] = {**state["corpus"], "true_right": true_right(docs)}
    arms = {"sip_soar": evaluate(root, "sip_soar", loop / "sip" / "version_0" / "hf", seed)}
    arms["sip_soar"]["shares"] = shares(loop / "sip" / "version_0" / "metrics.csv")
    # next-token on the same documents
    nt_hf = root / "next_token" / "hf"
    run(lightning("fit", "configs/tiny/soar_sip_next_token.yaml", root, "next_token", seed,
                  f"--data.init_args.sources=[{loop / 'corpus.jsonl'}]", f"--model.init_args.save_to={nt_hf}",
                  f"--trainer.max_steps={args.steps}"), root / "next_token.log")  # fmt: skip
    arms["next_token_soar"] = evaluate(root, "next_token_soar", nt_hf, seed)
    # SIP on the plain corpus, the same rewriter
    from lit_selfimprove.datamodules.soar_corpus import write_corpus
    from lit_selfimprove.worlds.arithmetic import plain_documents

    plain = plain_documents(args.plain_docs, seed=1000 + seed)
    write_corpus(plain, root / "plain_corpus.jsonl")
    out["plain_corpus"] = {"documents": len(plain), "true_right": true_right(plain)}
    run(lightning("fit", "configs/tiny/soar_sip.yaml", root, "sip_plain", seed,
                  f"--data.init_args.sources=[{root / 'plain_corpus.jsonl'}]",
                  f"--model.init_args.rewriter.init_args.model={state['corpus']['student']}",
                  f"--trainer.max_steps={args.steps}"), root / "sip_plain.log")  # fmt: skip
    arms["sip_plain"] = evaluate(root, "sip_plain", root / "sip_plain" / "version_0" / "hf", seed)
    arms["sip_plain"]["shares"] = shares(root / "sip_plain" / "version_0" / "metrics.csv")
    # SOAR-PQ + Hard-Only RLVR (no PQ: Hard-Only)
    extra = f"[{pq}]" if promotions else "null"
    run(lightning("fit", "configs/tiny/soar_pq.yaml", root, "soar_pq_rlvr", seed,
                  f"--data.init_args.extra_train_sources={extra}", f"--data.init_args.train_source={TRAIN}",
                  f"--data.init_args.test_source={TEST}", f"--trainer.max_steps={args.steps}",
                  f"--trainer.val_check_interval={args.steps}", "--trainer.enable_checkpointing=false"),
        root / "soar_pq_rlvr.log")  # fmt: skip
    vals = {
        k: v[-1][1] for k, v in read_metrics_csv(root / "soar_pq_rlvr" / "version_0" / "metrics.csv").items()
    }
    arms["soar_pq_rlvr"] = {**{m: vals[m] for m in METRICS}, "no_pq": not promotions}
    out["arms"] = arms
    return out


def summarize(runs: dict) -> dict:
    seeds = sorted(runs)
    table = {}
    for arm in ARMS:
        table[arm] = {}
        for m in METRICS:
            values = [runs[s]["arms"][arm][m] for s in seeds]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            table[arm][m] = {"mean": statistics.mean(values), "sd": sd, "per_seed": values}
    contrasts = {}
    for a, b in CONTRASTS:
        contrasts[f"{a}-{b}"] = {
            m: paired_difference(
                [runs[s]["arms"][a][m] for s in seeds], [runs[s]["arms"][b][m] for s in seeds]
            )
            for m in METRICS
        }
    promoted = [s for s in seeds if runs[s]["soar"]["promotions"] > 0]
    corpus = [runs[s]["corpus"] for s in seeds]
    return {
        "seeds": seeds,
        "arms": table,
        "contrasts": contrasts,
        "promotion_rate": {
            "promoted_seeds": len(promoted),
            "seeds": len(seeds),
            "rate": len(promoted) / len(seeds),
        },
        "corpus": {
            "documents": statistics.mean(c["documents"] for c in corpus),
            "student_agrees": statistics.mean(
                c["student_agrees"] for c in corpus if c["student_agrees"] is not None
            ),
            "true_right": statistics.mean(c["true_right"] for c in corpus if c["true_right"] is not None),
        },
        "plain_corpus_true_right": statistics.mean(runs[s]["plain_corpus"]["true_right"] for s in seeds),
        "final_shares": {
            arm: {k: statistics.mean(runs[s]["arms"][arm]["shares"][k][-1][1] for s in seeds) for k in SHARES}
            for arm in ("sip_soar", "sip_plain")
        },
    }


def plot(summary: dict, runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [1.3, 1.1, 1.0]})
    ax = axes[0]
    width = 0.8 / len(ARMS)
    for i, arm in enumerate(ARMS):
        cells = [summary["arms"][arm][m] for m in METRICS]
        ax.bar([j + i * width for j in range(len(METRICS))], [c["mean"] * 100 for c in cells], width,
               yerr=[c["sd"] * 100 for c in cells], capsize=2, label=LABELS[arm])  # fmt: skip
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(METRICS))], ["greedy", "pass@1", "pass@4", "pass@16"]
    )
    ax.set_ylabel("% of strict hard test problems")
    ax.set_title(f"fresh tiny students, same steps (mean ± sd, {len(summary['seeds'])} seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, (name, cells) in enumerate(summary["contrasts"].items()):
        for j, m in enumerate(METRICS):
            c = cells[m]
            x = j + (i - 1) * 0.25
            ax.errorbar([x], [c["mean"] * 100], yerr=[[(c["mean"] - c["ci"][0]) * 100], [(c["ci"][1] - c["mean"]) * 100]],
                        fmt="o", capsize=3, color=f"C{i}", label=name if j == 0 else None)  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(METRICS)), ["greedy", "pass@1", "pass@4", "pass@16"])
    ax.set_ylabel("percentage points")
    ax.set_title("the loop minus each other arm, paired by seed (95% bootstrap CI)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    styles = {"sip_soar": "-", "sip_plain": "--"}
    for arm, style in styles.items():
        for k, key in enumerate(SHARES):
            steps = sorted({st for s in runs for st, _ in runs[s]["arms"][arm]["shares"][key]})
            means = [
                statistics.mean(dict(runs[s]["arms"][arm]["shares"][key]).get(st, float("nan")) for s in runs)
                for st in steps
            ]
            ax.plot(steps, means, style, color=f"C{k}", label=f"{key.split('_')[1]} ({arm})")
    ax.set_xlabel("SIP step")
    ax.set_ylabel("share of chosen candidates (last 10 steps)")
    ax.set_title("SIP's chosen candidate (solid: SOAR curriculum, dashed: plain)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_tables(summary: dict) -> None:
    print("| arm | " + " | ".join(m[4:] for m in METRICS) + " |")
    for arm in ARMS:
        cells = summary["arms"][arm]
        print(
            f"| {LABELS[arm]} | "
            + " | ".join(f"{cells[m]['mean'] * 100:.1f} ± {cells[m]['sd'] * 100:.1f}" for m in METRICS)
            + " |"
        )
    for name, cells in summary["contrasts"].items():
        row = [f"{c['mean'] * 100:+.1f} [{c['ci'][0] * 100:+.1f}, {c['ci'][1] * 100:+.1f}] ({c['wins']}/{c['n']})"
               for c in (cells[m] for m in METRICS)]  # fmt: skip
        print(f"| {name} | " + " | ".join(row) + " |")
    rate = summary["promotion_rate"]
    print(f"SOAR promoted in {rate['promoted_seeds']}/{rate['seeds']} seeds; corpus: {json.dumps(summary['corpus'])}; "
          f"plain corpus right: {summary['plain_corpus_true_right']:.2f}; final chosen shares: {json.dumps(summary['final_shares'])}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--outer-steps", type=int, default=12, help="SOAR outer steps (the SOAR comparison's)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of every student arm")
    p.add_argument("--plain-docs", type=int, default=600, help="documents of the plain corpus")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--root", default="runs/soar_sip_comparison")
    p.add_argument("--out", default="docs/soar_sip_comparison.json")
    p.add_argument("--plot", default="docs/soar_sip_comparison.png")
    p.add_argument("--summarize", metavar="JSON", help="only redo the summary, tables and plot of a record")
    args = p.parse_args()
    if args.summarize:
        record = json.loads(Path(args.summarize).read_text())
        runs = {int(s): v for s, v in record["runs"].items()}
        record["summary"] = summarize(runs)
        Path(args.out).write_text(json.dumps(record, indent=2))
        plot(record["summary"], runs, Path(args.plot))
        print_tables(record["summary"])
        return
    root = Path(args.root)
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {s: pool.submit(chain, s, root / f"seed{s}", args) for s in args.seeds}
        runs = {s: f.result() for s, f in futures.items()}
    summary = summarize(runs)
    record = {
        "command": " ".join(sys.argv),
        "wall_s": time.time() - t0,
        "args": vars(args),
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    plot(summary, runs, Path(args.plot))
    print_tables(summary)
    print(f"wrote {args.out} and {args.plot} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
