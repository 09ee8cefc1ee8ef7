"""SelectionStats: where Self-Improving Pretraining's chosen candidates come from (Figure 8).

Early in training the judge prefers the original (or rewritten) suffix; as the policy improves
its own rollouts win more and more. This callback keeps the per-step counts that
:class:`~lit_selfimprove.modules.SuffixPolicyDPO` publishes in ``last_selection`` (summed over
ranks), logs moving-average rates, and writes into the log dir:

* ``selection.png``: the share of non-skipped prefixes whose chosen candidate is a rollout /
  the suffix / the rewrite, per step (faint) and as a moving average (bold);
* ``selection.csv``: the raw per-step counts (``step, prefixes, pairs, skipped, ties_best,
  ties_worst, chosen_<source>, rejected_<source>``, and who held the best score before the
  tie-break: ``best_rollout_only, best_tied, best_corpus_only``; see
  :func:`~lit_selfimprove.loops.sip.best_classes`).

The chosen source of a prefix whose best score is shared is drawn uniformly among the best
candidates (:func:`~lit_selfimprove.rl.selection.select_pairs`), so with ties the chosen shares
partly count coin flips: the ``best_*`` columns separate a rollout strictly best from a tie.

Both are refreshed every ``every_n_steps`` steps and at the end of training (global rank 0).
The counts are in the checkpoint, so a resumed run continues the same curves.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer

from lit_selfimprove.loops.sip import BEST_CLASSES

SOURCES = ("rollout", "suffix", "rewrite")
COLUMNS = (
    ["step", "prefixes", "pairs", "skipped", "ties_best", "ties_worst"]
    + [f"{kind}_{s}" for s in SOURCES for kind in ("chosen", "rejected")]
    + list(BEST_CLASSES)
)
COLORS = {"rollout": "tab:blue", "suffix": "tab:orange", "rewrite": "tab:green"}


class SelectionStats(Callback):
    """Chosen-source counts per step -> running rates, ``selection.png`` and ``selection.csv``.

    Args:
        every_n_steps: refresh the plot and csv every N training steps (0: only at the end).
        window: steps in the moving average (rates pool the counts of the window, so steps
            where every prefix was skipped weigh nothing).
        filename: PNG file name in the output folder.
        csv_filename: CSV file name in the output folder.
        dirpath: output folder (default: ``trainer.log_dir``, else ``trainer.default_root_dir``).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        window: int = 20,
        filename: str = "selection.png",
        csv_filename: str = "selection.csv",
        dirpath: str | None = None,
    ):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.every_n_steps = every_n_steps
        self.window = window
        self.filename = filename
        self.csv_filename = csv_filename
        self.dirpath = dirpath
        self.rows: list[dict[str, float]] = []
        self.sources: list[str] = []

    # --------------------------------------------------------------------------- counts
    def add(self, selection: dict[str, float]) -> bool:
        """Record one step's counts (a repeat of the last recorded step is ignored)."""
        row = {c: float(selection.get(c, 0.0)) for c in COLUMNS}
        if self.rows and self.rows[-1]["step"] >= row["step"]:
            return False
        self.rows.append(row)
        return True

    def rates(self, kind: str = "chosen", window: int | None = None) -> dict[str, float]:
        """Share of non-skipped prefixes per source, pooled over the last ``window`` steps
        (default: the callback's window; 0: every step so far); ``{}`` before any pair."""
        window = self.window if window is None else window
        rows = self.rows[-window:] if window else self.rows
        pairs = sum(r["pairs"] for r in rows)
        if pairs == 0:
            return {}
        return {s: sum(r[f"{kind}_{s}"] for r in rows) / pairs for s in self._plotted_sources()}

    def _plotted_sources(self) -> list[str]:
        if self.sources:
            return list(self.sources)
        return [s for s in SOURCES if any(r[f"chosen_{s}"] or r[f"rejected_{s}"] for r in self.rows)]

    # ------------------------------------------------------------------------- hooks
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        selection = getattr(pl_module, "last_selection", None)
        if not selection or not self.add(selection):
            return
        if not self.sources and hasattr(pl_module, "sources"):
            self.sources = list(dict.fromkeys(pl_module.sources))
        for kind in ("chosen", "rejected"):
            for s, rate in self.rates(kind).items():
                pl_module.log(f"select/{kind}_{s}_avg", rate, batch_size=1)
        overall = self.rates("chosen", window=0)
        if "rollout" in overall:
            pl_module.log("select/chosen_rollout_overall", overall["rollout"], batch_size=1)
        if self.every_n_steps and len(self.rows) % self.every_n_steps == 0:
            self.refresh(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.refresh(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "sources": list(self.sources)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]
        self.sources = list(state_dict.get("sources", []))

    # ------------------------------------------------------------------------- output
    def _outdir(self, trainer: Trainer) -> Path:
        return Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)

    def refresh(self, trainer: Trainer) -> tuple[Path, Path] | None:
        """Write the csv and the plot (global rank 0 only); returns their paths."""
        if not trainer.is_global_zero or not self.rows:
            return None
        out = self._outdir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        return self.write_csv(out / self.csv_filename), self.plot(out / self.filename)

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: int(v) if float(v).is_integer() else v for k, v in r.items()})
        return path

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.rows]
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for s in self._plotted_sources():
            raw = [r[f"chosen_{s}"] / r["pairs"] if r["pairs"] else float("nan") for r in self.rows]
            avg = []
            for i in range(len(self.rows)):
                win = self.rows[max(0, i + 1 - self.window) : i + 1]
                pairs = sum(r["pairs"] for r in win)
                avg.append(sum(r[f"chosen_{s}"] for r in win) / pairs if pairs else float("nan"))
            color = COLORS.get(s)
            ax.plot(steps, raw, color=color, alpha=0.25, lw=0.8)
            ax.plot(steps, avg, color=color, lw=2.0, label=f"{s} ({self.window}-step avg)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel("share of chosen candidates")
        ax.set_title("Chosen candidate source (non-skipped prefixes)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
