"""Self-Improving Pretraining on the tiny facts world: online DPO vs next-token vs RF-NLL, K rollouts.

    python experiments/sip_tiny_comparison.py                 # ~30 min on 2 shared CPU cores
    python experiments/sip_tiny_comparison.py --steps 40 --seeds 0 --ks 8 --no-rf-nll   # a smoke run

Every arm starts from the bundled ``builtin:tiny-sip-policy`` (next-token pre-trained on the corpus,
so it repeats its 30% wrong facts and 15% unsafe sentences) and trains for the same number of
optimizer steps on the same prefix -> suffix batches (``PrefixSuffixDataModule``, same data seed):

1. ``next_token``: ``configs/tiny/sip_next_token.yaml`` (NLL of the 40-token suffix);
2. ``dpo_k{K}``: ``configs/tiny/sip_dpo.yaml`` with K rollouts + the suffix, best vs worst;
3. ``rf_nll_k8``: ``configs/tiny/sip_rf_nll.yaml`` (NLL of the best candidate).

Trainings run one at a time (``OMP_NUM_THREADS=1 nice -n 5``), each in its own process, which
also exports the final policy as a Hugging Face folder. Then every policy continues the same
held-out prefixes (``heldout_prefixes``: documents of another seed, never trained on) with the same
sampling seed, and the knowledge-base judges report factuality, fact accuracy, safety and pairwise
quality win rates (``KBQualityJudge``, ties 0.5) against the next-token baseline's continuations and
against the original suffix. The base policy (no training) and the baseline sampled at lower
temperatures / greedily are reported too: in this world greedy decoding of the base is already far
more factual than sampling, so part of a DPO gain may be sharpening.

Writes ``docs/sip_comparison.json`` (numbers, commands, wall times), ``docs/sip_comparison.png`` and
``docs/sip_comparison_selection.png`` (Figure 8 for the bundled policy: which candidate the judge
chose, over training; ``experiments/sip_crossover.py`` writes ``docs/sip_selection.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "next_token": "configs/tiny/sip_next_token.yaml",
    "dpo": "configs/tiny/sip_dpo.yaml",
    "rf_nll": "configs/tiny/sip_rf_nll.yaml",
}
BASE = "builtin:tiny-sip-policy"
PAPER_WIN_RATE_BY_K = {2: 69.9, 4: 75.5, 8: 84.3, 16: 86.3}  # METHODS.md section 2


# ----------------------------------------------------------------------------- training
def train_and_export(export: Path, cli_args: list[str]) -> None:
    """``python -m lit_selfimprove <cli_args>`` in this process, then the final policy -> ``export``."""
    import torch

    from lit_selfimprove.cli import main as cli_main

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    cli = cli_main(cli_args)
    seconds = time.perf_counter() - start
    module = cli.model
    model = getattr(module, "policy", None) or module.model
    export.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(export)
    module.tokenizer.save_pretrained(export)
    info = {"log_dir": str(cli.trainer.log_dir), "fit_seconds": seconds, "steps": cli.trainer.global_step}
    (export / "run.json").write_text(json.dumps(info, indent=1))


def arm_command(arm: str, seed: int, args, root: Path) -> list[str]:
    kind, k = (arm.rsplit("_k", 1) + [None])[:2] if "_k" in arm else (arm, None)
    cfg = CONFIGS[kind]
    cmd = [
        "fit", "--config", cfg, f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
        f"--trainer.max_steps={args.steps}", f"--trainer.val_check_interval={args.val_every}",
        f"--trainer.logger.init_args.save_dir={root}", f"--trainer.logger.init_args.name={arm}_s{seed}",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if kind != "next_token":
        cmd += [f"--model.init_args.seed={seed}", f"--model.init_args.candidates.num_rollouts={k}"]
    return cmd


def run_arm(arm: str, seed: int, args, root: Path) -> dict:
    export = root / "policies" / f"{arm}_s{seed}"
    cli_args = arm_command(arm, seed, args, root)
    shown = "OMP_NUM_THREADS=1 nice -n 5 python -m lit_selfimprove " + " ".join(cli_args)
    if args.reuse and (export / "run.json").exists():
        info = json.loads((export / "run.json").read_text())
        print(f"[reuse] {arm} seed {seed}: {export}", flush=True)
        return {"command": shown, "export": str(export), **info, "reused": True}
    info = train_logged(export, cli_args, root / "logs" / f"{arm}_s{seed}.log", f"{arm} seed {seed}")
    print(
        f"{arm} seed {seed}: {info['wall_seconds']:.0f} s wall ({info['fit_seconds']:.0f} s fit)", flush=True
    )
    return {"command": shown, "export": str(export), **info}


def train_logged(export: Path, cli_args: list[str], log: Path, name: str) -> dict:
    """``train`` mode of this script in its own process (one thread, ``nice -n 5``), output to ``log``;
    the exported policy's ``run.json`` with ``wall_seconds`` added (also written back)."""
    shell = ["nice", "-n", "5", sys.executable, __file__, "train", "--export", str(export), "--", *cli_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(shell, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{name} failed ({proc.returncode}); see {log}")
    info = json.loads((export / "run.json").read_text())
    info["wall_seconds"] = wall
    (export / "run.json").write_text(json.dumps(info, indent=1))
    return info


# --------------------------------------------------------------------------- evaluation
class Evaluator:
    """Continuations of fixed held-out prefixes, judged by the knowledge-base judges."""

    def __init__(self, num_prefixes: int, samples: int, max_new_tokens: int, seed: int):
        from lit_selfimprove.judges import KBQualityJudge
        from lit_selfimprove.modeling import load_tokenizer
        from lit_selfimprove.worlds.facts import KnowledgeBase, heldout_prefixes

        self.kb, self.quality = KnowledgeBase(), KBQualityJudge()
        self.pairs = heldout_prefixes(num_prefixes, max_new_tokens, kb=self.kb)
        self.samples, self.max_new_tokens, self.seed = samples, max_new_tokens, seed
        self.tok = load_tokenizer("builtin:tiny-tokenizer")
        # no BOS, as the prefixes of PrefixSuffixDataModule that every arm trained on
        self.enc = self.tok(
            [p for p, _ in self.pairs],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )

    def sample(self, model, temperature: float) -> tuple[list[str], list[str], list[str], dict]:
        """(prefixes, continuations, reference suffixes) expanded per sample, and sharpness:
        ``sampling_entropy``, the mean NLL of the sampled tokens under the distribution they were
        drawn from (temperature applied; a per-token entropy estimate, nats; ``None`` for greedy),
        and ``nll_at_T1``, their mean NLL under the policy itself at temperature 1."""
        import torch

        from lit_selfimprove.generation import generate
        from lit_selfimprove.rl.logprobs import sequence_logprobs

        n = 1 if temperature == 0 else self.samples  # greedy samples would be identical
        gen = torch.Generator().manual_seed(self.seed)
        ro = generate(
            model,
            self.tok,
            prompt_ids=self.enc["input_ids"],
            prompt_mask=self.enc["attention_mask"],
            num_samples=n,
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            generator=gen,
        )
        ids, attn, cmask = ro.sequences()
        tokens = cmask[:, 1:].sum().clamp(min=1)
        with torch.no_grad():
            sharp = {"nll_at_T1": float(-sequence_logprobs(model, ids, attn, cmask).sum() / tokens)}
            sharp["sampling_entropy"] = (
                float(-sequence_logprobs(model, ids, attn, cmask, temperature=temperature).sum() / tokens)
                if temperature > 0
                else None
            )
        prefixes = [p for p, _ in self.pairs for _ in range(n)]
        refs = [s for _, s in self.pairs for _ in range(n)]
        return prefixes, ro.texts, refs, sharp

    def win_rate(self, prefixes, mine, theirs) -> dict[str, float]:
        v = self.quality.compare(prefixes, mine, theirs)
        return {
            "win_rate": sum(v) / len(v),
            "wins": sum(x == 1.0 for x in v) / len(v),
            "ties": sum(x == 0.5 for x in v) / len(v),
            "losses": sum(x == 0.0 for x in v) / len(v),
        }

    def combined_win_rate(self, prefixes, mine, theirs) -> float:
        """Head to head with the training judge's total (quality verdict + factuality + safety)."""
        from lit_selfimprove.judges import CombinedJudge, KBFactualityJudge, KBSafetyJudge

        judge = CombinedJudge(quality=self.quality, factuality=KBFactualityJudge(), safety=KBSafetyJudge())
        total = judge.score_candidates(
            prefixes, [[a, b] for a, b in zip(mine, theirs)], references=mine
        ).total
        a, b = total[:, 0], total[:, 1]
        return float(((a > b).float() + 0.5 * (a == b).float()).mean())

    def evaluate(self, model, temperature: float) -> dict:
        """Sample, then the world's statistics and the win rate against the original suffix."""
        from lit_selfimprove.worlds.facts import continuation_stats

        prefixes, texts, refs, sharp = self.sample(model, temperature)
        out = {"temperature": temperature, "continuations": len(texts), **sharp}
        out.update(continuation_stats(self.kb, prefixes, texts))
        out["vs_suffix"] = self.win_rate(prefixes, texts, refs)
        per = len(texts) // len(self.pairs)
        if per > 1:
            out[f"offline_selection_k{per}"] = self.offline_selection(texts, per)
        out["examples"] = [[p[-30:], t] for p, t in list(zip(prefixes, texts))[: 3 * per]]
        out["_prefixes"], out["_texts"] = prefixes, texts
        return out

    def offline_selection(self, texts: list[str], per: int) -> dict[str, float]:
        """Figure 8 on fixed prefixes: candidates = this policy's ``per`` samples + the suffix, scored
        by the training judge; the expected share of prefixes whose chosen (best) candidate is the
        suffix, ties broken uniformly as in training, all-equal prefixes skipped."""
        from lit_selfimprove.judges import CombinedJudge, KBFactualityJudge, KBSafetyJudge

        judge = CombinedJudge(quality=self.quality, factuality=KBFactualityJudge(), safety=KBSafetyJudge())
        prefixes = [p for p, _ in self.pairs]
        cands = [texts[i * per : (i + 1) * per] + [s] for i, (_, s) in enumerate(self.pairs)]
        total = judge.score_candidates(prefixes, cands, references=[s for _, s in self.pairs]).total
        suffix, pairs = 0.0, 0
        for row in total:
            best = row.max()
            if float(best - row.min()) <= 1e-6:
                continue
            tied = (row >= best - 1e-6).nonzero().flatten().tolist()
            suffix += (per in tied) / len(tied)
            pairs += 1
        return {
            "chosen_suffix": suffix / max(1, pairs),
            "chosen_rollout": 1 - suffix / max(1, pairs),
            "pairs": pairs,
        }

    def versus(self, result: dict, baseline: dict) -> None:
        """Add pairwise win rates of ``result``'s continuations against ``baseline``'s (same samples)."""
        if len(result["_texts"]) != len(baseline["_texts"]) or result is baseline:
            return
        prefixes, mine, theirs = result["_prefixes"], result["_texts"], baseline["_texts"]
        result["vs_next_token"] = self.win_rate(prefixes, mine, theirs)
        result["vs_next_token"]["combined_win_rate"] = self.combined_win_rate(prefixes, mine, theirs)


def load_policy(path: str):
    from lit_selfimprove.modeling import load_causal_lm

    model = load_causal_lm(path)
    model.eval()
    return model


# ------------------------------------------------------------------------------ curves
def selection_rows(log_dir: Path) -> list[dict[str, float]]:
    with open(log_dir / "selection.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def pooled(rows: list[dict], source: str) -> float:
    pairs = sum(r["pairs"] for r in rows)
    return sum(r[f"chosen_{source}"] for r in rows) / pairs if pairs else math.nan


def moving(rows: list[dict], source: str, window: int) -> list[float]:
    return [pooled(rows[max(0, i + 1 - window) : i + 1], source) for i in range(len(rows))]


def moving_full(rows: list[dict], source: str, window: int) -> tuple[list[float], list[float]]:
    """(steps, pooled moving share) over full windows only (the first steps alone are too noisy)."""
    values = moving(rows, source, window)
    return [r["step"] for r in rows][window - 1 :], values[window - 1 :]


def plot_selection(summary: dict, out: Path) -> None:
    """Figure 8 in three panels: the main DPO run, suffix share by K, and the controlled
    offline measurement (fixed held-out prefixes, each policy's samples + the suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = summary["selection_window"]
    s0, kmax = summary["settings"]["seeds"][0], max(summary["by_k"], key=int)
    ks = sorted(int(k) for k in summary["by_k"])
    runs = summary["runs"]
    rows = {k: selection_rows(Path(runs[f"dpo_k{k}_s{s0}"]["log_dir"])) for k in ks}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    ax, main = axes[0], rows[int(kmax)]
    k = int(kmax)
    for source, color in (("rollout", "tab:blue"), ("suffix", "tab:orange")):
        raw = [r[f"chosen_{source}"] / r["pairs"] if r["pairs"] else math.nan for r in main]
        ax.plot([r["step"] for r in main], raw, color=color, alpha=0.18, lw=0.8)
        ax.plot(*moving_full(main, source, window), color=color, lw=2.2, label=f"{source}, seed {s0}")
        for seed in summary["settings"]["seeds"][1:]:
            other = selection_rows(Path(runs[f"dpo_k{k}_s{seed}"]["log_dir"]))
            ax.plot(
                *moving_full(other, source, window),
                color=color,
                lw=1,
                ls="--",
                label=f"{source}, seed {seed}",
            )
    ax.axhline(k / (k + 1), color="tab:blue", ls=":", lw=1, label=f"all tied: {k}/{k + 1}")
    ax.axhline(1 / (k + 1), color="tab:orange", ls=":", lw=1, label=f"all tied: 1/{k + 1}")
    ax.set(ylim=(-0.02, 1.02), xlabel="step", ylabel="share of chosen candidates")
    ax.set_title(f"DPO K={k}: chosen = rollout / suffix ({window}-step pooled avg)", fontsize=9)
    ax.legend(fontsize=6.5, loc="center right", ncol=2)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for kk in ks:
        line = ax.plot(*moving_full(rows[kk], "suffix", window), lw=2, label=f"K={kk}")[0]
        ax.axhline(1 / (kk + 1), color=line.get_color(), ls=":", lw=1)
    ax.set(ylim=(-0.02, 0.62), xlabel="step", ylabel="share chosen = original suffix")
    ax.set_title(f"suffix chosen during training, seed {s0} (dotted: 1/(K+1))", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[2]
    offline = summary.get(f"offline_selection_k{summary['settings']['samples']}", {})
    order = [n for n in offline if not n.startswith("next_token_s") or n == f"next_token_s{s0}" or "_T" in n]
    if order:
        vals = [offline[n]["chosen_suffix"] for n in order]
        colors = ["tab:gray" if n.startswith(("base", "next_token")) else "tab:green" for n in order]
        ax.bar(range(len(order)), vals, color=colors)
        ax.axhline(1 / (summary["settings"]["samples"] + 1), color="gray", ls=":", lw=1, label="all tied")
        ax.set_xticks(range(len(order)), order, rotation=40, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    n = summary["settings"]["samples"]
    ax.set(ylabel="share chosen = original suffix")
    ax.set_title(f"fixed held-out prefixes: {n} samples + suffix, same judge", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Tiny SIP: which candidate the judge picks as 'chosen' (the paper's Figure 8)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_comparison(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["table"]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    axes = axes.flatten()
    ax = axes[0]
    metrics = [("factuality", "factuality"), ("fact_accuracy", "fact accuracy"), ("safety", "safety")]
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        vals = [r[key] for r in rows]
        errs = [r.get(f"{key}_sd") or 0 for r in rows]
        ax.bar(
            [x + i * width for x in range(len(rows))],
            vals,
            width,
            yerr=errs if any(errs) else None,
            capsize=2,
            label=label,
        )
    ax.set_xticks([x + width for x in range(len(rows))], names, rotation=35, ha="right", fontsize=7)
    ax.set(ylim=(0, 1.05), title="held-out continuations (KB judges)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    judged = [r for r in rows if r.get("win_vs_next_token") is not None]
    errs = [100 * (r.get("win_vs_next_token_sd") or 0) for r in judged]
    ax.bar(range(len(judged)), [100 * r["win_vs_next_token"] for r in judged], color="tab:purple",
           yerr=errs if any(errs) else None, capsize=2)  # fmt: skip
    ax.axhline(50, color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(judged)), [r["name"] for r in judged], rotation=35, ha="right", fontsize=7)
    ax.set(ylabel="quality win rate vs next-token (%)", title="pairwise KBQualityJudge, ties 0.5")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    ks = sorted(summary["by_k"])
    ax.plot(ks, [100 * summary["by_k"][k] for k in ks], marker="o", label="tiny world (DPO)")
    paper = [k for k in ks if k in PAPER_WIN_RATE_BY_K]
    ax.plot(
        paper,
        [PAPER_WIN_RATE_BY_K[k] for k in paper],
        marker="s",
        ls="--",
        color="gray",
        label="paper (1.4B)",
    )
    ax.axhline(50, color="gray", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="rollouts K", ylabel="win rate vs next-token (%)", title="more rollouts")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[3]
    results, s0 = summary["results"], summary["settings"]["seeds"][0]
    curve = sorted(
        (r for n, r in results.items() if n == f"next_token_s{s0}" or n.startswith(f"next_token_s{s0}_T")),
        key=lambda r: r["sampling_entropy"],
    )
    for metric, color in (("factuality", "tab:blue"), ("safety", "tab:green")):
        temps = " / ".join(str(r["temperature"]) for r in curve)
        ax.plot(
            [r["sampling_entropy"] for r in curve],
            [r[metric] for r in curve],
            color=color,
            marker="o",
            ls="--",
            label=f"next-token {metric}, T = {temps}",
        )
        for name, marker in (("dpo_k", "*"), ("rf_nll_k", "s")):
            arms = [r for n, r in results.items() if n.startswith(name) and r["temperature"] == 1.0]
            label = "DPO (K=2/4/8, seeds)" if name == "dpo_k" else "RF-NLL"
            ax.scatter(
                [r["sampling_entropy"] for r in arms],
                [r[metric] for r in arms],
                color=color,
                marker=marker,
                s=90 if marker == "*" else 40,
                label=f"{label} {metric}, T=1",
            )
    ax.invert_xaxis()
    ax.set(xlabel="sampling entropy (nats/token; lower = sharper)", ylabel="rate")
    ax.set_title("sharpening control: the baseline at lower temperature vs the trained arms", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------- main
def sharpening_control(results: dict, s0: int, names: list[str]) -> dict:
    """The seed-``s0`` next-token baseline sampled at T = 1 / 0.7 / 0.5, linearly interpolated in
    sampling entropy to each trained arm's entropy: what mere sharpening of the baseline would give."""
    curve = sorted(
        (
            (r["sampling_entropy"], r)
            for n, r in results.items()
            if n == f"next_token_s{s0}" or n.startswith(f"next_token_s{s0}_T")
        ),
        key=lambda c: c[0],
    )
    out: dict = {"baseline_points": {f"T={r['temperature']}": h for h, r in curve}}
    metrics = ("factuality", "fact_accuracy", "safety")
    for name in names:
        r = results[name]
        h = r.get("sampling_entropy")
        if h is None or r["temperature"] != 1.0:
            continue
        lo = max([c for c in curve if c[0] <= h], default=curve[0], key=lambda c: c[0])
        hi = min([c for c in curve if c[0] >= h], default=curve[-1], key=lambda c: c[0])
        w = 0.0 if hi[0] == lo[0] else (h - lo[0]) / (hi[0] - lo[0])
        matched = {m: lo[1][m] + w * (hi[1][m] - lo[1][m]) for m in metrics}
        win = [c[1].get("vs_next_token", {}).get("win_rate", 0.5) for c in (lo, hi)]  # T=1 baseline: 0.5
        matched["win_vs_next_token"] = win[0] + w * (win[1] - win[0])
        mine = {m: r[m] for m in metrics}
        mine["win_vs_next_token"] = r.get("vs_next_token", {}).get("win_rate")
        out[name] = {
            "sampling_entropy": h,
            "extrapolated": not (curve[0][0] <= h <= curve[-1][0]),
            "baseline_at_same_entropy": matched,
            "arm": mine,
            "arm_minus_sharpened_baseline": {
                m: None if mine[m] is None else mine[m] - matched[m] for m in matched
            },
        }
    return out


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # one training process (internal)
        sep = argv.index("--")
        p = argparse.ArgumentParser()
        p.add_argument("--export", required=True)
        a = p.parse_args(argv[1:sep])
        train_and_export(Path(a.export), argv[sep + 1 :])
        return
    if argv and argv[0] == "replot":  # redraw both figures from the json (and the runs' selection.csv)
        summary = json.loads((REPO / "docs/sip_comparison.json").read_text())
        plot_comparison(summary, REPO / "docs/sip_comparison.png")
        plot_selection(summary, REPO / "docs/sip_comparison_selection.png")
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of every arm")
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of next_token and DPO K=max"
    )
    p.add_argument(
        "--ks", type=int, nargs="+", default=[2, 4, 8], help="DPO rollouts (the largest is the main arm)"
    )
    p.add_argument("--no-rf-nll", action="store_true")
    p.add_argument("--num-prefixes", type=int, default=200)
    p.add_argument("--samples", type=int, default=4, help="sampled continuations per prefix")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--out-dir", default="runs/sip_comparison")
    p.add_argument("--reuse", action="store_true", help="skip trainings whose exported policy exists")
    p.add_argument("--json", default="docs/sip_comparison.json")
    p.add_argument("--plot", default="docs/sip_comparison.png")
    p.add_argument("--selection-plot", default="docs/sip_comparison_selection.png")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    root = (REPO / args.out_dir).resolve()
    kmax = max(args.ks)
    plan = [("next_token", s) for s in args.seeds] + [(f"dpo_k{kmax}", s) for s in args.seeds]
    plan += [(f"dpo_k{k}", args.seeds[0]) for k in sorted(args.ks, reverse=True) if k != kmax]
    if not args.no_rf_nll:
        plan.append((f"rf_nll_k{kmax}", args.seeds[0]))
    # the main seed's arms first, so a cut-short run still has a full comparison
    plan.sort(key=lambda x: x[1] != args.seeds[0])
    runs: dict[tuple[str, int], dict] = {}
    for arm, seed in plan:
        runs[(arm, seed)] = run_arm(arm, seed, args, root)
    train_seconds = time.perf_counter() - t_start

    # ---- evaluation: same prefixes, same sampling seed for every policy
    t_eval = time.perf_counter()
    ev = Evaluator(args.num_prefixes, args.samples, args.max_new_tokens, args.eval_seed)
    s0 = args.seeds[0]
    results: dict[str, dict] = {}
    base = load_policy(BASE)
    results["base"] = ev.evaluate(base, 1.0)
    for (arm, seed), run in runs.items():
        results[f"{arm}_s{seed}"] = ev.evaluate(load_policy(run["export"]), 1.0)
    # sharpening: lower temperatures / greedy (greedy: one continuation per prefix, no win rate vs T=1)
    results["base_greedy"] = ev.evaluate(base, 0.0)
    baseline0 = load_policy(runs[("next_token", s0)]["export"])
    for t in (0.7, 0.5):
        results[f"next_token_s{s0}_T{t}"] = ev.evaluate(baseline0, t)
    results[f"next_token_s{s0}_greedy"] = ev.evaluate(baseline0, 0.0)
    results[f"dpo_k{kmax}_s{s0}_greedy"] = ev.evaluate(load_policy(runs[(f"dpo_k{kmax}", s0)]["export"]), 0.0)
    # win rates: a trained arm vs the next-token baseline of its seed (same batches); the rest vs seed s0
    for name, r in results.items():
        arm_seed = name.rsplit("_s", 1)
        seed = int(arm_seed[1]) if len(arm_seed) == 2 and arm_seed[1].isdigit() else s0
        baseline = results[f"next_token_s{seed if not name.startswith('next_token') else s0}"]
        ev.versus(r, baseline)
    eval_seconds = time.perf_counter() - t_eval
    for r in results.values():
        r.pop("_texts", None)
        r.pop("_prefixes", None)

    # ---- table: mean (sd) over seeds where there are several
    def row(name: str, keys: list[str]) -> dict:
        rs = [results[k] for k in keys]
        out: dict = {"name": name, "n_seeds": len(rs), "temperature": rs[0]["temperature"]}
        for m in (
            "factuality",
            "fact_accuracy",
            "safety",
            "coherence",
            "facts_per_continuation",
            "nll_at_T1",
        ):
            out[m], out[f"{m}_sd"] = mean_sd([r[m] for r in rs])
        entropies = [r["sampling_entropy"] for r in rs if r["sampling_entropy"] is not None]
        out["sampling_entropy"] = statistics.mean(entropies) if entropies else None
        out["win_vs_suffix"], out["win_vs_suffix_sd"] = mean_sd([r["vs_suffix"]["win_rate"] for r in rs])
        versus = [r["vs_next_token"] for r in rs if "vs_next_token" in r]  # next-token seed 0: none
        if versus:
            out["win_vs_next_token"], out["win_vs_next_token_sd"] = mean_sd([v["win_rate"] for v in versus])
            out["combined_win_vs_next_token"], _ = mean_sd([v["combined_win_rate"] for v in versus])
            out["win_vs_next_token_n"] = len(versus)
        else:
            out["win_vs_next_token"] = None
        split = [k.rsplit("_s", 1) for k in keys]
        arms = [runs.get((a[0], int(a[1]))) for a in split if len(a) == 2 and a[1].isdigit()]
        walls = [a["wall_seconds"] for a in arms if a and "wall_seconds" in a]
        out["train_wall_seconds"] = statistics.mean(walls) if walls else None
        return out

    table = [row("base (no training)", ["base"])]
    table.append(row(f"next-token x{len(args.seeds)}", [f"next_token_s{s}" for s in args.seeds]))
    table.append(row(f"DPO K={kmax} x{len(args.seeds)}", [f"dpo_k{kmax}_s{s}" for s in args.seeds]))
    for k in sorted(args.ks, reverse=True):
        if k != kmax:
            table.append(row(f"DPO K={k}", [f"dpo_k{k}_s{s0}"]))
    if not args.no_rf_nll:
        table.append(row(f"RF-NLL K={kmax}", [f"rf_nll_k{kmax}_s{s0}"]))
    for t in (0.7, 0.5):
        table.append(row(f"next-token T={t}", [f"next_token_s{s0}_T{t}"]))
    table.append(row("next-token greedy", [f"next_token_s{s0}_greedy"]))
    table.append(row("base greedy", ["base_greedy"]))
    table.append(row(f"DPO K={kmax} greedy", [f"dpo_k{kmax}_s{s0}_greedy"]))
    by_k = {k: results[f"dpo_k{k}_s{s0}"]["vs_next_token"]["win_rate"] for k in args.ks}
    trained = [n for n in results if n.startswith(("dpo_k", "rf_nll_k"))]
    sharpening = sharpening_control(results, s0, trained)

    # ---- selection (Figure 8) from the DPO runs' per-step counts
    sel_runs = {f"dpo_k{k}": selection_rows(Path(runs[(f"dpo_k{k}", s0)]["log_dir"])) for k in args.ks}
    ks_of = {f"dpo_k{k}": k for k in args.ks}
    window = max(5, args.steps // 10)
    selection = {}
    for arm, rows in sel_runs.items():
        q = max(1, len(rows) // 5)
        selection[arm] = {
            "early_steps": [rows[0]["step"], rows[q - 1]["step"]],
            "late_steps": [rows[-q]["step"], rows[-1]["step"]],
            **{
                f"{s}_{w}": pooled(part, s)
                for s in ("rollout", "suffix")
                for w, part in (("early", rows[:q]), ("late", rows[-q:]))
            },
            "chance_rollout_if_all_tied": ks_of[arm] / (ks_of[arm] + 1),
            "ties_best_share": sum(r["ties_best"] for r in rows) / max(1, sum(r["pairs"] for r in rows)),
            "skipped_share": sum(r["skipped"] for r in rows) / max(1, sum(r["prefixes"] for r in rows)),
        }
    for seed in args.seeds[1:]:
        rows = selection_rows(Path(runs[(f"dpo_k{kmax}", seed)]["log_dir"]))
        q = max(1, len(rows) // 5)
        selection[f"dpo_k{kmax}_s{seed}"] = {
            f"suffix_{w}": pooled(part, "suffix") for w, part in (("early", rows[:q]), ("late", rows[-q:]))
        }

    offline = {
        name: r[f"offline_selection_k{args.samples}"]
        for name, r in results.items()
        if f"offline_selection_k{args.samples}" in r
    }
    summary = {
        "what": "tiny-world Self-Improving Pretraining: every arm from builtin:tiny-sip-policy, same steps and batches",
        "settings": {
            "steps": args.steps,
            "budget": "same optimizer steps over the same prefix-suffix batches (data seed = run seed); "
            "every arm sees the same prefixes; next-token learns from the 40 suffix tokens of 8 prefixes a step, "
            "DPO / RF-NLL from 1 chosen (+1 rejected) candidate of 40 tokens per prefix",
            "seeds": args.seeds,
            "samples": args.samples,
            "main_arms_seeds": f"next_token and dpo_k{kmax}: {args.seeds}; others: seed {s0} only",
            "eval": f"{args.num_prefixes} heldout_prefixes (seed-1 documents, never trained on), "
            f"{args.samples} samples each at the listed temperature (greedy: 1), {args.max_new_tokens} new tokens, "
            f"generator seed {args.eval_seed} for every policy; prompts without BOS like the training prefixes",
            "win_rate": "KBQualityJudge pairwise (coherence, then factuality; it does not see safety), sample i of a "
            "policy vs sample i of next_token of the same seed on the same prefix; ties 0.5. combined_win_vs_next_token: "
            "higher training-judge total (quality verdict + factuality + safety), ties 0.5",
            "threads": "OMP_NUM_THREADS=1 nice -n 5, one training at a time, on 2 CPU cores shared with another worker",
        },
        "table": table,
        "by_k": by_k,
        "sharpening_control": sharpening,
        "paper_win_rate_by_k": PAPER_WIN_RATE_BY_K,
        "selection": selection,
        "selection_window": window,
        f"offline_selection_k{args.samples}": offline,
        "runs": {f"{a}_s{s}": r for (a, s), r in runs.items()},
        "results": results,
        "train_seconds_this_invocation": train_seconds,
        "train_wall_seconds_sum": sum(r.get("wall_seconds", 0.0) for r in runs.values()),
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "command": "python experiments/sip_tiny_comparison.py " + " ".join(argv),
    }
    for path in (args.json, args.plot, args.selection_plot):
        (REPO / path).parent.mkdir(parents=True, exist_ok=True)
    (REPO / args.json).write_text(json.dumps(summary, indent=1, default=float) + "\n")
    plot_comparison(summary, REPO / args.plot)
    plot_selection(summary, REPO / args.selection_plot)
    print_table(table)
    print(json.dumps({"selection": selection, "offline": offline}, indent=1))
    print(
        f"train {summary['train_wall_seconds_sum']:.0f} s (all arms; {train_seconds:.0f} s this invocation), "
        f"eval {eval_seconds:.0f} s, total this invocation {summary['total_seconds']:.0f} s"
    )


def print_table(table: list[dict]) -> None:
    def f(v, sd=None):
        if v is None:
            return "-"
        return f"{v:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    print(
        "| policy | T | factuality | fact acc. | safety | win vs next-token | win vs suffix | entropy | train wall (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        wall = f"{r['train_wall_seconds']:.0f}" if r.get("train_wall_seconds") else "-"
        print(
            f"| {r['name']} | {r['temperature']} | {f(r['factuality'], r['factuality_sd'])} | "
            f"{f(r['fact_accuracy'], r['fact_accuracy_sd'])} | {f(r['safety'], r['safety_sd'])} | "
            f"{f(r['win_vs_next_token'], r.get('win_vs_next_token_sd'))} | {f(r['win_vs_suffix'], r['win_vs_suffix_sd'])} | "
            f"{f(r['sampling_entropy'])} | {wall} |"
        )


if __name__ == "__main__":
    main()
