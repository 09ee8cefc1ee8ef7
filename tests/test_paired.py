"""The paired seed-by-seed comparison used by the tiny-world experiments, checked by hand."""

from __future__ import annotations

import pytest

from lit_selfimprove.metrics.paired import paired_difference


def test_constant_difference_has_a_point_interval():
    out = paired_difference([0.3, 0.5, 0.2], [0.1, 0.3, 0.0])
    assert out["mean"] == pytest.approx(0.2) and out["ci"] == pytest.approx([0.2, 0.2])
    assert out["wins"] == 3 and out["ties"] == 0 and out["n"] == 3


def test_two_seeds_interval_spans_the_possible_resampled_means():
    # diffs (1, 0): resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% percentiles are 0 and 1
    out = paired_difference([1.0, 0.0], [0.0, 0.0])
    assert out["mean"] == 0.5 and out["ci"] == [0.0, 1.0]
    assert out["per_seed"] == [1.0, 0.0] and out["wins"] == 1 and out["ties"] == 1


def test_interval_is_seeded_and_inside_the_observed_range():
    a, b = [0.1, 0.4, 0.2, 0.0, 0.3], [0.2, 0.1, 0.1, 0.1, 0.1]
    one, two = paired_difference(a, b), paired_difference(a, b)
    assert one == two
    low, high = one["ci"]
    assert min(one["per_seed"]) <= low <= one["mean"] <= high <= max(one["per_seed"])
    assert paired_difference(a, b, level=0.5)["ci"][1] <= high  # a lower level, a narrower interval


def test_unpaired_or_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="at least one seed"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="level"):
        paired_difference([1.0], [0.0], level=95)
