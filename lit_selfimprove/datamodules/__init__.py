"""DataModules: problem sets (MATH, HARP, OlympiadBench, jsonl, hub), prefix-suffix document
streams (SlimPajama, RedPajama, local files) and the tiny worlds."""

from lit_selfimprove.datamodules.arithmetic import ArithmeticPretrainDataModule, ArithmeticProblemDataModule
from lit_selfimprove.datamodules.facts_world import FactsPretrainDataModule
from lit_selfimprove.datamodules.judge_examples import JudgeExamplesDataModule
from lit_selfimprove.datamodules.prefix_suffix import (
    DEFAULT_SPLITS,
    PrefixSuffixDataModule,
    PrefixSuffixDataset,
    assign_split,
    collate_prefix_suffix,
)
from lit_selfimprove.datamodules.problem_sources import PROBLEM_FORMATS, load_problems, split_problems
from lit_selfimprove.datamodules.problems import ProblemDataModule, ProblemDataset, collate_problems
from lit_selfimprove.datamodules.rewrite_examples import RewriterExamplesDataModule
from lit_selfimprove.worlds.facts import (
    KnowledgeBase,
    continuation_stats,
    generate_documents,
    heldout_prefixes,
    load_corpus,
)

__all__ = [
    "DEFAULT_SPLITS",
    "FactsPretrainDataModule",
    "JudgeExamplesDataModule",
    "KnowledgeBase",
    "continuation_stats",
    "generate_documents",
    "heldout_prefixes",
    "load_corpus",
    "PROBLEM_FORMATS",
    "PrefixSuffixDataModule",
    "PrefixSuffixDataset",
    "assign_split",
    "collate_prefix_suffix",
    "ArithmeticPretrainDataModule",
    "ArithmeticProblemDataModule",
    "ProblemDataModule",
    "RewriterExamplesDataModule",
    "ProblemDataset",
    "collate_problems",
    "load_problems",
    "split_problems",
]
