"""MetricsPlot / plot_series: panels per metric, event markers (SOAR's promotions), refresh cadence."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_selfimprove.callbacks import MetricsPlot, plot_series, read_metrics_csv


def test_events_are_marked_on_every_panel(tmp_path, monkeypatch):
    import matplotlib.axes

    lines = []
    original = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(
        matplotlib.axes.Axes, "axvline", lambda ax, x, **kw: lines.append(x) or original(ax, x, **kw)
    )
    series = {
        "teacher/reward_mean": [(s, 0.1 * s) for s in range(6)],
        "baseline/accuracy": [(s, 0.0) for s in range(6)],
        "promotion/event": [(s, float(s in (2, 4))) for s in range(6)],
    }
    out = plot_series(
        series, ["teacher/reward_mean", "baseline/accuracy"], tmp_path / "p.png", events=["promotion/event"]
    )
    assert out.exists() and out.stat().st_size > 1000
    assert sorted(lines) == [2, 2, 4, 4]  # two promotions x two panels
    assert plot_series(series, ["missing/metric"], tmp_path / "none.png") is None


class Logs(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self.log("m/value", float(self.global_step))
        self.log("m/event", float(self.global_step == 3))
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(16, 1), batch_size=1)


def test_refreshes_every_n_steps_during_training(tmp_path, monkeypatch):
    calls = []
    import lit_selfimprove.callbacks.metrics_plot as mp

    original = mp.plot_series
    monkeypatch.setattr(mp, "plot_series", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    plot = MetricsPlot(metrics=["m/value"], every_n_steps=2, events=["m/event"])
    trainer = L.Trainer(
        max_steps=6, logger=CSVLogger(tmp_path), callbacks=[plot], log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Logs())
    assert len(calls) == 3 + 1  # steps 2, 4, 6 and train end
    assert all(kw["events"] == ["m/event"] for kw in calls)
    series = read_metrics_csv(next(tmp_path.rglob("metrics.csv")))
    assert [s for s, v in series["m/event"] if v] == [3]
    assert (tmp_path / "lightning_logs" / "version_0" / "curves.png").exists()
    with pytest.raises(ValueError, match="every_n_steps"):
        MetricsPlot(every_n_steps=-1)
