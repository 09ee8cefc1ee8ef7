"""Long runs survive: ``--ckpt_path=last`` resumes the same run exactly, metrics are appended, one run
per directory, outputs follow ``--trainer.default_root_dir``, the bar counts steps."""

from __future__ import annotations

import csv
import json
import os
import shlex
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
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: 1, save_last: true, save_top_k: 0}}
    - class_path: _kill_at.KillAt
      init_args: {{step: {kill}}}
    - class_path: _kill_at.TermAt
      init_args: {{step: {term}, hang: {hang}}}
model:
  init_args:
    num_datasets: 2
    dataset_size: 4
    num_repeats: 1
    teacher_sampling: {{max_new_tokens: 120}}
    promotion: {{tau: -1.0, window: 1, require_improvement: false}}
    inner:
      steps: 1
      batch: 2
      group_size: 2
      max_new_tokens: 24
    log_samples_every: 1
data:
  init_args: {{batch_size: 4}}
"""


def soar(
    root: Path, kill: int = -1, *extra: str, term: int = -1, hang: bool = False, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The fast SOAR run in ``root``: SIGKILL after step ``kill``'s files, SIGTERM at the start of step ``term``."""
    root.mkdir(parents=True, exist_ok=True)
    override = root / f"fast_{kill}_{term}_{hang}.yaml"
    override.write_text(FAST.format(kill=kill, term=term, hang=str(hang).lower()))
    cmd = [
        sys.executable, "-m", "lit_selfimprove", "fit", "--config", "configs/tiny/soar.yaml",
        "--config", str(override), f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        *extra,
    ]  # fmt: skip
    return run_cli(cmd, env, timeout=120 if hang else 600)  # hang: the step sleeps 600 s


def run_cli(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


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


def printed_resume_command(stderr: str) -> list[str]:
    """The command a stopped run printed to resume it, runnable here (``python`` -> this interpreter)."""
    lines = stderr.splitlines()
    at = next(i for i, line in enumerate(lines) if f"Resume it (exactly) from {REPO} with:" in line)
    cmd = shlex.split(lines[at + 1])
    assert cmd[:3] == ["python", "-m", "lit_selfimprove"] and cmd[-1] == "--ckpt_path=last", cmd
    return [sys.executable, *cmd[1:]]


def assert_finished(run: Path, steps: int) -> None:
    out = outputs(run)
    assert out["step"] == steps and (run / "teacher").is_dir()
    assert [r["step"] for r in out["pq"]] == [s for s in range(steps) for _ in range(4)]
    assert len({r["run_id"] for r in out["pq"]}) == 1  # one run, resumed
    assert not (run / "run.lock").exists()


def test_sigterm_mid_step_checkpoints_that_step_exits_143_and_the_printed_command_resumes(tmp_path):
    stopped = soar(tmp_path, term=1)  # SIGTERM during outer step 1 (of 0..3)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    run = tmp_path / "runs" / "soar" / "version_0"
    assert "NOT finished: 2 of 4 steps done" in stopped.stderr and f"Run directory: {run}" in stopped.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not (run / "teacher").exists() and not (run / "run.lock").exists()
    assert "manual optimization" not in stopped.stderr  # Lightning's 14-line warning, harmless here
    resumed = run_cli(printed_resume_command(stopped.stderr))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming the run in {run}" in resumed.stderr
    assert_finished(run, 4)


@pytest.mark.slow  # like the test above (~20 s), for the other path
def test_sigterm_in_a_step_that_outlasts_the_grace_period_exits_143_at_once_without_a_checkpoint(tmp_path):
    grace = {"LIT_SELFIMPROVE_SIGTERM_GRACE": "1"}
    stopped = soar(tmp_path, term=2, hang=True, env=grace)  # step 2 would sleep 600 s
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "step 2 did not end within 1 s; it is abandoned without a checkpoint" in stopped.stderr
    run = tmp_path / "runs" / "soar" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2  # not 3
    assert not (run / "run.lock").exists()  # released: the resume starts without a takeover
    (tmp_path / "fast_-1_2_True.yaml").write_text(
        FAST.format(kill=-1, term=-1, hang="false")
    )  # no SIGTERM now
    resumed = run_cli(printed_resume_command(stopped.stderr))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "taking over" not in resumed.stderr
    assert_finished(run, 4)


def test_ckpt_path_last_with_nothing_to_resume_is_an_error(tmp_path):
    out = soar(tmp_path, -1, "--ckpt_path=last")
    assert out.returncode != 0
    assert "nothing to resume" in out.stderr and str(tmp_path / "runs" / "soar") in out.stderr
    assert not (tmp_path / "runs" / "soar" / "version_0" / "metrics.csv").exists()  # no fresh start


def fake_run(run: Path, *, ckpt: bool = True, step: int = 3) -> Path:
    """A run directory as a run leaves it: metrics, PQ rows and (``ckpt``) checkpoints/last.ckpt."""
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "metrics.csv").write_text("step,x\n0,1.0\n")
    (run / "promotion_questions.jsonl").write_text('{"step": 0}\n')
    if ckpt:
        torch.save({"global_step": step}, run / "checkpoints" / "last.ckpt")
    return run


def cli_error(tmp_path: Path, *args: str) -> str:
    """The message a ``fit`` stops with before it builds anything (SystemExit with a text)."""
    from lit_selfimprove.cli import main

    with pytest.raises(SystemExit) as stop:
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs/tiny/soar.yaml"),
                f"--trainer.default_root_dir={tmp_path}",
                *args,
            ]
        )
    assert isinstance(stop.value.code, str), stop.value.code
    return stop.value.code


@pytest.mark.parametrize("ckpt", [True, False], ids=["finished", "died-before-a-checkpoint"])
def test_a_fresh_run_into_a_fixed_version_that_holds_another_run_is_refused(tmp_path, ckpt):
    run = fake_run(tmp_path / "runs" / "soar" / "version_0", ckpt=ckpt)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    message = cli_error(tmp_path, "--trainer.logger.init_args.version=0")
    assert f"{run} holds the outputs of another run" in message and "another logger version" in message
    assert ("add --ckpt_path=last" in message) == ckpt
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


def test_a_fresh_run_may_use_an_empty_directory_or_one_with_only_a_dead_runs_lock(tmp_path):
    from lit_selfimprove.callbacks.run_directory import check_fresh_run_directory

    check_fresh_run_directory(tmp_path / "missing")
    check_fresh_run_directory(tmp_path)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock = {"host": os.uname().nodename, "pid": int(gone.stdout), "run_id": "dead", "since": 0}
    (tmp_path / "run.lock").write_text(json.dumps(lock))
    check_fresh_run_directory(tmp_path)


def test_ckpt_path_last_refuses_when_the_newest_run_has_no_checkpoint(tmp_path):
    from lit_selfimprove.cli import resolve_last_checkpoint

    root = tmp_path / "runs" / "soar"
    fake_run(root / "version_9")
    fake_run(root / "version_10", ckpt=False)  # newer (10 > 9), died before its first checkpoint
    (root / "version_11").mkdir()  # empty: a run that failed at setup, nothing there
    logger = {"save_dir": str(tmp_path / "runs"), "name": "soar", "version": None}
    with pytest.raises(SystemExit, match=r"newest run, .*version_10, has no checkpoints/last\.ckpt") as stop:
        resolve_last_checkpoint([logger], [])
    assert "--trainer.logger.init_args.version=version_9" in str(stop.value) and logger["version"] is None
    logger["version"] = "version_9"  # what the message says to add
    assert resolve_last_checkpoint([logger], []) == str(root / "version_9" / "checkpoints" / "last.ckpt")
    fake_run(root / "version_10")  # now it has one: the newest is resumed
    logger["version"] = None
    assert resolve_last_checkpoint([logger], []) == str(root / "version_10" / "checkpoints" / "last.ckpt")
    assert logger["version"] == "version_10"


def test_an_empty_last_ckpt_is_an_error_naming_it_and_the_checkpoint_beside_it(tmp_path):
    from lit_selfimprove.cli import resolve_last_checkpoint

    run = fake_run(tmp_path / "runs" / "soar" / "version_0")
    previous = run / "checkpoints" / "epoch=0-step=3.ckpt"
    (run / "checkpoints" / "last.ckpt").replace(previous)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")  # killed while writing it
    logger = {"save_dir": str(tmp_path / "runs"), "name": "soar", "version": None}
    with pytest.raises(SystemExit) as stop:
        resolve_last_checkpoint([logger], [])
    assert f"checkpoint {run / 'checkpoints' / 'last.ckpt'} is empty (0 bytes)" in str(stop.value)
    assert f"--ckpt_path={previous}" in str(stop.value)
    # that command resumes in the same run directory, not in a new version
    from lit_selfimprove.cli import _continue_in_run_of

    _continue_in_run_of(previous, [logger])
    assert logger["version"] == "version_0"


def test_a_truncated_checkpoint_is_an_error_and_a_whole_one_passes(tmp_path):
    from lit_selfimprove.cli import check_checkpoint_file

    whole = tmp_path / "whole.ckpt"
    torch.save({"global_step": 1}, whole)
    check_checkpoint_file(whole)
    cut = tmp_path / "last.ckpt"
    cut.write_bytes(whole.read_bytes()[:100])
    with pytest.raises(SystemExit, match=rf"{cut} is truncated \(100 bytes\).*--ckpt_path={whole}"):
        check_checkpoint_file(cut)


def test_the_resume_command_is_the_run_command_with_ckpt_path_last(monkeypatch):
    from lit_selfimprove.cli import resume_command, sigterm_grace

    monkeypatch.setattr(sys, "argv", ["/x/lit_selfimprove/__main__.py"])
    args = ["fit", "--config", "my runs/a.yaml", "--ckpt_path", "old.ckpt", "--ckpt_path=last"]
    assert resume_command(args) == "python -m lit_selfimprove fit --config 'my runs/a.yaml' --ckpt_path=last"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/lit-selfimprove"])
    assert resume_command(["fit"]) == "lit-selfimprove fit --ckpt_path=last"
    monkeypatch.setenv("LIT_SELFIMPROVE_SIGTERM_GRACE", "2.5")
    assert sigterm_grace() == 2.5
    monkeypatch.setenv("LIT_SELFIMPROVE_SIGTERM_GRACE", "soon")
    with pytest.raises(
        SystemExit, match="LIT_SELFIMPROVE_SIGTERM_GRACE='soon': expected a number of seconds"
    ):
        sigterm_grace()


def test_a_run_that_fails_at_setup_removes_the_empty_run_directory_it_created(tmp_path):
    from lit_selfimprove.cli import main

    pre = tmp_path / "runs" / "soar" / "version_0"
    pre.mkdir(parents=True)  # empty, but not this run's: kept
    for version in ([], ["--trainer.logger.init_args.version=0"]):
        with pytest.raises(FileNotFoundError, match="nonexistent"):
            main(["fit", "--config", str(REPO / "configs/tiny/soar.yaml"), f"--trainer.default_root_dir={tmp_path}",
                  "--data.init_args.train_source=/nonexistent.jsonl", *version])  # fmt: skip
    assert sorted(p.name for p in pre.parent.iterdir()) == ["version_0"] and not any(pre.iterdir())


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
