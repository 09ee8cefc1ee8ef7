"""RunDirectory: one run per run directory, a run id, and a history that a resume continues.

Long runs write several files into their log dir (metrics, PQ, promoted students, plots, the
final teacher). Two runs given the same directory would interleave and overwrite them silently,
so a run takes the directory for itself: ``run.lock`` holds the owner's host, pid and run id, and
a second run stops with an error naming the first. A lock left by a dead process on this host (a
``kill -9``) is taken over with a warning; a lock of another host is never taken over silently.
A new run (no checkpoint to resume) is refused a directory that already holds another run's
outputs (:func:`check_fresh_run_directory`; the CLI checks a fixed logger ``version`` before it
builds anything), since the lock guards only live runs.

The run id (a short random hex string, logged at the start) is kept in checkpoints, so a resumed
run is the same run: PQ rows carry it. On resume, rows that :class:`lit_selfimprove.loggers.CSVLogger`
holds for steps at or after the checkpoint (logged by the crashed run after its last checkpoint)
are dropped, since the resumed run logs them again.

The CLI adds this callback to every ``fit`` that has none.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class RunDirectoryInUse(RuntimeError):
    """Another live run owns the run directory."""


class RunDirectoryNotFresh(RuntimeError):
    """A fresh run (no checkpoint to resume) was given a directory that holds another run's outputs."""


class RunDirectory(Callback):
    """Lock the run directory, give the run an id, continue the metrics history on resume.

    Args:
        lock_filename: name of the lock file in the run directory.
    """

    def __init__(self, lock_filename: str = "run.lock"):
        self.lock_filename = lock_filename
        self.run_id = uuid.uuid4().hex[:12]
        self._lock: Path | None = None

    # ---------------------------------------------------------------------------- lock
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        out = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank asks
        if trainer.is_global_zero:
            self._lock = acquire_lock(out / self.lock_filename, self.run_id)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.ckpt_path is not None:
            for logger in trainer.loggers:
                drop = getattr(logger, "drop_rows_from", None)
                if callable(drop) and trainer.is_global_zero:
                    gone = drop(trainer.global_step)
                    if gone:
                        rank_zero_info(
                            f"RunDirectory: dropped {gone} metric rows logged after the checkpoint"
                        )
            rank_zero_info(f"Resuming run {self.run_id} at step {trainer.global_step}; outputs in {out}")
        else:
            rank_zero_info(f"Run {self.run_id}: outputs in {out}")
        if self._lock is not None:  # the id may come from the checkpoint: keep the lock's up to date
            write_lock(self._lock, self.run_id)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.release()

    def release(self) -> None:
        if self._lock is not None:
            owner = read_lock(self._lock)
            if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self._lock.unlink(missing_ok=True)
            self._lock = None

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run_id = state_dict["run_id"]


def run_id_of(trainer: Trainer) -> str | None:
    """The id of the trainer's run (its :class:`RunDirectory`), ``None`` without one."""
    for cb in getattr(trainer, "callbacks", None) or []:
        if isinstance(cb, RunDirectory):
            return cb.run_id
    return None


# ------------------------------------------------------------------------------- lock files
def read_lock(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_lock(path: Path, run_id: str) -> None:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id, "since": time.time()}
    path.write_text(json.dumps(info) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def held_by_live_run(path: Path) -> bool:
    """Whether the lock file ``path`` belongs to a live process (another host's lock counts as live)."""
    owner = read_lock(path)
    if not owner:
        return path.exists()  # unreadable: someone is writing it
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname():
        return True
    return isinstance(pid, int) and pid != os.getpid() and _alive(pid)


def check_fresh_run_directory(path: Path, lock_filename: str = "run.lock") -> None:
    """Refuse to start a new run in ``path`` when it holds the outputs of another run.

    A run given a fixed logger ``version`` (the usual way to name runs) writes into that directory
    whatever is there: after a finished or crashed run it would append its PQ rows and metrics to the
    old ones, overwrite the old teacher, or write ``last-v1.ckpt`` next to the old ``last.ckpt`` (so
    a later ``--ckpt_path=last`` restores the old run). An empty directory, or one whose only entry
    is the lock of a dead run, is fine. A live lock is left to :class:`RunDirectory`, which names its
    owner.
    """
    if not path.is_dir():
        return
    lock = path / lock_filename
    if lock.exists() and held_by_live_run(lock):
        return
    outputs = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if p.name != lock_filename)
    if not outputs:
        return
    has_checkpoint = (path / "checkpoints").is_dir() and any((path / "checkpoints").glob("*.ckpt"))
    shown = ", ".join(outputs[:6]) + (", ..." if len(outputs) > 6 else "")
    raise RunDirectoryNotFresh(
        f"{path} holds the outputs of another run ({shown}): a new run there would mix its metrics, PQ "
        "rows, students and checkpoints with them. "
        + (
            "To continue that run, add --ckpt_path=last; "
            if has_checkpoint
            else "That run has no checkpoint, so it cannot be resumed; "
        )
        + "to start a new run, choose another logger version (--trainer.logger.init_args.version=...) "
        "or save_dir, or delete the directory."
    )


def acquire_lock(path: Path, run_id: str) -> Path:
    """Create ``path`` for this process, or raise :class:`RunDirectoryInUse` naming its live owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = read_lock(path)
            host, pid = owner.get("host"), owner.get("pid")
            if (
                host == socket.gethostname()
                and isinstance(pid, int)
                and (pid == os.getpid() or not _alive(pid))
            ):
                if pid != os.getpid():
                    rank_zero_warn(
                        f"{path}: taking over the lock of run {owner.get('run_id')} (pid {pid} is gone)"
                    )
                path.unlink(missing_ok=True)
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
            raise RunDirectoryInUse(
                f"{path.parent} is in use by run {owner.get('run_id')} (host {host}, pid {pid}, since {since}): "
                "two runs in one directory would mix their metrics, PQ rows and students. Give this run "
                "another logger version / save_dir, or delete the lock file if that run is dead."
            ) from None
        os.close(fd)
        write_lock(path, run_id)
        return path
    raise RunDirectoryInUse(f"could not take the lock {path}")
