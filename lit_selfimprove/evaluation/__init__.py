"""Evaluation of trained policies on standard benchmarks (lm-evaluation-harness), one module per file."""

from lit_selfimprove.evaluation.lm_eval import (
    PAPER_TASKS,
    LMEvalError,
    evaluate_model,
    evaluate_path,
    load_eval_model,
)

__all__ = ["PAPER_TASKS", "LMEvalError", "evaluate_model", "evaluate_path", "load_eval_model"]
