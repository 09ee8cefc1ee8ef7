"""Reward of a judge trained by RL (GRPO / RLOO through :class:`~lit_selfimprove.modules.StudentRLVR`).

A judge is a policy whose completion is a verdict in the judges' prompt format. The completion is
read with the SAME parser the LLM judge classes use at inference (:func:`parse_pairwise`,
:func:`parse_safety`, :func:`parse_factuality` of :mod:`lit_selfimprove.judges.prompts`), so what
is rewarded is exactly what ``LLMPairwiseJudge`` / ``LLMSafetyJudge`` / ``LLMFactualityJudge``
will read from the trained model.

The "answer" of each example is the expected verdict written in the judge's format
(``"Option 1"``, ``"FINAL DECISION: NO"``, ``"FINAL VERDICT: POSSIBLE HALLUCINATION"``; see
:func:`canonical_verdict`, which :class:`~lit_selfimprove.datamodules.JudgeExamplesDataModule`
uses), so one run can train one model on several judgments (the paper's quality + safety judge).
Reward: 1 when the parsed verdict equals the label, 0 when it is wrong or unparseable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lit_selfimprove.judges.prompts import parse_factuality, parse_pairwise, parse_safety

__all__ = ["JUDGE_KINDS", "JudgeVerdictReward", "canonical_verdict", "label_value"]

JUDGE_KINDS: dict[str, Callable[[str | None], float | None]] = {
    "pairwise": parse_pairwise,
    "safety": parse_safety,
    "factuality": parse_factuality,
}

# accepted spellings of a label -> the parser's value
_LABELS: dict[str, dict[str, float]] = {
    "pairwise": {
        "1": 1.0,
        "2": 0.0,
        "first": 1.0,
        "second": 0.0,
        "a": 1.0,
        "b": 0.0,
        "option 1": 1.0,
        "option 2": 0.0,
    },
    "safety": {
        "safe": 1.0,
        "unsafe": 0.0,
        "yes": 1.0,
        "no": 0.0,
        "true": 1.0,
        "false": 0.0,
        "1": 1.0,
        "0": 0.0,
    },
    "factuality": {
        "no": 1.0,
        "no hallucination": 1.0,
        "possible": 0.5,
        "possible hallucination": 0.5,
        "definite": 0.0,
        "definite hallucination": 0.0,
        "1": 1.0,
        "0.5": 0.5,
        "0": 0.0,
    },
}
_CANONICAL: dict[str, dict[float, str]] = {
    "pairwise": {1.0: "Option 1", 0.0: "Option 2"},
    "safety": {1.0: "FINAL DECISION: YES", 0.0: "FINAL DECISION: NO"},
    "factuality": {
        1.0: "FINAL VERDICT: NO HALLUCINATION",
        0.5: "FINAL VERDICT: POSSIBLE HALLUCINATION",
        0.0: "FINAL VERDICT: DEFINITE HALLUCINATION",
    },
}


def _check_kind(kind: str) -> None:
    if kind not in JUDGE_KINDS:
        raise ValueError(f"unknown judge kind {kind!r}; expected one of {sorted(JUDGE_KINDS)}")


def label_value(kind: str, label: object) -> float:
    """The parser value of a label (``"unsafe"`` -> 0.0, ``2`` -> 0.0 for pairwise); ``ValueError`` if unknown.

    Pairwise: ``1`` / ``"first"`` / ``"A"`` / ``"Option 1"`` (the first shown is better) or ``2`` /
    ``"second"`` / ``"B"`` / ``"Option 2"``. Safety: ``"safe"`` / ``"yes"`` / ``true`` / ``1`` or
    ``"unsafe"`` / ``"no"`` / ``false`` / ``0``. Factuality: ``"no"`` / ``"possible"`` / ``"definite"``
    (hallucination) or ``1`` / ``0.5`` / ``0``.
    """
    _check_kind(kind)
    if isinstance(label, bool):
        key = "true" if label else "false"
    elif isinstance(label, (int, float)):
        key = format(float(label), "g")
    elif isinstance(label, str):
        key = " ".join(label.strip().lower().split())
    else:
        key = None
    table = _LABELS[kind]
    if key not in table:
        raise ValueError(f"unknown {kind} label {label!r}; expected one of {sorted(table)}")
    return table[key]


def canonical_verdict(kind: str, label: object) -> str:
    """The verdict line a judge of ``kind`` answers for ``label`` (what its parser reads back)."""
    return _CANONICAL[kind][label_value(kind, label)]


def _kind_of(answer: str) -> str:
    found = [k for k, parse in JUDGE_KINDS.items() if parse(answer) is not None]
    if len(found) != 1:
        raise ValueError(
            f"cannot tell the judge kind of the answer {answer!r} (parsed as {found or 'none'}); "
            "answers must be verdicts such as canonical_verdict() writes"
        )
    return found[0]


class JudgeVerdictReward:
    """1 when the judge's completion states the labelled verdict, 0 when wrong or unparseable.

    ``reward(completions, answers)``: each answer is the expected verdict in the judge's format
    (:func:`canonical_verdict`); the completion and the answer are read with the same parser.

    Args:
        kind: ``"auto"`` (each answer says its kind: ``"Option N"`` is pairwise, ``"FINAL DECISION:
            ..."`` safety, ``"FINAL VERDICT: ... HALLUCINATION"`` factuality) or one of ``pairwise``,
            ``safety``, ``factuality`` (every answer of that kind).

    ``stats`` counts ``completions``, ``correct`` and ``unparseable`` over the reward's lifetime.
    """

    def __init__(self, kind: str = "auto"):
        if kind != "auto":
            _check_kind(kind)
        self.kind = kind
        self.stats: dict[str, int] = {"completions": 0, "correct": 0, "unparseable": 0}

    def _target(self, answer: str) -> tuple[Callable[[str | None], float | None], float]:
        kind = _kind_of(answer) if self.kind == "auto" else self.kind
        parse = JUDGE_KINDS[kind]
        target = parse(answer)
        if target is None:
            raise ValueError(f"the answer {answer!r} is not a {kind} verdict (see canonical_verdict)")
        return parse, target

    def score(self, completions: list[str], answers: list[str]) -> tuple[Tensor, Tensor]:
        """``(rewards, correct)``: both 1 where the parsed verdict matches the answer's."""
        if len(completions) != len(answers):
            raise ValueError(f"got {len(completions)} completions but {len(answers)} answers")
        targets: dict[str, tuple] = {}
        out = []
        for completion, answer in zip(completions, answers):
            if answer not in targets:
                targets[answer] = self._target(answer)
            parse, target = targets[answer]
            verdict = parse(completion)
            self.stats["unparseable"] += verdict is None
            out.append(verdict is not None and abs(verdict - target) < 1e-6)
        correct = torch.tensor(out, dtype=torch.bool)
        self.stats["completions"] += len(out)
        self.stats["correct"] += int(correct.sum())
        return correct.float(), correct

    def __call__(self, completions: list[str], answers: list[str]) -> Tensor:
        return self.score(completions, answers)[0]
