"""Local lm-eval tasks built from data the project has (no download): a builder writes the task's
data (jsonl) and its YAML into a folder that ``python -m lit_selfimprove lm-eval --include-path`` reads.

* :mod:`~lit_selfimprove.evaluation.tasks.math500_mc`: ``math500_mc``, MATH-500 as 4-way multiple
  choice (the right answer vs 3 other problems' answers), scored by log-likelihood.
"""
