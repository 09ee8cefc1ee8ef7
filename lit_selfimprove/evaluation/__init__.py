"""Evaluation of trained policies on standard benchmarks (lm-evaluation-harness).

* :mod:`~lit_selfimprove.evaluation.lm_eval_adapter`: lm-eval on a model in memory (tasks, scores).
* :mod:`~lit_selfimprove.evaluation.checkpoint`: the model to evaluate, read from a folder, hub id,
  ``builtin:NAME`` or Lightning checkpoint.
* :mod:`~lit_selfimprove.evaluation.lm_eval_cli`: the ``lm-eval`` command.
* ``tasks/``: task YAML builders of this project (e.g. MATH-500 as multiple choice).
"""

from lit_selfimprove.evaluation.checkpoint import load_eval_model
from lit_selfimprove.evaluation.lm_eval_adapter import PAPER_TASKS, LMEvalError, evaluate_model
from lit_selfimprove.evaluation.lm_eval_cli import evaluate_path

__all__ = ["PAPER_TASKS", "LMEvalError", "evaluate_model", "evaluate_path", "load_eval_model"]
