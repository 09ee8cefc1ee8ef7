"""Callbacks: metric plots, SOAR's promotion rule (PQ writer), SIP's selection statistics, the run
directory (lock, run id, resumed history) and a progress bar in optimizer steps."""

from lit_selfimprove.callbacks.metrics_plot import MetricsPlot, plot_series, read_metrics_csv
from lit_selfimprove.callbacks.progress import StepProgressBar
from lit_selfimprove.callbacks.promotion import Promotion
from lit_selfimprove.callbacks.run_directory import RunDirectory, RunDirectoryInUse
from lit_selfimprove.callbacks.selection_stats import SelectionStats

__all__ = [
    "MetricsPlot",
    "Promotion",
    "RunDirectory",
    "RunDirectoryInUse",
    "SelectionStats",
    "StepProgressBar",
    "plot_series",
    "read_metrics_csv",
]
