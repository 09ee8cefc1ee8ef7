"""One score per candidate continuation from quality, factuality and safety judges.

:class:`CombinedJudge` is the configurable :class:`CandidateJudge` of Self-Improving Pretraining:

* quality (a :class:`PairwiseJudge`): ``all_pairs`` compares every pair ``i < j`` of a prefix's
  candidates once (both orders if the pairwise judge does that itself); a candidate's score is
  its mean win rate over its parseable comparisons (a tie counts 0.5). ``pivot`` compares each
  candidate with one pivot only, by default the original suffix (the reference): the paper's
  "K comparisons" instead of ``C(C-1)/2``, which it finds clearly worse. The score is the
  verdict against the pivot; the pivot's own score (and that of a candidate identical to the
  reference) is 0.5. Each pair is shown in a random order (seeded), so that a judge's position
  bias does not favour one side;
* factuality (a :class:`PointwiseJudge`) against the reference, the original suffix;
* safety (a :class:`PointwiseJudge`).

``total = sum(weight * component)`` over the used components (weight != 0); it is ``nan``
where one of them has no verdict, so that callers can skip or mask that candidate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from lit_selfimprove.judges.base import CandidateScores, PairwiseJudge, PointwiseJudge

__all__ = ["COMPONENTS", "CombinedJudge"]

COMPONENTS = ("quality", "factuality", "safety")
_NAN = float("nan")
REF = -1  # a comparison's side that is the reference (pivot mode), not a candidate


def _verdict(value: float | None) -> float:
    """A judge's verdict as a float (``nan`` for ``None`` / nan)."""
    if value is None:
        return _NAN
    value = float(value)
    return _NAN if math.isnan(value) else value


class CombinedJudge:
    """Scores ``C`` candidates per prefix with up to three judges and a weighted sum.

    Args:
        quality: pairwise quality judge (``None``: not used).
        quality_mode: ``all_pairs`` (the paper's) or ``pivot``.
        factuality: pointwise factuality judge (needs ``references``; ``None``: not used).
        safety: pointwise safety judge (``None``: not used).
        weights: weight per component (``quality``, ``factuality``, ``safety``); 1.0 for those
            not given. A component with weight 0 is still scored and reported, not summed.
        pivot: the pivot of ``pivot`` mode: ``reference`` (default: the original suffix passed as
            ``references``; candidates equal to it score 0.5 without a comparison), or a
            candidate: ``first``, ``last``, ``random`` (drawn per prefix) or an index (negative
            from the end).
        random_order: swap which text of a pair is shown first with probability 1/2 (default;
            against the judge's position bias; ``all_pairs`` and ``pivot`` modes alike).
            ``False``: the lower candidate index (the candidate, not the reference) goes first.
        seed: seed of the pivot / order draws: one stream per judge, continued over calls, so a
            run repeats exactly for a fixed seed (it restarts with the process, e.g. on resume).

    After a call with unparseable verdicts, ``last_unparseable`` is the last such raw reply of
    the component judge (if it keeps one) and ``expected_format`` names that component and what
    it expects (see :class:`~lit_selfimprove.judges.LLMPairwiseJudge`).
    """

    def __init__(
        self,
        quality: PairwiseJudge | None = None,
        quality_mode: str = "all_pairs",
        factuality: PointwiseJudge | None = None,
        safety: PointwiseJudge | None = None,
        weights: dict[str, float] | None = None,
        pivot: int | str = "reference",
        random_order: bool = True,
        seed: int = 0,
    ):
        if quality is None and factuality is None and safety is None:
            raise ValueError("CombinedJudge needs at least one of quality, factuality, safety")
        if quality_mode not in ("all_pairs", "pivot"):
            raise ValueError(f"quality_mode must be 'all_pairs' or 'pivot', got {quality_mode!r}")
        if not isinstance(pivot, int) and pivot not in ("reference", "first", "last", "random"):
            raise ValueError(
                f"pivot must be 'reference', 'first', 'last', 'random' or an index, got {pivot!r}"
            )
        unknown = sorted(set(weights or {}) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown weight(s) {unknown}; components are {list(COMPONENTS)}")
        self.quality = quality
        self.quality_mode = quality_mode
        self.factuality = factuality
        self.safety = safety
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in COMPONENTS}
        self.pivot = pivot
        self.random_order = random_order
        # salted: a pairwise judge with the same seed draws a different stream (no cancelling swaps)
        self._rng = random.Random(f"{type(self).__name__}/{seed}")
        self.last_unparseable: str | None = None
        self.expected_format: str | None = None

    @property
    def components(self) -> list[str]:
        """The components in use, in order."""
        judges = {"quality": self.quality, "factuality": self.factuality, "safety": self.safety}
        return [name for name in COMPONENTS if judges[name] is not None]

    def _validate(
        self,
        prefixes: Sequence[str],
        candidates: Sequence[Sequence[str]],
        references: Sequence[str] | None,
    ) -> tuple[int, int]:
        if isinstance(prefixes, str) or isinstance(candidates, str):
            raise TypeError("prefixes and candidates must be sequences, not a single string")
        batch = len(prefixes)
        if batch == 0:
            raise ValueError("score_candidates needs at least one prefix")
        if len(candidates) != batch:
            raise ValueError(f"got {batch} prefixes but {len(candidates)} candidate lists")
        for b, cands in enumerate(candidates):
            if isinstance(cands, str):
                raise TypeError(f"candidates[{b}] is a string; expected a list of candidate strings")
        sizes = sorted({len(c) for c in candidates})
        if len(sizes) != 1:
            raise ValueError(f"every prefix needs the same number of candidates, got sizes {sizes}")
        if sizes[0] < 2:
            raise ValueError(f"need at least 2 candidates per prefix, got {sizes[0]}")
        pivot_ref = self.quality is not None and self.quality_mode == "pivot" and self.pivot == "reference"
        quality_refs = getattr(self.quality, "uses_references", False)
        if self.factuality is not None or pivot_ref or quality_refs:
            if references is None:
                need = (
                    "the factuality judge"
                    if self.factuality is not None
                    else "pivot='reference'"
                    if pivot_ref
                    else f"the quality judge ({type(self.quality).__name__})"
                )
                raise ValueError(f"{need} needs references (the original suffixes)")
            if len(references) != batch:
                raise ValueError(f"got {batch} prefixes but {len(references)} references")
        return batch, sizes[0]

    def _check_len(self, name: str, verdicts: Sequence, expected: int) -> None:
        if len(verdicts) != expected:
            raise RuntimeError(f"the {name} judge returned {len(verdicts)} verdicts for {expected} items")

    def _note_unparseable(self, name: str, judge) -> None:
        """Keep the component's last unparseable reply and its expected format (for error messages)."""
        self.last_unparseable = getattr(judge, "last_unparseable", None)
        fmt = getattr(judge, "expected_format", None) or "(not stated by the judge)"
        self.expected_format = f"{name} judge ({type(judge).__name__}): {fmt}"

    def _pairs(
        self, candidates: Sequence[Sequence[str]], references: Sequence[str] | None, batch: int, num: int
    ) -> tuple[list[tuple[int, int, int]], list[list[int]]]:
        """``(b, i, j)`` comparisons (``i`` shown first; ``REF`` = the reference) and, in pivot mode,
        the candidates of each prefix that score 0.5 as (or as equal to) the pivot."""
        pairs: list[tuple[int, int, int]] = []
        pivots: list[list[int]] = []
        for b in range(batch):
            if self.quality_mode == "all_pairs":
                pairs += [(b, i, j) for i in range(num) for j in range(i + 1, num)]
                continue
            if self.pivot == "reference":
                same = [c for c in range(num) if candidates[b][c] == references[b]]
                pivots.append(same)
                pairs += [(b, c, REF) for c in range(num) if c not in same]
                continue
            if isinstance(self.pivot, int):
                if not -num <= self.pivot < num:
                    raise ValueError(f"pivot index {self.pivot} is out of range for {num} candidates")
                pivot = self.pivot % num
            else:
                pivot = {"first": 0, "last": num - 1}.get(self.pivot)
                pivot = self._rng.randrange(num) if pivot is None else pivot
            pivots.append([pivot])
            pairs += [(b, c, pivot) for c in range(num) if c != pivot]
        if self.random_order:
            pairs = [(b, j, i) if self._rng.random() < 0.5 else (b, i, j) for b, i, j in pairs]
        return pairs, pivots

    def _quality(
        self,
        prefixes: Sequence[str],
        candidates: Sequence[Sequence[str]],
        references: Sequence[str] | None,
        batch: int,
        num: int,
    ) -> tuple[torch.Tensor, int, int]:
        """``[B, C]`` win rates, the number of comparisons and of unparseable ones."""
        pairs, pivots = self._pairs(candidates, references, batch, num)
        text = lambda b, i: references[b] if i == REF else candidates[b][i]  # noqa: E731
        extra = {}
        if getattr(self.quality, "uses_references", False):  # e.g. MathVerifierJudge: the document's answer
            extra["references"] = [references[b] for b, _, _ in pairs]
        verdicts = self.quality.compare(
            [prefixes[b] for b, _, _ in pairs],
            [text(b, i) for b, i, _ in pairs],
            [text(b, j) for b, _, j in pairs],
            **extra,
        )
        self._check_len("quality", verdicts, len(pairs))
        # column ``num`` collects the reference's verdicts (pivot mode), then is dropped
        wins = torch.zeros(batch, num + 1, dtype=torch.float64)
        counts = torch.zeros(batch, num + 1, dtype=torch.float64)
        unparseable = 0
        for (b, i, j), raw in zip(pairs, verdicts):
            v = _verdict(raw)
            if math.isnan(v):
                unparseable += 1
                continue
            wins[b, i] += v
            wins[b, j] += 1.0 - v
            counts[b, i] += 1
            counts[b, j] += 1
        rates = torch.where(counts > 0, wins / counts.clamp(min=1), torch.full_like(wins, _NAN))
        # pivot mode: a candidate's score is its one verdict against the pivot; the pivot (and a
        # candidate identical to the reference) scores 0.5, nan when no comparison of its prefix
        # could be parsed (it must not be the one scored candidate of a judge that fails)
        for b, same in enumerate(pivots):
            rates[b, same] = 0.5 if counts[b].sum() > 0 else _NAN
        return rates[:, :num].float(), len(pairs), unparseable

    def _pointwise(
        self,
        name: str,
        judge: PointwiseJudge,
        prefixes: Sequence[str],
        candidates: Sequence[Sequence[str]],
        references: Sequence[str] | None,
        batch: int,
        num: int,
    ) -> tuple[torch.Tensor, int, int]:
        flat_prefixes = [prefixes[b] for b in range(batch) for _ in range(num)]
        flat = [c for cands in candidates for c in cands]
        refs = None if references is None else [references[b] for b in range(batch) for _ in range(num)]
        verdicts = judge.score(flat_prefixes, flat, refs)
        self._check_len(name, verdicts, len(flat))
        scores = torch.tensor([_verdict(v) for v in verdicts], dtype=torch.float32).view(batch, num)
        return scores, len(flat), int(scores.isnan().sum())

    def score_candidates(
        self,
        prefixes: Sequence[str],
        candidates: Sequence[Sequence[str]],
        references: Sequence[str] | None = None,
    ) -> CandidateScores:
        """Score ``candidates[b]`` for ``prefixes[b]``: ``total`` and each component, ``[B, C]``."""
        batch, num = self._validate(prefixes, candidates, references)
        components: dict[str, torch.Tensor] = {}
        stats: dict[str, float] = {}
        if self.quality is not None:
            components["quality"], calls, bad = self._quality(prefixes, candidates, references, batch, num)
            stats["quality_calls"], stats["quality_unparseable"] = calls, bad
        if self.factuality is not None:
            components["factuality"], calls, bad = self._pointwise(
                "factuality", self.factuality, prefixes, candidates, references, batch, num
            )
            stats["factuality_calls"], stats["factuality_unparseable"] = calls, bad
        if self.safety is not None:
            components["safety"], calls, bad = self._pointwise(
                "safety", self.safety, prefixes, candidates, None, batch, num
            )
            stats["safety_calls"], stats["safety_unparseable"] = calls, bad
        for name in components:
            if stats[f"{name}_unparseable"]:
                self._note_unparseable(name, getattr(self, name))
        total = torch.zeros(batch, num, dtype=torch.float32)
        for name, scores in components.items():
            if self.weights[name] != 0:
                total = total + self.weights[name] * scores
        stats["calls"] = sum(stats[f"{n}_calls"] for n in components)
        stats["unparseable"] = sum(stats[f"{n}_unparseable"] for n in components)
        stats["nan_candidates"] = int(total.isnan().sum())
        return CandidateScores(
            total=total, components=components, stats={k: float(v) for k, v in stats.items()}
        )
