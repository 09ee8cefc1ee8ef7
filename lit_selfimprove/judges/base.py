"""The small protocols every judge and rewriter implements.

Self-Improving Pretraining scores candidate continuations of a prefix. Three kinds of
component are injected (``class_path:`` in YAML):

* a :class:`PointwiseJudge` scores one continuation (optionally against a reference, the
  original suffix): factuality (1 / 0.5 / 0) and safety (1 = safe, 0 = unsafe) are pointwise;
* a :class:`PairwiseJudge` says which of two continuations is better (quality);
* a :class:`Rewriter` returns a new suffix for (prefix, suffix).

A :class:`CandidateJudge` turns those into one score per candidate, which is what
``SuffixPolicyDPO`` consumes (``lit_selfimprove.judges.CombinedJudge`` is the configurable one).

Verdicts that cannot be parsed are ``None``, never a guessed number: callers count them and
leave them out of averages. A judge may also expose ``last_unparseable`` (the last raw reply it
could not parse, ``None`` before any) and ``expected_format`` (what a parseable reply looks
like): ``SuffixPolicyDPO`` quotes both when it warns about, or stops on, unusable verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class PointwiseJudge(Protocol):
    def score(
        self,
        prefixes: Sequence[str],
        continuations: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> list[float | None]:
        """One score per (prefix, continuation[, reference]); ``None`` = unparseable verdict."""
        ...


@runtime_checkable
class PairwiseJudge(Protocol):
    def compare(
        self,
        prefixes: Sequence[str],
        firsts: Sequence[str],
        seconds: Sequence[str],
    ) -> list[float | None]:
        """Per pair: ``1.0`` first is better, ``0.0`` second is better, ``0.5`` a tie (rule-based
        judges may say so; LLM verdicts are 1 or 2), ``None`` unparseable."""
        ...


@runtime_checkable
class Rewriter(Protocol):
    def rewrite(self, prefixes: Sequence[str], suffixes: Sequence[str]) -> list[str]:
        """A rewritten suffix per (prefix, suffix): facts fixed, unsafe text made safe, else a copy."""
        ...


@dataclass
class CandidateScores:
    """Scores of ``C`` candidates for each of ``B`` prefixes.

    ``total``: ``[B, C]`` float tensor, the combined score used to pick chosen / rejected
    (``nan`` where no verdict could be obtained for that candidate). ``components``: the same
    shape per judgment (``quality``, ``factuality``, ``safety``). ``stats``: counters such as
    ``unparseable`` and ``calls`` (plain numbers, for logging).
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class CandidateJudge(Protocol):
    def score_candidates(
        self,
        prefixes: Sequence[str],
        candidates: Sequence[Sequence[str]],
        references: Sequence[str] | None = None,
    ) -> CandidateScores:
        """Score ``candidates[b]`` (all of the same length C) for ``prefixes[b]``."""
        ...
