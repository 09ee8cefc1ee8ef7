"""Callbacks: metric plots, SOAR's promotion rule (PQ writer), SIP's selection statistics, the run
directory (lock, run id, resumed history), a progress bar in optimizer steps and standard-benchmark
evaluation (lm-eval) at validation time, and the trained model as a Hugging Face folder."""

from lit_selfimprove.callbacks.lm_eval import LMEval
from lit_selfimprove.callbacks.metrics_plot import MetricsPlot, plot_series, read_metrics_csv
from lit_selfimprove.callbacks.progress import StepProgressBar
from lit_selfimprove.callbacks.promotion import Promotion
from lit_selfimprove.callbacks.run_directory import RunDirectory, RunDirectoryInUse, RunDirectoryNotFresh
from lit_selfimprove.callbacks.save_hf_model import SaveHFModel
from lit_selfimprove.callbacks.selection_stats import SelectionStats

__all__ = [
    "LMEval",
    "MetricsPlot",
    "Promotion",
    "RunDirectory",
    "RunDirectoryInUse",
    "RunDirectoryNotFresh",
    "SaveHFModel",
    "SelectionStats",
    "StepProgressBar",
    "plot_series",
    "read_metrics_csv",
]
