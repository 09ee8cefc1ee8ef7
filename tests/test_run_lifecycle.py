"""Long runs survive: ``--ckpt_path=last`` resumes the same run exactly, metrics are appended, one run
per directory, outputs follow ``--trainer.default_root_dir``, the bar counts steps."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_selfimprove.callbacks import RunDirectory, RunDirectoryInUse, StepProgressBar
from lit_selfimprove.callbacks.run_directory import acquire_lock, read_lock
from lit_selfimprove.loggers import CSVLogger

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

# the tiny SOAR config, scaled down, promoting at every outer step (R can be 0 with 1 inner step)
FAST = """
trainer:
  max_steps: 4
  val_check_interval: null
  limit_val_batches: 0
  callbacks:
    - class_path: lit_selfimprove.callbacks.Promotion
      init_args: {{tau: -1.0, window: 1, require_improvement: false}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: 1, save_last: true, save_top_k: 0}}
    - class_path: _kill_at.KillAt
      init_args: {{step: {kill}}}
model:
  init_args:
    num_datasets: 2
    dataset_size: 4
    num_repeats: 1
    teacher_max_new_tokens: 120
    inner:
      steps: 1
      batch: 2
      group_size: 2
      max_new_tokens: 24
    log_samples_every: 1
data:
  init_args: {{batch_size: 4}}
"""


def soar(root: Path, kill: int = -1, *extra: str) -> subprocess.CompletedProcess:
    root.mkdir(parents=True, exist_ok=True)
    override = root / f"fast_{kill}.yaml"
    override.write_text(FAST.format(kill=kill))
    cmd = [
        sys.executable, "-m", "lit_selfimprove", "fit", "--config", "configs/tiny/soar.yaml",
        "--config", str(override), f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def outputs(run: Path) -> dict:
    pq = [json.loads(line) for line in (run / "promotion_questions.jsonl").read_text().splitlines()]
    students = sorted(p.name for p in (run / "students").iterdir())
    weights = {s: load_file(run / "students" / s / "model.safetensors") for s in students}
    with open(run / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    return {"pq": pq, "students": students, "weights": weights, "metrics": metrics, "step": step}


def test_sigkill_after_a_promotion_then_ckpt_path_last_is_the_uninterrupted_run(tmp_path):
    straight = soar(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = soar(tmp_path / "crash", 2)  # promoted at steps 0, 1, 2; killed before step 2's checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "crash" / "runs" / "soar" / "version_0"
    assert (run / "students" / "promotion_2_step_2").is_dir()  # written, never checkpointed
    # the documented command: the same config with --ckpt_path=last
    resumed = soar(tmp_path / "crash", -1, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "crash" / "runs" / "soar" / "version_1").exists()  # same run directory
    a, b = outputs(tmp_path / "straight" / "runs" / "soar" / "version_0"), outputs(run)
    assert a["step"] == b["step"] == 4
    assert [r["step"] for r in b["pq"]] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert len({r["run_id"] for r in b["pq"]}) == 1  # one run, resumed
    strip = [{k: v for k, v in r.items() if k != "run_id"} for r in a["pq"]]
    assert strip == [{k: v for k, v in r.items() if k != "run_id"} for r in b["pq"]]
    assert a["students"] == b["students"] == [f"promotion_{i}_step_{i}" for i in range(4)]
    for name in a["students"]:
        assert all(torch.equal(a["weights"][name][k], b["weights"][name][k]) for k in a["weights"][name])
    assert a["metrics"] == b["metrics"] and len(a["metrics"]) >= 4


def test_ckpt_path_last_with_nothing_to_resume_is_an_error(tmp_path):
    out = soar(tmp_path, -1, "--ckpt_path=last")
    assert out.returncode != 0
    assert "nothing to resume" in out.stderr and str(tmp_path / "runs" / "soar") in out.stderr
    assert not (tmp_path / "runs" / "soar" / "version_0" / "metrics.csv").exists()  # no fresh start


def test_a_second_run_in_the_same_directory_is_refused(tmp_path):
    lock = tmp_path / "run.lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(
            json.dumps({"host": os.uname().nodename, "pid": other.pid, "run_id": "abc", "since": 0})
        )
        with pytest.raises(RunDirectoryInUse, match=rf"in use by run abc .*pid {other.pid}"):
            acquire_lock(lock, "mine")
    finally:
        other.kill()
        other.wait()
    # the owner is gone (kill -9): the lock is taken over
    with pytest.warns(UserWarning, match="taking over"):
        acquire_lock(lock, "mine")
    assert read_lock(lock)["run_id"] == "mine" and read_lock(lock)["pid"] == os.getpid()
    cb = RunDirectory()
    cb._lock = lock
    cb.release()
    assert not lock.exists()


def test_a_run_started_in_a_directory_in_use_stops_before_writing(tmp_path):
    run = tmp_path / "runs" / "soar" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("step,x\n0,1.0\n")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"host": os.uname().nodename, "pid": other.pid, "run_id": "first", "since": 0}
        (run / "run.lock").write_text(json.dumps(lock))
        out = soar(tmp_path, -1, "--trainer.logger.init_args.version=0")
    finally:
        other.kill()
        other.wait()
    assert out.returncode != 0 and "in use by run first" in out.stderr, out.stderr[-2000:]
    assert (run / "metrics.csv").read_text() == "step,x\n0,1.0\n"  # the first run's files untouched
    assert (
        not (run / "promotion_questions.jsonl").exists()
        and json.loads((run / "run.lock").read_text()) == lock
    )


def test_csv_logger_appends_on_resume_and_drops_rows_after_the_checkpoint(tmp_path):
    first = CSVLogger(tmp_path, name="run", version=0)
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step=step)
    first.save()
    # a resumed run in the same directory (Lightning's own CSVLogger deletes metrics.csv here)
    second = CSVLogger(tmp_path, name="run", version=0)
    assert second.drop_rows_from(3) == 2  # steps 3, 4 were logged after the checkpoint
    for step in range(3, 6):
        second.log_metrics({"loss": 10.0 + step, "reward": 1.0}, step=step)
    second.save()
    with open(Path(second.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"]) for r in rows] == [
        ("0", "0.0"), ("1", "1.0"), ("2", "2.0"), ("3", "13.0"), ("4", "14.0"), ("5", "15.0")
    ]  # fmt: skip
    assert rows[0]["reward"] == "" and rows[3]["reward"] == "1.0"


def test_cli_adds_run_directory_and_step_bar_and_outputs_follow_default_root_dir(tmp_path):
    from lit_selfimprove.cli import SelfImproveCLI

    cli = SelfImproveCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=[
            "--config",
            str(REPO / "configs/tiny/student_rlvr.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert RunDirectory in kinds and StepProgressBar in kinds
    assert Path(cli.trainer.logger.log_dir).is_relative_to(tmp_path)


def test_the_bar_counts_steps_out_of_max_steps():
    import lightning as L

    from lit_selfimprove.callbacks.progress import StepProgressBar

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            bar = next(c for c in trainer.callbacks if isinstance(c, StepProgressBar)).train_progress_bar
            seen.append((bar.n, bar.total, bar.desc))

    data = torch.utils.data.DataLoader(torch.ones(3, 1), batch_size=1)  # 3 batches an epoch
    trainer = L.Trainer(
        max_steps=7, callbacks=[StepProgressBar(), Watch()], logger=False, enable_checkpointing=False
    )
    trainer.fit(Tiny(), data)
    assert [n for n, _, _ in seen] == list(range(1, 8)) and {t for _, t, _ in seen} == {7}
    assert seen[-1][2].startswith("step")
