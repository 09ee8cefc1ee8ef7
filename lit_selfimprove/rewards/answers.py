"""Answer strings: the last ``\\boxed{}`` of a completion, reference-answer unwrapping and the light
normalization used by :class:`~lit_selfimprove.rewards.math_verify.MathVerifyReward` (pure Python, no
math-verify import)."""

from __future__ import annotations

import re

__all__ = ["extract_boxed", "strip_answer"]


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_NOBRACE_TOKEN_RE = re.compile(r"[^\s$]+")
_SPACE_AFTER_COMMAND_RE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")
_WHITESPACE_RE = re.compile(r"\s+")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def extract_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, or ``None``.

    Braces are balanced (escaped ``\\{``/``\\}`` do not count), so ``\\boxed{\\frac{1}{2}}`` gives
    ``\\frac{1}{2}``. The brace-less form ``\\boxed 5`` gives ``5``. When the last box is not closed (e.g. a
    truncated generation), the result is ``None``: earlier boxes are not used as a fallback. The content is
    returned stripped of surrounding whitespace; an empty box gives ``""``.
    """
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    # rfind may hit e.g. ``\boxedfoo``; walk back to the last real box command.
    while start >= 0 and _BOX_RE.match(text, start) is None:
        start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
    if start < 0:
        return None
    pos = _BOX_RE.match(text, start).end()
    rest = len(text) - pos
    stripped_pos = pos
    while stripped_pos < len(text) and text[stripped_pos].isspace():
        stripped_pos += 1
    if stripped_pos < len(text) and text[stripped_pos] == "{":
        close = _closing_brace(text, stripped_pos)
        return None if close is None else text[stripped_pos + 1 : close].strip()
    if rest > 0 and stripped_pos > pos:  # ``\boxed 5``: the next token
        match = _NOBRACE_TOKEN_RE.match(text, stripped_pos)
        if match is not None:
            return match.group()
    return None


def _unwrap_box(text: str) -> str | None:
    """Content of ``text`` if the whole of it is one ``\\boxed{...}``/``\\fbox{...}``, else ``None``."""
    match = _BOX_RE.match(text)
    if match is None:
        return None
    pos = match.end()
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text) or text[pos] != "{":
        return None
    close = _closing_brace(text, pos)
    return text[pos + 1 : close] if close is not None and close == len(text) - 1 else None


def _closing_brace(text: str, pos: int) -> int | None:
    """Index of the ``}`` that closes the ``{`` at ``pos`` (escaped braces ignored), or ``None``."""
    depth = 0
    for brace in _BRACE_RE.finditer(text, pos):
        depth += 1 if brace.group() == "{" else -1 if brace.group() == "}" else 0
        if depth == 0:
            return brace.start()
    return None


def _has_inner_dollar(text: str) -> bool:
    return _DOLLAR_RE.search(text) is not None


def strip_answer(ref: str) -> str:
    """Remove math-mode and box wrappers around a reference answer: ``$..$``, ``$$..$$``, ``\\(..\\)``,
    ``\\[..\\]``, ``\\boxed{..}``/``\\fbox{..}`` (repeatedly, in any nesting) and surrounding whitespace.

    A wrapper is only removed when it spans the whole string; a string made of several ``$..$`` segments
    (``$69$, $84$``) loses all its ``$`` delimiters, and punctuation after a closing ``$`` is dropped.
    """
    if not isinstance(ref, str):
        ref = _to_text(ref)
    text = ref.strip()
    while text:
        if (
            len(text) >= 4
            and text.startswith("$$")
            and text.endswith("$$")
            and not _has_inner_dollar(text[2:-2])
        ):
            text = text[2:-2].strip()
        elif (
            len(text) >= 2
            and text.startswith("$")
            and text.endswith("$")
            and not text.endswith("\\$")
            and not _has_inner_dollar(text[1:-1])
        ):
            text = text[1:-1].strip()
        elif (text.startswith("\\(") and text.endswith("\\)")) or (
            text.startswith("\\[") and text.endswith("\\]")
        ):
            text = text[2:-2].strip()
        elif len(text) >= 3 and text[-1] in ".,;" and text[-2] == "$" and text[-3] != "\\":
            text = text[:-1].rstrip()  # ``$x$.``: sentence punctuation after the math
        else:
            inner = _unwrap_box(text)
            if inner is None:
                break
            text = inner.strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$") and not text.endswith("\\$"):
        # Several math segments, e.g. ``$69$, $84$`` -> ``69, 84``.
        text = _DOLLAR_RE.sub("", text).strip()
    return text


def _normalize(text: str) -> str:
    """Whitespace-insensitive form used for the exact-match short-circuit and the "contains" check.

    Whitespace is dropped except where it separates a command from a following letter (``\\pi r``).
    """
    text = _SPACE_AFTER_COMMAND_RE.sub("\\1\x00", text)
    return _WHITESPACE_RE.sub("", text).replace("\x00", " ")


def _to_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if value is None:
        return ""
    return str(value)


def _sanitize(text: str) -> str:
    """Make a string safe to hand to math-verify: no NUL bytes, no lone surrogates (invalid UTF-8)."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    return _SURROGATE_RE.sub("\ufffd", text)
