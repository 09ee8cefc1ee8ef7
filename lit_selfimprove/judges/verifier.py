"""A judge of math documents that scores only what can be checked: the final answer a suffix states.

:class:`MathVerifierJudge` is a rule-based judge for prefix -> suffix continuations of math documents
(a question followed by a worked solution ending in ``\\boxed{answer}``, e.g. the documents rendered
from SOAR's outputs). It needs no LLM:

* the **document's answer** is the last ``\\boxed{}`` of ``prefix + reference`` (the reference is the
  original suffix; the answer usually sits in it, or in the prefix when the cut falls after it);
* a continuation **states** an answer when its last ``\\boxed{...}`` is closed and not empty
  (well-formedness: an unclosed box, as a truncated generation leaves, states nothing);
* the stated answer is **right** when math-verify finds it equivalent to the document's answer
  (:class:`~lit_selfimprove.rewards.MathVerifyReward`: worker processes with a wall-clock timeout).

As a :class:`~lit_selfimprove.judges.PointwiseJudge` (``score``) a continuation gets ``right_score`` (1),
``wrong_score`` (0) or ``missing_score`` (0). As a :class:`~lit_selfimprove.judges.PairwiseJudge`
(``compare``) the continuation with the higher pointwise score wins (1.0 / 0.0), equal scores tie (0.5).
Where the document states no answer, nothing can be checked: the verdict is ``None`` (unparseable,
counted and left out like an LLM judge's unreadable reply; ``SuffixPolicyDPO``'s judge-health check
stops a run whose corpus has no answers). In a :class:`~lit_selfimprove.judges.CombinedJudge` it takes
the ``factuality`` slot (pointwise, against the references) or the ``quality`` slot (pairwise; the
combination passes it the references, see ``uses_references``), beside LLM judges in the other slots.
"""

from __future__ import annotations

from collections.abc import Sequence

from lit_selfimprove.rewards.answers import extract_boxed

__all__ = ["MathVerifierJudge"]


class MathVerifierJudge:
    """Scores math continuations by math-verify of their stated final answer against the document's.

    Args:
        right_score: score of a continuation whose last ``\\boxed{}`` is equivalent to the document's answer.
        wrong_score: score of one that states another answer.
        missing_score: score of one that states none (no box, an unclosed or an empty one).
        timeout: math-verify's wall-clock seconds per answer (a timeout counts as wrong).
        num_workers: math-verify worker processes (started on the first call).
    """

    uses_references = True  # CombinedJudge passes the original suffixes to ``compare`` too
    expected_format = "a document (prefix + original suffix) that states its final answer as \\boxed{...}"

    def __init__(
        self,
        right_score: float = 1.0,
        wrong_score: float = 0.0,
        missing_score: float = 0.0,
        timeout: float = 5.0,
        num_workers: int = 1,
    ):
        if not right_score > max(wrong_score, missing_score):
            raise ValueError(
                f"right_score ({right_score}) must be above wrong_score ({wrong_score}) and "
                f"missing_score ({missing_score}): a right answer has to win"
            )
        from lit_selfimprove.rewards.math_verify import MathVerifyReward

        self.right_score, self.wrong_score, self.missing_score = right_score, wrong_score, missing_score
        self.verify = MathVerifyReward(mode="binary", timeout=timeout, num_workers=num_workers)
        self.last_unparseable: str | None = None
        self.counts = {"right": 0, "wrong": 0, "missing": 0, "no_reference_answer": 0}

    @staticmethod
    def stated_answer(text: str) -> str | None:
        """The answer a text states: its last closed, non-empty ``\\boxed{}`` (``None`` otherwise)."""
        answer = extract_boxed(text)
        return answer if answer else None

    def score(
        self,
        prefixes: Sequence[str],
        continuations: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> list[float | None]:
        """One score per continuation: right / wrong / missing; ``None`` where the document has no answer."""
        if references is None:
            raise ValueError(
                "MathVerifierJudge needs references (the original suffixes), which hold the document's answer"
            )
        if not len(prefixes) == len(continuations) == len(references):
            raise ValueError(
                f"got {len(prefixes)} prefixes, {len(continuations)} continuations and {len(references)} references"
            )
        documents = [self.stated_answer(p + r) for p, r in zip(prefixes, references)]
        stated = [self.stated_answer(c) for c in continuations]
        todo = [
            i for i, (doc, ans) in enumerate(zip(documents, stated)) if doc is not None and ans is not None
        ]
        correct = self.verify.correct([f"\\boxed{{{stated[i]}}}" for i in todo], [documents[i] for i in todo])
        right = {i for i, ok in zip(todo, correct.tolist()) if ok}
        scores: list[float | None] = []
        for i, (doc, ans) in enumerate(zip(documents, stated)):
            if doc is None:
                self.counts["no_reference_answer"] += 1
                self.last_unparseable = (prefixes[i] + references[i])[-300:]
                scores.append(None)
            elif ans is None:
                self.counts["missing"] += 1
                scores.append(self.missing_score)
            elif i in right:
                self.counts["right"] += 1
                scores.append(self.right_score)
            else:
                self.counts["wrong"] += 1
                scores.append(self.wrong_score)
        return scores

    def compare(
        self,
        prefixes: Sequence[str],
        firsts: Sequence[str],
        seconds: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> list[float | None]:
        """Per pair: 1.0 when the first scores higher, 0.0 when the second does, 0.5 on a tie; ``None``
        where the document has no answer."""
        if not len(prefixes) == len(firsts) == len(seconds):
            raise ValueError(f"got {len(prefixes)} prefixes, {len(firsts)} firsts and {len(seconds)} seconds")
        n = len(prefixes)
        both = self.score(
            list(prefixes) * 2,
            list(firsts) + list(seconds),
            None if references is None else list(references) * 2,
        )
        verdicts: list[float | None] = []
        for a, b in zip(both[:n], both[n:]):
            verdicts.append(None if a is None or b is None else 1.0 if a > b else 0.0 if a < b else 0.5)
        return verdicts

    def close(self) -> None:
        """Stop the math-verify workers now (they also stop with the object)."""
        self.verify.close()
