"""TeacherMetaRL under DDP and FSDP2 (``ModelParallelStrategy``), two gloo processes on CPU,
against one process (``tests/_dist_soar_script.py``, run in subprocesses).

The g*r = 8 inner trainings of an outer step are spread over the ranks (4 each), their rewards
all-reduced: both ranks must see the same rewards, apply the same teacher update (identical
teacher weights), promote the same student (identical students, broadcast from the rank that
trained it), and the rewards must equal those of one process running all 4 trainings (same
datasets, same Q_R, per-training RNG streams). Spreading the trainings must also cut the wall time
of an outer step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._launch import cached_runs, max_diff

SCRIPT = Path(__file__).with_name("_dist_soar_script.py")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def runs(tiny_random_lm, tmp_path_factory):
    """``mode -> results``: ``single`` (one process), ``ddp``, ``fsdp2``; each run once per module."""
    return cached_runs(SCRIPT, tiny_random_lm, tmp_path_factory, TIMEOUT_S)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_inner_trainings_are_spread_and_ranks_agree(runs, mode):
    single = runs("single")[0]
    r0, r1 = runs(mode)
    assert single["jobs"] == 2 * 8  # 2 outer steps x g*r = 2*4 trainings on one process
    assert r0["jobs"] == r1["jobs"] == 2 * 4  # ... and half of them on each of two ranks
    # the same rewards on both ranks, and the same as one process running every training
    assert r0["rewards"] == r1["rewards"]
    assert any(abs(x) > 0 for step in single["rewards"] for x in step), "rewards must not be trivial"
    for a, b in zip(single["rewards"], r0["rewards"]):
        assert a == pytest.approx(b, abs=1e-6)
    # identical teachers (the update is the same everywhere) and students (promotion broadcast)
    assert max_diff(r0["teacher"], r1["teacher"]) <= 1e-6
    assert max_diff(r0["student"], r1["student"]) == 0.0
    assert max_diff(r0["teacher"], single["teacher"]) < 1e-3  # per-rank vs global token mean only
    assert max_diff(r0["student"], single["student"]) <= 1e-5  # the same student was promoted
    # FSDP2 shards the teacher only; students stay whole on every rank
    assert r0["teacher_dtensor"] == (mode == "fsdp2") and not r0["student_dtensor"]


def _two_free_cores() -> bool:
    """Do two CPU-bound processes run side by side as fast as one alone? (Not on a busy machine.)"""
    loop = [sys.executable, "-c", "s = 0\nfor i in range(6_000_000): s += i"]

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        # own session, as the ranks run (their CPU share is per session group under autogroup)
        for p in [subprocess.Popen(loop, start_new_session=True) for _ in range(n)]:
            p.wait()
        return time.perf_counter() - t0

    return timed(2) < 1.3 * timed(1)


def test_spreading_the_inner_trainings_cuts_the_outer_step_time(runs):
    if (os.cpu_count() or 1) < 2 or not _two_free_cores():
        pytest.skip("needs two idle CPU cores: the machine is busy, a wall-time comparison would be noise")
    single = runs("single")[0]
    ddp = runs("ddp")
    # both outer steps; each rank runs half of the trainings (the rest of a step is not spread)
    t1 = sum(single["step_times"])
    t2 = max(sum(r["step_times"]) for r in ddp)
    assert t2 < 0.85 * t1, f"2 ranks: {t2:.2f} s for 2 outer steps, 1 process: {t1:.2f} s"
