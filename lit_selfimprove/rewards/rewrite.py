"""Reward of a rewriter trained by RL (GRPO through :class:`~lit_selfimprove.modules.StudentRLVR`), as in the paper.

For an input suffix that is safe, 1 when the rewrite is an exact copy of it, else 0; for an unsafe one,
``0.5 * (quality + safety)`` of the rewrite as judged by the given judges. The completion is read the way
:class:`~lit_selfimprove.judges.LLMRewriter` reads its model's answer at inference
(:meth:`~lit_selfimprove.judges.LLMRewriter.strip_seed`: the seed, the prefix's last words, is cut from
its start), so the trained model plugs into ``LLMRewriter`` unchanged; an empty rewrite (where
``LLMRewriter`` would fall back to the original suffix) is unparseable and gets 0.

Each answer is a JSON object ``{"prefix": ..., "suffix": ...}`` (what
:class:`~lit_selfimprove.datamodules.RewriterExamplesDataModule` writes), optionally with ``"safe": true /
false``; without it the safety judge decides whether the input suffix is safe (score >= ``safe_threshold``).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from lit_selfimprove.judges.base import PairwiseJudge, PointwiseJudge
from lit_selfimprove.judges.prompts import last_words

__all__ = ["RewriteReward", "rewrite_answer"]


def rewrite_answer(prefix: str, suffix: str, safe: bool | None = None) -> str:
    """The answer string of one rewriter example (JSON, see the module docs)."""
    record: dict = {"prefix": prefix, "suffix": suffix}
    if safe is not None:
        record["safe"] = bool(safe)
    return json.dumps(record)


def _read_answer(answer: str) -> dict:
    try:
        record = json.loads(answer)
    except (TypeError, json.JSONDecodeError):
        record = None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("prefix"), str)
        or not isinstance(record.get("suffix"), str)
    ):
        raise ValueError(
            f"a rewriter answer must be JSON {{'prefix': str, 'suffix': str[, 'safe': bool]}}, got {answer!r:.200}"
        )
    return record


def _value(v: float | None) -> float:
    return 0.0 if v is None else float(v)


class RewriteReward:
    """The paper's rewriter reward: exact copy of a safe suffix -> 1; unsafe -> 0.5 * (quality + safety).

    Args:
        safety: a :class:`~lit_selfimprove.judges.PointwiseJudge` (1 safe ... 0 unsafe): judges the
            rewrite of an unsafe suffix, and the input suffix when the answer has no ``safe`` label
            (``LLMSafetyJudge`` over a backend, or ``KBSafetyJudge`` on the tiny world).
        quality: a pointwise judge (``score(prefixes, rewrites, references=suffixes)``) or a pairwise one
            (the rewrite against the original suffix: 1 better, 0.5 tie, 0 worse); ``None``: safety only
            (quality counted as 0).
        seed_words: as ``LLMRewriter(seed_words=...)``: the prefix's last words cut from the rewrite's start.
        safe_threshold: an input suffix is safe when the safety judge's score is at least this.

    A verdict that is ``None`` (unparseable) counts as 0; an input whose safety is ``None`` is treated
    as unsafe. ``stats`` counts ``completions``, ``safe_inputs``, ``copies`` and ``unparseable``.
    """

    def __init__(
        self,
        safety: PointwiseJudge,
        quality: PointwiseJudge | PairwiseJudge | None = None,
        seed_words: int = 5,
        safe_threshold: float = 0.5,
    ):
        from lit_selfimprove.judges.llm import LLMRewriter

        if not isinstance(safety, PointwiseJudge):
            raise TypeError(f"safety must be a pointwise judge (score), got {type(safety).__name__}")
        if quality is not None and not isinstance(quality, (PointwiseJudge, PairwiseJudge)):
            raise TypeError(f"quality must be a pointwise or pairwise judge, got {type(quality).__name__}")
        if seed_words < 0:
            raise ValueError("seed_words must be >= 0")
        self.safety, self.quality = safety, quality
        self.seed_words, self.safe_threshold = seed_words, safe_threshold
        self._reader = LLMRewriter(None, seed_words=seed_words)  # its strip_seed reads the completions
        self.stats: dict[str, int] = {"completions": 0, "safe_inputs": 0, "copies": 0, "unparseable": 0}

    def parse(self, completion: str, prefix: str) -> str:
        """The rewrite ``LLMRewriter`` would return for ``completion`` (``""`` when empty: no fallback)."""
        return self._reader.strip_seed(completion, last_words(prefix, self.seed_words))

    def _safe_inputs(self, records: list[dict]) -> list[bool]:
        unknown = sorted({i for i, r in enumerate(records) if r.get("safe") is None})
        scores = self.safety.score(
            [records[i]["prefix"] for i in unknown], [records[i]["suffix"] for i in unknown]
        )
        judged = dict(zip(unknown, scores))
        return [
            bool(r["safe"])
            if r.get("safe") is not None
            else (judged[i] is not None and judged[i] >= self.safe_threshold)
            for i, r in enumerate(records)
        ]

    def _quality(self, prefixes: list[str], rewrites: list[str], suffixes: list[str]) -> list[float]:
        if self.quality is None or not rewrites:
            return [0.0] * len(rewrites)
        if isinstance(self.quality, PointwiseJudge):
            return [_value(v) for v in self.quality.score(prefixes, rewrites, references=suffixes)]
        return [_value(v) for v in self.quality.compare(prefixes, rewrites, suffixes)]

    def __call__(self, completions: list[str], answers: list[str]) -> Tensor:
        if len(completions) != len(answers):
            raise ValueError(f"got {len(completions)} completions but {len(answers)} answers")
        cache: dict[str, dict] = {}
        for answer in answers:
            if answer not in cache:
                cache[answer] = _read_answer(answer)
        records = [cache[a] for a in answers]
        distinct = list(cache.values())
        safe_of = {id(r): s for r, s in zip(distinct, self._safe_inputs(distinct))}
        rewards = [0.0] * len(completions)
        todo = []  # unsafe inputs with a parseable rewrite: judged together
        for i, (completion, record) in enumerate(zip(completions, records)):
            rewrite = self.parse(completion, record["prefix"])
            self.stats["unparseable"] += not rewrite.strip()
            if safe_of[id(record)]:
                self.stats["safe_inputs"] += 1
                copy = bool(rewrite.strip()) and rewrite.strip() == record["suffix"].strip()
                self.stats["copies"] += copy
                rewards[i] = float(copy)
            elif rewrite.strip():
                todo.append((i, record, rewrite))
        if todo:
            prefixes = [r["prefix"] for _, r, _ in todo]
            rewrites = [w for _, _, w in todo]
            safety = [_value(v) for v in self.safety.score(prefixes, rewrites)]
            quality = self._quality(prefixes, rewrites, [r["suffix"] for _, r, _ in todo])
            for (i, _, _), q, s in zip(todo, quality, safety):
                rewards[i] = 0.5 * (q + s)
        self.stats["completions"] += len(completions)
        return torch.tensor(rewards, dtype=torch.float32)
