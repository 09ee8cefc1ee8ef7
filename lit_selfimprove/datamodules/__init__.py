"""DataModules: problem sets (MATH, HARP, OlympiadBench, jsonl, hub) and the tiny arithmetic world."""

from lit_selfimprove.datamodules.arithmetic import ArithmeticPretrainDataModule, ArithmeticProblemDataModule
from lit_selfimprove.datamodules.problems import (
    PROBLEM_FORMATS,
    ProblemDataModule,
    ProblemDataset,
    collate_problems,
    load_problems,
    split_problems,
)

__all__ = [
    "PROBLEM_FORMATS",
    "ArithmeticPretrainDataModule",
    "ArithmeticProblemDataModule",
    "ProblemDataModule",
    "ProblemDataset",
    "collate_problems",
    "load_problems",
    "split_problems",
]
