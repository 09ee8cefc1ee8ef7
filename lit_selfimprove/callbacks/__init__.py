"""Callbacks: metric plots, SOAR's promotion rule (PQ writer)."""

from lit_selfimprove.callbacks.metrics_plot import MetricsPlot, plot_series, read_metrics_csv
from lit_selfimprove.callbacks.promotion import Promotion

__all__ = ["MetricsPlot", "Promotion", "plot_series", "read_metrics_csv"]
