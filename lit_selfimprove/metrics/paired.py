"""Paired comparison of two methods over seeds: the mean difference and its bootstrap interval.

The tiny-world experiments train both arms with the same seeds (same data order, same sampling
streams), so their results are compared seed by seed: ``d_s = a_s - b_s``, resampled with
replacement. The percentile interval of the resampled means is a 95% interval for the mean
difference; with few seeds it is too narrow rather than too wide (it cannot see beyond the
observed differences), so report the per-seed differences beside it.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

__all__ = ["paired_difference"]


def paired_difference(
    a: Sequence[float], b: Sequence[float], reps: int = 10_000, level: float = 0.95, seed: int = 0
) -> dict:
    """``{"mean", "ci", "per_seed", "wins", "ties", "n"}`` for the paired differences ``a - b``.

    ``ci`` is the ``level`` percentile-bootstrap interval of the mean difference (``reps``
    resamples of the seeds, a seeded RNG: the same inputs give the same interval); ``wins`` counts
    seeds where ``a`` is ahead, ``ties`` where they are equal.
    """
    if len(a) != len(b):
        raise ValueError(
            f"paired_difference needs one value per seed in both arms, got {len(a)} and {len(b)}"
        )
    if not a:
        raise ValueError("paired_difference needs at least one seed")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(reps))
    tail = (1 - level) / 2
    low, high = means[int(tail * reps)], means[min(reps - 1, int((1 - tail) * reps))]
    return {
        "mean": statistics.fmean(diffs),
        "ci": [low, high],
        "per_seed": diffs,
        "wins": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "n": len(diffs),
    }
