"""SOAR teacher completions (pure functions, no Lightning): parsing them into (question, answer)
pairs and the answer-parseability check (the advantages and the learnability reward, tensors only,
are in :mod:`lit_selfimprove.rl.teacher_rewards`).

A valid teacher completion holds ``<question>...</question>`` followed by
``<answer>\\boxed{...}</answer>``; reasoning may surround the tags. Parsing is lenient, as the
paper asks (its printed prompt closed the question with a second ``<question>``):

* tags are matched case-insensitively, with optional whitespace inside the angle brackets;
* the question ends at the first ``</question>``, a second ``<question>`` or a ``</answer>`` (used as
  a closing tag), or the ``<answer>`` tag when the closing tag is missing;
* the answer is the last ``\\boxed{...}`` (balanced braces, via
  :func:`lit_selfimprove.rewards.extract_boxed`) between ``<answer>`` and ``</answer>``, or the end
  of the text when ``</answer>`` is missing;
* question and answer must be non-empty; the answer must be at most ``max_answer_chars`` long,
  free of NUL bytes, and pass the optional ``answer_ok`` check (see :func:`math_verify_parseable`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence

from lit_selfimprove.rewards import extract_boxed

__all__ = [
    "MAX_ANSWER_CHARS",
    "math_verify_parseable",
    "parse_pair",
    "parse_pairs",
    "structural_pair",
]

MAX_ANSWER_CHARS = 200

_Q_OPEN = re.compile(r"<\s*question\s*>", re.IGNORECASE)
# what ends a question: </question>, a second <question> (the paper's typo), </answer> (a small model's
# wrong closing tag: "<question>What is 2 + 4?</answer><answer>...") or <answer>
_Q_END = re.compile(r"<\s*/\s*question\s*>|<\s*question\s*>|<\s*/\s*answer\s*>|<\s*answer\s*>", re.IGNORECASE)
_A_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_A_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)


def structural_pair(text: str, max_answer_chars: int = MAX_ANSWER_CHARS) -> tuple[str, str] | None:
    """``(question, answer)`` from the tags and the box of ``text``, or ``None`` (no parseability check)."""
    if not isinstance(text, str):
        return None
    q_open = _Q_OPEN.search(text)
    if q_open is None:
        return None
    q_end = _Q_END.search(text, q_open.end())
    if q_end is None:
        return None
    question = text[q_open.end() : q_end.start()].strip()
    a_open = _A_OPEN.search(text, q_end.start())
    if a_open is None or not question:
        return None
    a_close = _A_CLOSE.search(text, a_open.end())
    region = text[a_open.end() : a_close.start() if a_close else len(text)]
    answer = extract_boxed(region)
    if not answer or len(answer) > max_answer_chars or "\x00" in answer:
        return None
    return question, answer


def parse_pair(
    text: str,
    answer_ok: Callable[[str], bool] | None = None,
    max_answer_chars: int = MAX_ANSWER_CHARS,
) -> tuple[str, str] | None:
    """Parse one teacher completion into ``(question, answer)``; ``None`` when it is not valid.

    ``answer_ok(answer) -> bool`` is an extra check of the boxed answer (e.g. "math-verify can
    parse it"); without it only the structure is checked (tags, non-empty, balanced box).
    """
    pair = structural_pair(text, max_answer_chars)
    if pair is None or (answer_ok is not None and not answer_ok(pair[1])):
        return None
    return pair


def parse_pairs(
    texts: Sequence[str],
    answers_ok: Callable[[list[str]], Sequence[bool]] | None = None,
    max_answer_chars: int = MAX_ANSWER_CHARS,
) -> list[tuple[str, str] | None]:
    """:func:`parse_pair` over many texts, with one batched ``answers_ok(answers) -> [bool]`` call."""
    pairs = [structural_pair(t, max_answer_chars) for t in texts]
    if answers_ok is None:
        return pairs
    idx = [i for i, p in enumerate(pairs) if p is not None]
    if idx:
        ok = list(answers_ok([pairs[i][1] for i in idx]))
        if len(ok) != len(idx):
            raise ValueError(f"answers_ok returned {len(ok)} flags for {len(idx)} answers")
        for i, good in zip(idx, ok):
            if not good:
                pairs[i] = None
    return pairs


_PARSER_WARM = False


def math_verify_parseable(answers: Sequence[str], timeout: int = 2) -> list[bool]:
    """Can math-verify parse each boxed answer into a symbolic expression?

    ``math_verify.parse`` returns ``[sympy_expr, str]`` when its LaTeX / expression parser
    succeeds and only the raw string (or nothing) when it fails; an answer is parseable when a
    non-string came back. This runs in the calling process: parsing never evaluates (``10^{10^{10}}``
    stays a ``Pow``) and answers are length-capped by the caller (:data:`MAX_ANSWER_CHARS`), and
    each parse is additionally guarded by math-verify's ``SIGALRM`` timeout (``timeout`` whole
    seconds; only available in the main thread, elsewhere it runs unguarded). An answer that
    times out or raises counts as not parseable.
    """
    import logging

    from math_verify import parse

    global _PARSER_WARM
    if not _PARSER_WARM:  # the first parse pays for lazy imports; keep that out of the timeout
        parse("\\boxed{1}")
        _PARSER_WARM = True
    guard = timeout if threading.current_thread() is threading.main_thread() else None
    out = []
    math_verify_logger = logging.getLogger("math_verify")
    level = math_verify_logger.level
    math_verify_logger.setLevel(logging.CRITICAL)  # it logs every parse failure
    try:
        for answer in answers:
            try:
                parsed = parse("\\boxed{" + answer + "}", parsing_timeout=guard)
            except Exception:
                parsed = []
            out.append(any(not isinstance(p, str) for p in parsed))
    finally:
        math_verify_logger.setLevel(level)
    return out
