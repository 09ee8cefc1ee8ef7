"""argparse types of the command-line tools (``failk``, ``sample-questions``, ``world``): a bad number
is refused when the command line is parsed, with what was expected, not after minutes of model
loading."""

from __future__ import annotations

import argparse

__all__ = ["non_negative_float", "non_negative_int", "number", "open_fraction", "positive_int", "probability"]


def number(text: str, kind, ok, what: str):
    """``text`` as ``kind`` when ``ok`` of it, else an argparse error saying what was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts, sizes, budgets): refused when the command line is
    parsed, not after minutes of model loading."""
    return number(text, int, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (seeds, optional counts where 0 means none)."""
    return number(text, int, lambda v: v >= 0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (sampling temperatures; 0 is greedy)."""
    return number(text, float, lambda v: 0 <= v < float("inf"), "a number >= 0")


def probability(text: str) -> float:
    """argparse type: a number in (0, 1] (top-p)."""
    return number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (a held-out fraction)."""
    return number(text, float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")
