"""SIP's Figure 8 on the tiny facts world: from suffix / rewrite chosen to the policy's own rollouts.

    python experiments/sip_crossover.py --quick     # the README's run, <= 20 min on 2 shared CPU cores
    python experiments/sip_crossover.py --quick --reuse      # re-evaluate / re-plot existing runs

Setting. The bundled ``builtin:tiny-sip-policy`` already writes as well as the corpus, so the judge
prefers its rollouts from the first step and Figure 8 cannot show. Here the policy starts WORSE
than the corpus and the rewriter: ``builtin:tiny-sip-policy`` fine-tuned (``NextTokenLM``, seeded,
``--noise-steps`` steps, about a minute on one core) on a noisier copy of the corpus
(``write_corpus`` with ``--noise-p-wrong`` wrong facts and ``--noise-p-unsafe`` unsafe sentences
instead of 30% / 15%). It keeps the world's sentence templates but states more wrong facts and
writes more unsafe sentences than the training corpus, whose suffixes DPO sees. (An under-trained
policy, the other option, was tried: 150 next-token steps from scratch give text that is not yet
well-formed and DPO did not lift it within 100 steps; 400 steps already write like the corpus.)
Then online DPO (``configs/tiny/sip_dpo.yaml``) with
K = 2 / 4 / 8 rollouts + the original suffix + the knowledge-base rewrite of the suffix
(``include_rewrite: true``, ``KBRewriter``): per prefix the judge's best candidate is chosen and the
worst rejected; ties are broken uniformly at random among the tied candidates
(``select_pairs``). Every training step logs, per trained prefix, the chosen source and who held
the best score before the tie-break (``selection.csv`` of ``SelectionStats``: ``best_rollout_only``
/ ``best_tied`` / ``best_corpus_only``).

A next-token arm (suffix NLL, ``configs/tiny/sip_next_token.yaml``) trains from the same start
policy for the same steps; it is the baseline of the quality numbers, sampled at T = 1 / 0.7 /
0.5 / 0.3 so that each DPO arm is compared with the baseline at its own sampling entropy
(``sharpening_control`` of ``experiments/sip_tiny_comparison.py``).

Trainings run one at a time (``OMP_NUM_THREADS=1 nice -n 5``), each in its own process. Writes
``docs/sip_crossover.json`` (raw per-step counts, summaries, commands, wall times) and
``docs/sip_selection.png`` (chosen shares over training, one panel per K, mean over seeds with
min-max band).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import sip_tiny_comparison as comparison  # noqa: E402  (Evaluator, sharpening_control, train mode)

SOURCES = ("rollout", "suffix", "rewrite")
BEST = ("best_rollout_only", "best_tied", "best_corpus_only")
TEMPERATURES = (0.7, 0.5, 0.3)  # the next-token baseline, sharpened, for the matched-entropy control


# ----------------------------------------------------------------------------- training
def run_training(name: str, cli_args: list[str], root: Path, reuse: bool) -> dict:
    """One ``python -m lit_selfimprove`` training in its own process; the final policy -> root/policies/name."""
    export = root / "policies" / name
    shown = "OMP_NUM_THREADS=1 nice -n 5 python -m lit_selfimprove " + " ".join(cli_args)
    if reuse and (export / "run.json").exists():
        print(f"[reuse] {name}: {export}", flush=True)
        return {"command": shown, "export": str(export), **json.loads((export / "run.json").read_text())}
    info = comparison.train_logged(export, cli_args, root / "logs" / f"{name}.log", name)
    print(f"  {name}: {info['wall_seconds']:.0f} s wall", flush=True)
    return {"command": shown, "export": str(export), **info}


def common(args, root: Path, name: str, seed: int, steps: int) -> list[str]:
    return [
        f"--seed_everything={seed}", f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={root}", f"--trainer.logger.init_args.name={name}",
    ]  # fmt: skip


def noisy_corpus(args, root: Path) -> Path:
    """The facts corpus rebuilt with more wrong facts / unsafe sentences (same KB, same documents' plan)."""
    from lit_selfimprove.worlds.facts import write_corpus

    return write_corpus(root / "noisy_corpus", p_wrong=args.noise_p_wrong, p_unsafe=args.noise_p_unsafe)


def start_policy_command(args, root: Path, corpus: Path) -> list[str]:
    """``builtin:tiny-sip-policy``, next-token fine-tuned on the noisy corpus."""
    cmd = ["fit", "--config", "configs/tiny/pretrain_sip_policy.yaml"]
    cmd += common(args, root, "start_policy", args.noise_seed, args.noise_steps)
    return cmd + [
        "--model.init_args.model=builtin:tiny-sip-policy",
        f"--model.init_args.lr={args.noise_lr}",
        f"--model.init_args.warmup_steps={max(1, args.noise_steps // 10)}",
        "--model.init_args.save_to=null",
        f"--data.init_args.corpus={corpus}",
        f"--data.init_args.seed={args.noise_seed}",
    ]


def dpo_command(args, root: Path, start: str, k: int, seed: int) -> list[str]:
    cmd = ["fit", "--config", "configs/tiny/sip_dpo.yaml"]
    cmd += common(args, root, f"dpo_k{k}_s{seed}", seed, args.steps)
    return cmd + [
        f"--data.init_args.seed={seed}", f"--model.init_args.seed={seed}",
        f"--model.init_args.model={start}", f"--model.init_args.candidates.num_rollouts={k}",
        "--model.init_args.candidates.include_rewrite=true",
        "--model.init_args.rewriter=lit_selfimprove.judges.KBRewriter",
        f"--model.init_args.optim.lr={args.lr}", f"--model.init_args.objective.beta={args.beta}",
        f"--model.init_args.log_samples_every={args.steps}",
        f"--trainer.callbacks.init_args.every_n_steps={args.steps}",
    ]  # fmt: skip


def next_token_command(args, root: Path, start: str, seed: int) -> list[str]:
    cmd = ["fit", "--config", "configs/tiny/sip_next_token.yaml"]
    cmd += common(args, root, f"next_token_s{seed}", seed, args.steps)
    return cmd + [
        f"--data.init_args.seed={seed}",
        f"--model.init_args.model={start}",
        f"--model.init_args.lr={args.lr}",
    ]


# ------------------------------------------------------------------------ selection curves
def selection_rows(log_dir: str | Path) -> list[dict[str, float]]:
    with open(Path(log_dir) / "selection.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def pooled_shares(rows: list[dict]) -> dict[str, float]:
    """Shares of the trained prefixes (``pairs``) of ``rows`` pooled: chosen source and best class."""
    pairs = sum(r["pairs"] for r in rows)
    out = {f"chosen_{s}": sum(r[f"chosen_{s}"] for r in rows) / pairs if pairs else math.nan for s in SOURCES}
    out.update({b: sum(r[b] for r in rows) / pairs if pairs else math.nan for b in BEST})
    out["ties_best"] = sum(r["ties_best"] for r in rows) / pairs if pairs else math.nan
    prefixes = sum(r["prefixes"] for r in rows)
    out["skipped"] = sum(r["skipped"] for r in rows) / prefixes if prefixes else math.nan
    out["pairs"] = pairs
    return out


def curve(rows: list[dict], window: int) -> list[dict[str, float]]:
    """Pooled shares over consecutive blocks of ``window`` steps (``step`` = the block's last step)."""
    out = []
    for i in range(0, len(rows) - window + 1, window):
        block = rows[i : i + window]
        out.append({"step": block[-1]["step"] + 1, **pooled_shares(block)})
    return out


def summarize_k(runs: dict[int, list[dict]], window: int, frac: float) -> dict:
    """Per K: early / late pooled shares per seed and their mean / sd, the crossover step per seed
    (first block where the chosen rollout share reaches 0.5, i.e. exceeds suffix + rewrite)."""
    out: dict = {"seeds": sorted(runs), "per_seed": {}}
    for seed, rows in runs.items():
        q = max(1, round(len(rows) * frac))
        blocks = curve(rows, window)
        cross = next((b["step"] for b in blocks if b["chosen_rollout"] >= 0.5), None)
        cross_strict = next(
            (b["step"] for b in blocks if b["best_rollout_only"] + b["best_tied"] >= b["best_corpus_only"]),
            None,
        )
        out["per_seed"][seed] = {
            "early": pooled_shares(rows[:q]),
            "late": pooled_shares(rows[-q:]),
            "early_steps": [int(rows[0]["step"]), int(rows[q - 1]["step"])],
            "late_steps": [int(rows[-q]["step"]), int(rows[-1]["step"])],
            "crossover_step_chosen": cross,
            "crossover_step_rollout_in_best": cross_strict,
            "curve": blocks,
        }
    for phase in ("early", "late"):
        keys = out["per_seed"][next(iter(runs))][phase]
        out[phase] = {}
        for key in keys:
            vals = [out["per_seed"][s][phase][key] for s in runs]
            out[phase][key] = statistics.mean(vals)
            out[phase][f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
    return out


def compact_rows(runs: dict[int, list[dict]]) -> dict:
    """Per-step ``selection.csv`` rows of each seed as ``{"columns", "<seed>": [[values], ...]}``."""
    columns = list(next(iter(runs.values()))[0])
    return {
        "columns": columns,
        **{str(s): [[r[c] for c in columns] for r in rows] for s, rows in runs.items()},
    }


def dump_json(summary: dict) -> str:
    """``summary`` as indented JSON, its ``raw_selection_rows`` one line per run (the file stays small)."""
    raw = summary.get("raw_selection_rows", {})
    head = json.dumps(
        {k: v for k, v in summary.items() if k != "raw_selection_rows"}, indent=1, default=float
    )
    lines = []
    for k, table in raw.items():
        cells = [f'  "columns": {json.dumps(table["columns"])}']
        cells += [
            f'  "{s}": {json.dumps(v, separators=(",", ":"))}' for s, v in table.items() if s != "columns"
        ]
        lines.append(f' "{k}": {{\n' + ",\n".join(cells) + "\n }")
    return head[:-2] + ',\n "raw_selection_rows": {\n' + ",\n".join(lines) + "\n }\n}\n"


def plot_selection(selection: dict, window: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(selection, key=int)
    fig, axes = plt.subplots(1, len(ks), figsize=(5.2 * len(ks), 4.0), sharey=True, squeeze=False)
    lines = (
        ("chosen_rollout", "tab:blue", "-", "chosen = a rollout"),
        ("chosen_suffix", "tab:orange", "-", "chosen = the suffix"),
        ("chosen_rewrite", "tab:green", "-", "chosen = the rewrite"),
        ("best_corpus_only", "tab:red", "--", "suffix/rewrite strictly best"),
        ("best_tied", "tab:purple", "--", "rollout tied with suffix/rewrite"),
        ("best_rollout_only", "black", ":", "a rollout strictly best"),
    )
    for ax, k in zip(axes[0], ks):
        per_seed = selection[k]["per_seed"]
        seeds = sorted(per_seed)
        steps = [b["step"] for b in per_seed[seeds[0]]["curve"]]
        for key, color, ls, label in lines:
            vals = [[b[key] for b in per_seed[s]["curve"]] for s in seeds]
            mean = [statistics.mean(v) for v in zip(*vals)]
            ax.plot(steps, mean, color=color, ls=ls, lw=2.0 if ls == "-" else 1.4, label=label)
            if len(seeds) > 1:
                lo = [min(v) for v in zip(*vals)]
                hi = [max(v) for v in zip(*vals)]
                ax.fill_between(steps, lo, hi, color=color, alpha=0.12 if ls == "-" else 0.06, lw=0)
        ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        ax.set(ylim=(-0.02, 1.02), xlabel="DPO step")
        ax.set_title(f"K={k}: mean of {len(seeds)} seed(s) (band: min-max), {window}-step blocks", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of trained prefixes")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(lines), fontsize=8)
    fig.suptitle(
        "SIP Figure 8 on the tiny facts world: which candidate the judge chose (ties: uniform among the best); "
        "dashed / dotted: who held the best score before the tie-break",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- offline selection
def offline_selection(ev, texts: list[str], per: int) -> dict[str, float]:
    """Fixed held-out prefixes: ``per`` samples of a policy + the suffix + its rewrite, scored by the
    training judge; the best classes and the expected chosen shares (uniform tie-break)."""
    from lit_selfimprove.judges import CombinedJudge, KBFactualityJudge, KBRewriter, KBSafetyJudge
    from lit_selfimprove.loops.sip import best_classes

    judge = CombinedJudge(quality=ev.quality, factuality=KBFactualityJudge(), safety=KBSafetyJudge())
    prefixes, suffixes = [p for p, _ in ev.pairs], [s for _, s in ev.pairs]
    rewrites = KBRewriter().rewrite(prefixes, suffixes)
    cands = [texts[i * per : (i + 1) * per] + [s, r] for i, (s, r) in enumerate(zip(suffixes, rewrites))]
    total = judge.score_candidates(prefixes, cands, references=suffixes).total.float()
    sources = ["rollout"] * per + ["suffix", "rewrite"]
    spread = (total.max(-1).values - total.min(-1).values) > 1e-6
    out: dict[str, float] = {
        k: v / max(1, int(spread.sum())) for k, v in best_classes(total, sources, spread).items()
    }
    chosen = dict.fromkeys(SOURCES, 0.0)
    for row in total[spread]:
        best = (row >= row.max() - 1e-6).nonzero().flatten().tolist()
        for b in best:
            chosen[sources[b]] += 1 / len(best)
    out.update({f"chosen_{s}": v / max(1, int(spread.sum())) for s, v in chosen.items()})
    out["pairs"] = int(spread.sum())
    out["mean_score_rollout"] = float(total[:, :per].mean())
    out["mean_score_suffix"] = float(total[:, per].mean())
    out["mean_score_rewrite"] = float(total[:, per + 1].mean())
    return out


# -------------------------------------------------------------------------------- main
def parse(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the README's budget (<= 20 min on 2 shared cores)")
    p.add_argument("--noise-steps", type=int, default=100, help="fine-tuning steps on the noisy corpus")
    p.add_argument("--noise-p-wrong", type=float, default=0.8, help="wrong facts in the noisy corpus")
    p.add_argument("--noise-p-unsafe", type=float, default=0.4, help="unsafe sentences in the noisy corpus")
    p.add_argument("--noise-lr", type=float, default=1e-3)
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--start-policy", default=None, help="use this policy instead of building the noisy one")
    p.add_argument("--steps", type=int, default=None, help="DPO / next-token steps of every arm")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the largest K")
    p.add_argument("--seeds-small", type=int, nargs="+", default=None, help="seeds of the other Ks")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--window", type=int, default=None, help="steps per block of the curves")
    p.add_argument("--phase", type=float, default=0.2, help="early / late = this share of the steps")
    p.add_argument("--num-prefixes", type=int, default=None, help="held-out prefixes of the evaluation")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--out-dir", default="runs/sip_crossover")
    p.add_argument("--reuse", action="store_true", help="skip trainings whose exported policy exists")
    p.add_argument("--json", default="docs/sip_crossover.json")
    p.add_argument("--plot", default="docs/sip_selection.png")
    args = p.parse_args(argv)
    quick = {"steps": 150, "seeds": [0, 1], "seeds_small": [0, 1], "window": 10, "num_prefixes": 100}
    full = {"steps": 150, "seeds": [0, 1, 2], "seeds_small": [0, 1, 2], "window": 10, "num_prefixes": 200}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    root = (REPO / args.out_dir).resolve()
    runs: dict[str, dict] = {}
    # ---- 1. the start policy (worse than the corpus)
    if args.start_policy:
        start = args.start_policy
    else:
        corpus = noisy_corpus(args, root)
        print(f"[1/4] start policy: {args.noise_steps} next-token steps on {corpus}", flush=True)
        cmd = start_policy_command(args, root, corpus)
        runs["start_policy"] = run_training("start_policy", cmd, root, args.reuse)
        start = runs["start_policy"]["export"]
    # ---- 2. DPO arms (largest K first, seed by seed), 3. the next-token baseline
    kmax = max(args.ks)
    seeds_of = {k: args.seeds if k == kmax else args.seeds_small for k in args.ks}
    plan = [(k, s) for s in args.seeds for k in sorted(args.ks, reverse=True) if s in seeds_of[k]]
    plan += [(k, s) for k in sorted(args.ks, reverse=True) for s in seeds_of[k] if (k, s) not in plan]
    for i, (k, seed) in enumerate(plan):
        print(f"[2/4] DPO K={k} seed {seed} ({i + 1}/{len(plan)}), {args.steps} steps", flush=True)
        runs[f"dpo_k{k}_s{seed}"] = run_training(
            f"dpo_k{k}_s{seed}", dpo_command(args, root, start, k, seed), root, args.reuse
        )
        rows = selection_rows(runs[f"dpo_k{k}_s{seed}"]["log_dir"])
        q = max(1, round(len(rows) * args.phase))
        e, late = pooled_shares(rows[:q]), pooled_shares(rows[-q:])
        print(
            f"     chosen rollout {e['chosen_rollout']:.2f} -> {late['chosen_rollout']:.2f}, "
            f"suffix+rewrite strictly best {e['best_corpus_only']:.2f} -> {late['best_corpus_only']:.2f}",
            flush=True,
        )
    s0 = args.seeds[0]
    print(f"[3/4] next-token baseline seed {s0}, {args.steps} steps", flush=True)
    runs[f"next_token_s{s0}"] = run_training(
        f"next_token_s{s0}", next_token_command(args, root, start, s0), root, args.reuse
    )
    train_seconds = time.perf_counter() - t0

    # ---- 4. evaluation on held-out prefixes, same sampling seed for every policy
    print("[4/4] evaluation", flush=True)
    t_eval = time.perf_counter()
    ev = comparison.Evaluator(args.num_prefixes, args.samples, 40, args.eval_seed)
    results: dict[str, dict] = {}
    offline: dict[str, dict] = {}
    base = comparison.load_policy(start)
    results["start"] = ev.evaluate(base, 1.0)
    offline["start"] = offline_selection(ev, results["start"]["_texts"], args.samples)
    baseline = comparison.load_policy(runs[f"next_token_s{s0}"]["export"])
    results[f"next_token_s{s0}"] = ev.evaluate(baseline, 1.0)
    for t in TEMPERATURES:
        results[f"next_token_s{s0}_T{t}"] = ev.evaluate(baseline, t)
    for k, seed in plan:
        name = f"dpo_k{k}_s{seed}"
        results[name] = ev.evaluate(comparison.load_policy(runs[name]["export"]), 1.0)
        offline[name] = offline_selection(ev, results[name]["_texts"], args.samples)
    for r in results.values():
        ev.versus(r, results[f"next_token_s{s0}"])
    dpo_names = [f"dpo_k{k}_s{seed}" for k, seed in plan]
    control = comparison.sharpening_control(results, s0, dpo_names)
    eval_seconds = time.perf_counter() - t_eval
    for r in results.values():
        r.pop("_texts", None)
        r.pop("_prefixes", None)

    # ---- summaries
    selection = {}
    for k in args.ks:
        rows = {seed: selection_rows(runs[f"dpo_k{k}_s{seed}"]["log_dir"]) for seed in seeds_of[k]}
        selection[str(k)] = summarize_k(rows, args.window, args.phase)
        selection[str(k)]["raw_rows"] = rows
    metrics = ("factuality", "fact_accuracy", "safety", "coherence")
    quality = {"start_T1": {m: results["start"][m] for m in metrics}}
    quality[f"next_token_s{s0}_T1"] = {m: results[f"next_token_s{s0}"][m] for m in metrics}
    for k in args.ks:
        names = [f"dpo_k{k}_s{seed}" for seed in seeds_of[k]]
        row: dict = {}
        for m in (*metrics, "sampling_entropy"):
            row[m], row[f"{m}_sd"] = comparison.mean_sd([results[n][m] for n in names])
        row["win_vs_next_token"], row["win_vs_next_token_sd"] = comparison.mean_sd(
            [results[n]["vs_next_token"]["win_rate"] for n in names]
        )
        for m in ("factuality", "fact_accuracy", "safety", "win_vs_next_token"):
            gains = [control[n]["arm_minus_sharpened_baseline"][m] for n in names]
            row[f"{m}_minus_matched_baseline"], row[f"{m}_minus_matched_baseline_sd"] = comparison.mean_sd(
                gains
            )
        row["extrapolated"] = [control[n]["extrapolated"] for n in names]
        quality[f"dpo_k{k}"] = row
    summary = {
        "what": "SIP Figure 8 on the tiny facts world: a start policy worse than the corpus, online DPO with "
        "K rollouts + suffix + KB rewrite; which candidate the judge chose over training",
        "settings": {
            "start_policy": start,
            "noisy_start": None
            if args.start_policy
            else {
                "from": "builtin:tiny-sip-policy",
                "steps": args.noise_steps,
                "lr": args.noise_lr,
                "seed": args.noise_seed,
                "p_wrong": args.noise_p_wrong,
                "p_unsafe": args.noise_p_unsafe,
                "training_corpus": {"p_wrong": 0.3, "p_unsafe": 0.15},
            },
            "dpo_steps": args.steps,
            "ks": args.ks,
            "seeds": {str(k): seeds_of[k] for k in args.ks},
            "lr": args.lr,
            "beta": args.beta,
            "window": args.window,
            "early_late": f"first / last {args.phase:.0%} of the steps, counts pooled",
            "tie_rule": "chosen = uniform random draw among the candidates within 1e-6 of the best total "
            "score (rl/selection.select_pairs, seeded); a prefix whose candidates all tie is skipped",
            "eval": f"{args.num_prefixes} heldout_prefixes, {args.samples} samples each, 40 new tokens, "
            f"generator seed {args.eval_seed}",
            "threads": "OMP_NUM_THREADS=1 nice -n 5, one training at a time, 2 CPU cores shared with another worker",
        },
        "selection": {k: {kk: vv for kk, vv in v.items() if kk != "raw_rows"} for k, v in selection.items()},
        "offline_selection": offline,
        "quality": quality,
        "sharpening_control": control,
        "results": results,
        "runs": runs,
        "raw_selection_rows": {k: compact_rows(v["raw_rows"]) for k, v in selection.items()},
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - t0,
        "command": "python experiments/sip_crossover.py " + " ".join(argv),
    }
    (REPO / args.json).parent.mkdir(parents=True, exist_ok=True)
    (REPO / args.json).write_text(dump_json(summary))
    plot_selection(summary["selection"], args.window, REPO / args.plot)
    print_summary(summary)


def print_summary(summary: dict) -> None:
    def f(v, sd=None):
        return "-" if v is None else f"{v:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")

    print(
        "| K | seeds | phase | chosen rollout | chosen suffix | chosen rewrite | rollout strictly best | tie | suffix/rewrite strictly best |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k, sel in summary["selection"].items():
        for phase in ("early", "late"):
            e = sel[phase]
            print(
                f"| {k} | {len(sel['seeds'])} | {phase} | {f(e['chosen_rollout'], e['chosen_rollout_sd'])} | "
                f"{f(e['chosen_suffix'], e['chosen_suffix_sd'])} | {f(e['chosen_rewrite'], e['chosen_rewrite_sd'])} | "
                f"{f(e['best_rollout_only'], e['best_rollout_only_sd'])} | {f(e['best_tied'], e['best_tied_sd'])} | "
                f"{f(e['best_corpus_only'], e['best_corpus_only_sd'])} |"
            )
    print(json.dumps(summary["quality"], indent=1, default=float))
    print(
        f"train {summary['train_seconds']:.0f} s, eval {summary['eval_seconds']:.0f} s, "
        f"total {summary['total_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
