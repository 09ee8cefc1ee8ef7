"""Hashed splits: a document's split is a pure function of its key (id or text) and the split fractions, and
the stable hashes that seed the stream's random choices (no use of Python's randomized ``hash()``)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

DEFAULT_SPLITS: dict[str, float] = {"policy": 0.8, "judge": 0.05, "rewriter": 0.05, "eval": 0.1}


def _hash_int(*parts: Any) -> int:
    """A 64-bit integer determined by ``parts`` only (used as a counter-based random number)."""
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _split_point(key: str, salt: str = "") -> float:
    """``sha1(salt + key)`` as a fraction in ``[0, 1)``."""
    digest = hashlib.sha1((salt + key).encode("utf-8")).hexdigest()
    return int(digest[:13], 16) / float(16**13)


def _check_splits(splits: Mapping[str, float]) -> dict[str, float]:
    """Validate split fractions (each > 0, total <= 1) and return them as a plain dict."""
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(f"splits must be a non-empty mapping name -> fraction, got {splits!r}")
    out: dict[str, float] = {}
    for name, frac in splits.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"split names must be non-empty strings, got {name!r}")
        if (
            isinstance(frac, bool)
            or not isinstance(frac, (int, float))
            or not math.isfinite(frac)
            or frac <= 0
        ):
            raise ValueError(f"split fraction of {name!r} must be a number > 0, got {frac!r}")
        out[name] = float(frac)
    total = sum(out.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"split fractions must sum to at most 1, got {total:g} for {out}")
    return out


def assign_split(key: str, splits: Mapping[str, float] = DEFAULT_SPLITS, salt: str = "") -> str | None:
    """The split of a document whose key (its id, or its text) is ``key``; None when it falls in no split.

    The splits' fractions are laid end to end on ``[0, 1)`` in the given order and the document goes to the
    interval that contains ``sha1(salt + key)`` read as a fraction, so the assignment is a pure function of
    the document (and the split configuration).
    """
    u = _split_point(key, salt)
    acc = 0.0
    for name, frac in splits.items():
        acc += frac
        if u < acc:
            return name
    return None
