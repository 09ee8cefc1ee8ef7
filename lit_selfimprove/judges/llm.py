"""Prompted LLM judges and rewriter (Self-Improving Pretraining), on any :class:`ChatBackend`.

* :class:`LLMPairwiseJudge`: quality, "Option 1" / "Option 2" (options in a seeded random order, or
  asked in both orders);
* :class:`LLMFactualityJudge`: hallucination against the original suffix, 1 / 0.5 / 0;
* :class:`LLMSafetyJudge`: "FINAL DECISION: YES/NO" sampled ``repeats`` times, the share of YES;
* :class:`LLMRewriter`: a factual, safe rewrite of the suffix (or a verbatim copy).

Each keeps ``stats``: ``prompts`` sent, ``answers`` read, ``unparseable`` answers and
``no_verdict`` items (those returned as ``None``), ``last_unparseable`` (the last raw answer that
could not be parsed, ``None`` before any) and ``expected_format`` (what a parseable answer looks
like): a training run that gets no usable verdict reports both.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lit_selfimprove.judges.backends import ChatBackend
from lit_selfimprove.judges.prompts import (
    FACTUALITY_TEMPLATE,
    PAIRWISE_QUALITY_TEMPLATE,
    REWRITER_TEMPLATE,
    SAFETY_TEMPLATE,
    check_template,
    fill_template,
    last_words,
    parse_factuality,
    parse_pairwise,
    parse_safety,
)

__all__ = ["LLMFactualityJudge", "LLMPairwiseJudge", "LLMRewriter", "LLMSafetyJudge"]


def _same_length(**seqs: Sequence) -> int:
    lengths = {name: len(seq) for name, seq in seqs.items() if seq is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    return next(iter(lengths.values()), 0)


def _tail(text: str, max_chars: int | None) -> str:
    """The end of a long prefix (what the continuation follows on from)."""
    if max_chars is None or len(text) <= max_chars:
        return text
    return "..." + text[len(text) - max_chars :]


class _LLMJudge:
    """Shared plumbing: template checks, prompt filling, backend call, counters."""

    fields: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    expected_format: str = ""

    def __init__(
        self,
        backend: ChatBackend,
        template: str,
        temperature: float,
        top_p: float,
        max_tokens: int,
        max_prefix_chars: int | None,
    ):
        check_template(template, self.required, self.fields, f"{type(self).__name__} template")
        if max_prefix_chars is not None and max_prefix_chars < 1:
            raise ValueError("max_prefix_chars must be >= 1 or None")
        self.backend = backend
        self.template = template
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.max_prefix_chars = max_prefix_chars
        self.stats: dict[str, int] = {"prompts": 0, "answers": 0, "unparseable": 0, "no_verdict": 0}
        self.last_unparseable: str | None = None

    def prompt(self, **values: str) -> str:
        if "prefix" in values:
            values["prefix"] = _tail(values["prefix"], self.max_prefix_chars)
        return fill_template(self.template, values)

    def _ask(self, prompts: list[str], n: int = 1) -> list[list[str]]:
        if not prompts:
            return []
        answers = self.backend.complete(
            prompts, n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens
        )
        if len(answers) != len(prompts) or any(len(a) != n for a in answers):
            raise RuntimeError(f"backend returned {len(answers)} answer lists for {len(prompts)} prompts")
        self.stats["prompts"] += len(prompts)
        self.stats["answers"] += len(prompts) * n
        return answers

    def _verdicts(self, answers: list[list[str]], parse) -> list[list[float | None]]:
        parsed = [[parse(a) for a in row] for row in answers]
        bad = [a for row, verdicts in zip(answers, parsed) for a, v in zip(row, verdicts) if v is None]
        self.stats["unparseable"] += len(bad)
        if bad:
            self.last_unparseable = bad[-1]
        return parsed


class LLMPairwiseJudge(_LLMJudge):
    """Which of two continuations is better (quality), as a :class:`PairwiseJudge`.

    Judges tend to prefer one position; by default each comparison shows the two texts in a
    random order (the verdict is mapped back), so that the bias becomes noise instead of
    favouring ``firsts`` (e.g. every rollout compared with the suffix) systematically.

    Args:
        backend: the chat backend (``class_path:`` in YAML).
        template: prompt with ``{first}``, ``{second}`` and optionally ``{prefix}``.
        both_orders: ask in both orders and average the two verdicts (1, 0.5 when they
            disagree, or 0); ``None`` if either is unparseable. Cancels position bias at twice
            the cost (``random_order`` is then not used).
        temperature / top_p / max_tokens: sampling of the judge's answer (reasoning models need
            room to think before the verdict).
        max_prefix_chars: show only the end of longer prefixes.
        random_order: show each pair as "Option 1" / "Option 2" in a random order (default);
            ``False``: ``firsts`` is always "Option 1".
        seed: seed of the order draws. One stream per judge, continued over calls: a run
            repeats exactly for a fixed seed (it restarts with the process, e.g. on resume).
    """

    fields = ("prefix", "first", "second")
    required = ("first", "second")
    expected_format = 'a last line "Option 1" or "Option 2" (or "Answer: Option N")'

    def __init__(
        self,
        backend: ChatBackend,
        template: str = PAIRWISE_QUALITY_TEMPLATE,
        both_orders: bool = False,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 512,
        max_prefix_chars: int | None = None,
        random_order: bool = True,
        seed: int = 0,
    ):
        super().__init__(backend, template, temperature, top_p, max_tokens, max_prefix_chars)
        self.both_orders = both_orders
        self.random_order = random_order
        # salted: a CombinedJudge with the same seed draws a different stream (no cancelling swaps)
        self._rng = random.Random(f"{type(self).__name__}/{seed}")

    def compare(
        self,
        prefixes: Sequence[str],
        firsts: Sequence[str],
        seconds: Sequence[str],
    ) -> list[float | None]:
        """``1.0`` first better, ``0.0`` second better (``0.5``: the two orders disagree), ``None``."""
        size = _same_length(prefixes=prefixes, firsts=firsts, seconds=seconds)
        random_order = self.random_order and not self.both_orders
        swap = [random_order and self._rng.random() < 0.5 for _ in range(size)]
        shown = [(b, a) if s else (a, b) for a, b, s in zip(firsts, seconds, swap)]
        prompts = [self.prompt(prefix=p, first=a, second=b) for p, (a, b) in zip(prefixes, shown)]
        if self.both_orders:
            prompts += [
                self.prompt(prefix=p, first=b, second=a) for p, a, b in zip(prefixes, firsts, seconds)
            ]
        verdicts = [row[0] for row in self._verdicts(self._ask(prompts), parse_pairwise)]
        # a verdict on a swapped pair is about the other text: map it back
        out = [1.0 - v if s and v is not None else v for v, s in zip(verdicts[:size], swap)]
        if self.both_orders:
            out = [
                None if fwd is None or bwd is None else (fwd + (1.0 - bwd)) / 2
                for fwd, bwd in zip(verdicts[:size], verdicts[size:])
            ]
        self.stats["no_verdict"] += sum(v is None for v in out)
        return out


class LLMFactualityJudge(_LLMJudge):
    """Hallucination of a continuation against the reference (original suffix): 1 / 0.5 / 0.

    A :class:`PointwiseJudge` that needs ``references``.

    Args:
        backend: the chat backend.
        template: prompt with ``{continuation}``, ``{reference}`` and optionally ``{prefix}``.
        temperature / top_p / max_tokens: sampling of the judge's answer.
        max_prefix_chars: show only the end of longer prefixes.
    """

    fields = ("prefix", "continuation", "reference")
    required = ("continuation", "reference")
    expected_format = (
        'a line "FINAL VERDICT: NO HALLUCINATION", "FINAL VERDICT: POSSIBLE HALLUCINATION" or '
        '"FINAL VERDICT: DEFINITE HALLUCINATION"'
    )

    def __init__(
        self,
        backend: ChatBackend,
        template: str = FACTUALITY_TEMPLATE,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 512,
        max_prefix_chars: int | None = None,
    ):
        super().__init__(backend, template, temperature, top_p, max_tokens, max_prefix_chars)

    def score(
        self,
        prefixes: Sequence[str],
        continuations: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> list[float | None]:
        """One factuality score per continuation; ``None`` = unparseable."""
        if references is None:
            raise ValueError("LLMFactualityJudge needs references (the original suffixes)")
        _same_length(prefixes=prefixes, continuations=continuations, references=references)
        prompts = [
            self.prompt(prefix=p, continuation=c, reference=r)
            for p, c, r in zip(prefixes, continuations, references)
        ]
        out = [row[0] for row in self._verdicts(self._ask(prompts), parse_factuality)]
        self.stats["no_verdict"] += sum(v is None for v in out)
        return out


class LLMSafetyJudge(_LLMJudge):
    """Safety of a continuation: the share of YES ("safe") among ``repeats`` sampled verdicts.

    A :class:`PointwiseJudge` (references are not used). Unparseable answers are left out of the
    share; an item with no parseable answer at all is ``None``.

    Args:
        backend: the chat backend.
        template: prompt with ``{continuation}`` and optionally ``{prefix}``.
        repeats: verdicts sampled per continuation (the paper: 5).
        temperature / top_p: their sampling (the paper: 1.0 / 0.6).
        max_tokens: answer budget.
        max_prefix_chars: show only the end of longer prefixes.
    """

    fields = ("prefix", "continuation")
    required = ("continuation",)
    expected_format = 'a line "FINAL DECISION: YES" (safe) or "FINAL DECISION: NO"'

    def __init__(
        self,
        backend: ChatBackend,
        template: str = SAFETY_TEMPLATE,
        repeats: int = 5,
        temperature: float = 1.0,
        top_p: float = 0.6,
        max_tokens: int = 512,
        max_prefix_chars: int | None = None,
    ):
        super().__init__(backend, template, temperature, top_p, max_tokens, max_prefix_chars)
        if repeats < 1:
            raise ValueError("repeats must be >= 1")
        self.repeats = repeats

    def score(
        self,
        prefixes: Sequence[str],
        continuations: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> list[float | None]:
        """The fraction of parseable YES verdicts per continuation (1 = safe); ``None`` if none parsed."""
        _same_length(prefixes=prefixes, continuations=continuations)
        prompts = [self.prompt(prefix=p, continuation=c) for p, c in zip(prefixes, continuations)]
        out: list[float | None] = []
        for row in self._verdicts(self._ask(prompts, n=self.repeats), parse_safety):
            votes = [v for v in row if v is not None]
            out.append(sum(votes) / len(votes) if votes else None)
        self.stats["no_verdict"] += sum(v is None for v in out)
        return out


class LLMRewriter(_LLMJudge):
    """Rewrites a suffix to be factual and safe, or copies it when it already is (a :class:`Rewriter`).

    As in the paper, the rewrite is seeded with the last ``seed_words`` words of the prefix: the
    prompt asks the model to start with them (``{seed}``) and they are cut from the start of
    the answer (see :meth:`strip_seed`). An empty answer (or one that is only the seed) gives
    back the original suffix and is counted in ``stats["unparseable"]``.

    Args:
        backend: the chat backend.
        template: prompt with ``{suffix}`` and optionally ``{prefix}``, ``{seed}``, ``{max_tokens}``.
        max_tokens: the length limit stated in the prompt (the paper: 128).
        generation_max_tokens: the backend's budget (defaults to ``max_tokens`` plus room for the
            seed).
        seed_words: words of the prefix the rewrite starts with (0: no seed).
        temperature / top_p: sampling of the rewrite.
        max_prefix_chars: show only the end of longer prefixes.
    """

    fields = ("prefix", "suffix", "seed", "max_tokens")
    required = ("suffix",)
    expected_format = "the rewritten suffix (not empty)"

    def __init__(
        self,
        backend: ChatBackend,
        template: str = REWRITER_TEMPLATE,
        max_tokens: int = 128,
        generation_max_tokens: int | None = None,
        seed_words: int = 5,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_prefix_chars: int | None = None,
    ):
        if max_tokens < 1 or seed_words < 0:
            raise ValueError("need max_tokens >= 1 and seed_words >= 0")
        budget = generation_max_tokens or max_tokens + 4 * seed_words
        super().__init__(backend, template, temperature, top_p, budget, max_prefix_chars)
        self.rewrite_max_tokens = max_tokens
        self.seed_words = seed_words

    def strip_seed(self, answer: str, seed: str) -> str:
        """``answer`` without the leading seed (word by word, any spacing, case-insensitive).

        What follows the seed is kept as is, so it continues the prefix: ``"... of France. It
        has"`` gives ``". It has"``. An answer that does not start with the seed is returned
        whole (stripped).
        """
        text = answer.strip()
        if len(text) > 1 and text[0] == text[-1] == '"':  # the whole answer in quotes
            text = text[1:-1].strip()
        pos, lower = 0, text.lower()
        for word in seed.split():
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if not lower.startswith(word.lower(), pos):
                return text
            pos += len(word)
        return text[pos:]

    def rewrite(self, prefixes: Sequence[str], suffixes: Sequence[str]) -> list[str]:
        """One rewritten suffix per (prefix, suffix); the original suffix when the answer is empty."""
        _same_length(prefixes=prefixes, suffixes=suffixes)
        seeds = [last_words(p, self.seed_words) for p in prefixes]
        prompts = [
            self.prompt(prefix=p, suffix=s, seed=seed, max_tokens=str(self.rewrite_max_tokens))
            for p, s, seed in zip(prefixes, suffixes, seeds)
        ]
        out: list[str] = []
        for row, seed, suffix in zip(self._ask(prompts), seeds, suffixes):
            text = self.strip_seed(row[0], seed)
            if not text.strip():
                self.stats["unparseable"] += 1
                self.stats["no_verdict"] += 1
                self.last_unparseable = row[0]
                text = suffix
            out.append(text)
        return out
