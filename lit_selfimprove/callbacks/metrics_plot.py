"""MetricsPlot: a PNG of chosen metrics in the run's log dir, refreshed during training."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a Lightning CSVLogger ``metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    series.setdefault(key, []).append((step, float(value)))
                except ValueError:
                    continue
    return series


def plot_series(
    series: dict[str, list[tuple[int, float]]],
    metrics: Sequence[str],
    out: str | Path,
    title: str = "",
    events: Sequence[str] = (),
) -> Path | None:
    """One panel per metric (patterns ending in ``*`` match prefixes); returns the PNG path.

    ``events``: metrics whose non-zero values mark an event (e.g. ``promotion/event``): a dashed
    vertical line at each such step on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for m in metrics:
        names += (
            sorted(k for k in series if k.startswith(m[:-1]))
            if m.endswith("*")
            else [m]
            if m in series
            else []
        )
    if not names:
        return None
    marks = {e: [s for s, v in series.get(e, []) if v] for e in events}
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*series[name])
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3)
        for color, (event, at) in zip(("tab:red", "tab:purple", "tab:green"), marks.items()):
            for i, step in enumerate(at):
                ax.axvline(step, color=color, ls="--", lw=1, alpha=0.7, label=event if i == 0 else None)
        if any(marks.values()):
            ax.legend(fontsize=7, loc="best")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class MetricsPlot(Callback):
    """Write ``filename`` (a grid of metric curves) into the log dir after every validation,
    every ``every_n_steps`` training steps and at the end of training. Needs a logger that
    writes ``metrics.csv`` (CSVLogger).

    Args:
        metrics: metric names to plot; a trailing ``*`` matches a prefix (``val/pass@*``).
        filename: PNG file name inside ``trainer.log_dir``.
        every_n_steps: also refresh after every N training steps (0: only at validation / end).
        events: metrics whose non-zero values are marked by vertical lines on every panel
            (SOAR: ``promotion/event``).
    """

    def __init__(
        self,
        metrics: Sequence[str] = (
            "train/reward",
            "train/accuracy",
            "train/zero_std_frac",
            "val/accuracy",
            "val/pass@*",
        ),
        filename: str = "curves.png",
        every_n_steps: int = 0,
        events: Sequence[str] = (),
    ):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.metrics, self.filename = list(metrics), filename
        self.every_n_steps, self.events = every_n_steps, list(events)

    def _refresh(self, trainer: Trainer) -> Path | None:
        if trainer.logger is None:
            return None
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if log_dir is None or not trainer.is_global_zero:
            return None
        trainer.logger.save()
        path = Path(log_dir) / "metrics.csv"
        if path.exists():
            return plot_series(
                read_metrics_csv(path), self.metrics, Path(log_dir) / self.filename, events=self.events
            )
        return None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._refresh(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._refresh(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        png = self._refresh(trainer)
        if png is not None:
            rank_zero_info(f"run outputs in {trainer.log_dir}: metrics.csv, {png.name}, config.yaml")
