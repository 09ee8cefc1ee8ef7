"""Callbacks: metric plots, SOAR's promotion rule (PQ writer), SIP's selection statistics."""

from lit_selfimprove.callbacks.metrics_plot import MetricsPlot, plot_series, read_metrics_csv
from lit_selfimprove.callbacks.promotion import Promotion
from lit_selfimprove.callbacks.selection_stats import SelectionStats

__all__ = ["MetricsPlot", "Promotion", "SelectionStats", "plot_series", "read_metrics_csv"]
