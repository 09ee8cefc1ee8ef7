"""TeacherMetaRL under DDP and FSDP2 (``ModelParallelStrategy``), two gloo processes on CPU,
against one process (``tests/_dist_soar_script.py``, run in subprocesses).

The g*r = 4 inner trainings of an outer step are spread over the ranks (2 each), their rewards
all-reduced: both ranks must see the same rewards, apply the same teacher update (identical
teacher weights), promote the same student (identical students, broadcast from the rank that
trained it), and the rewards must equal those of one process running all 4 trainings (same
datasets, same Q_R, per-training RNG streams). Spreading the trainings must also cut the wall time
of an outer step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_distributed import _LAUNCH_ENV, _free_port, _max_diff

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("_dist_soar_script.py")
TIMEOUT_S = 300


def _run(mode: str, model_dir: str, out: Path) -> list[dict]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCH_ENV and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_", "LT_"))
    }
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), mode, model_dir, str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{mode}: run hung for {TIMEOUT_S} s\n{log[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{mode}: exit code {proc.returncode}\n{log[-4000:]}"
    ranks = 1 if mode == "single" else 2
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


@pytest.fixture(scope="module")
def runs(tiny_random_lm, tmp_path_factory):
    cache: dict[str, list[dict]] = {}

    def get(mode: str) -> list[dict]:
        if mode not in cache:
            cache[mode] = _run(mode, tiny_random_lm, tmp_path_factory.mktemp(mode))
        return cache[mode]

    return get


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_inner_trainings_are_spread_and_ranks_agree(runs, mode):
    single = runs("single")[0]
    r0, r1 = runs(mode)
    assert single["jobs"] == 2 * 4  # 2 outer steps x g*r trainings on one process
    assert r0["jobs"] == r1["jobs"] == 2 * 2  # ... and half of them on each of two ranks
    # the same rewards on both ranks, and the same as one process running every training
    assert r0["rewards"] == r1["rewards"]
    assert any(abs(x) > 0 for step in single["rewards"] for x in step), "rewards must not be trivial"
    for a, b in zip(single["rewards"], r0["rewards"]):
        assert a == pytest.approx(b, abs=1e-6)
    # identical teachers (the update is the same everywhere) and students (promotion broadcast)
    assert _max_diff(r0["teacher"], r1["teacher"]) <= 1e-6
    assert _max_diff(r0["student"], r1["student"]) == 0.0
    assert _max_diff(r0["teacher"], single["teacher"]) < 1e-3  # per-rank vs global token mean only
    assert _max_diff(r0["student"], single["student"]) <= 1e-5  # the same student was promoted
    # FSDP2 shards the teacher only; students stay whole on every rank
    assert r0["teacher_dtensor"] == (mode == "fsdp2") and not r0["student_dtensor"]


def test_spreading_the_inner_trainings_cuts_the_outer_step_time(runs):
    single = runs("single")[0]
    ddp = runs("ddp")
    # both outer steps; each rank runs half of the trainings (the rest of a step is not spread)
    t1 = sum(single["step_times"])
    t2 = max(sum(r["step_times"]) for r in ddp)
    assert t2 < 0.85 * t1, f"2 ranks: {t2:.2f} s for 2 outer steps, 1 process: {t1:.2f} s"
