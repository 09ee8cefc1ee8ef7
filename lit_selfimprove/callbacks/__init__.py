"""Callbacks: metric plots (more to come: promotion / PQ writer, selection statistics)."""

from lit_selfimprove.callbacks.metrics_plot import MetricsPlot, plot_series, read_metrics_csv

__all__ = ["MetricsPlot", "plot_series", "read_metrics_csv"]
