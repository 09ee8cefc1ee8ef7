"""TeacherMetaRL under DDP and FSDP2 (``ModelParallelStrategy``), two gloo processes on CPU,
against one process (``tests/_dist_soar_script.py``, run in subprocesses).

The g*r = 8 inner trainings of an outer step are spread over the ranks (4 each), their rewards
all-reduced: both ranks must see the same rewards, apply the same teacher update (identical
teacher weights), promote the same student (identical students, broadcast from the rank that
trained it), and the rewards must equal those of one process running all 8 trainings (same
datasets, same Q_R, per-training RNG streams). Each rank runs its share of the trainings while the
other runs its own; how much that cuts the wall time of an outer step depends on the machine's load,
so it is measured by ``benchmarks/bench_soar_distributed.py``, not asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests._launch import cached_runs, max_diff, run_ranks

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
    assert len(single["jobs"]) == 2 * 8  # 2 outer steps x g*r = 2*4 trainings on one process
    assert len(r0["jobs"]) == len(r1["jobs"]) == 2 * 4  # ... and half of them on each of two ranks
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


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_promotion_broadcasts_the_student_tensor_by_tensor(runs, mode):
    """A promotion every step, and the students still agree (above), but no rank ever pickled a student
    into one object: a 3B float32 student would be a ~12 GB byte tensor on every GPU."""
    ranks = runs(mode)
    student_bytes = sum(t.numel() * t.element_size() for t in ranks[0]["student"].values())
    largest = max(size for r in ranks for size in r["object_bytes"])
    assert largest < student_bytes / 20, (largest, student_bytes)


@pytest.mark.slow  # two spawned processes importing the library: tens of seconds on a busy machine
def test_broadcast_state_copies_into_the_destination_on_every_rank(tmp_path):
    r0, r1 = run_ranks(SCRIPT, ["broadcast", "unused"], tmp_path, TIMEOUT_S)
    for r in (r0, r1):
        assert r["installed"] and not r["nothing"] and r["in_place"]
        assert torch.equal(r["weight"], torch.full((200, 300), 1.5))  # bfloat16 sent, float32 here
        assert torch.equal(r["bias"], torch.arange(200.0))
        assert r["errors"] == ["KeyError", "ValueError"]  # a mismatch raises everywhere, never hangs
        assert max(r["object_bytes"], default=0) < 4 * 60_200 / 20  # names and shapes, not the tensors
    assert r0["bias_version_bumped"]  # written by the collective: marked changed (vLLM reloads)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_each_rank_runs_its_share_of_the_inner_trainings_at_the_same_time_as_the_other(runs, mode):
    """Rank r runs trainings r, r + 2, ... of every outer step, while the other rank runs its own.

    Load-independent: the speed-up itself is measured by ``benchmarks/bench_soar_distributed.py``."""
    ranks = runs(mode)
    for step in range(2):
        for rank, result in enumerate(ranks):
            assert [job["j"] for job in result["jobs"] if job["step"] == step] == list(range(rank, 8, 2))
        # [first start, last end] of each rank's trainings in this step: the two intervals overlap
        spans = [
            (min(job["start"] for job in jobs), max(job["end"] for job in jobs))
            for jobs in ([job for job in r["jobs"] if job["step"] == step] for r in ranks)
        ]
        assert max(start for start, _ in spans) < min(end for _, end in spans), spans
    assert [job["j"] for job in runs("single")[0]["jobs"]] == list(range(8)) * 2
