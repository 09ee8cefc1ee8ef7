"""``python -m lit_selfimprove fit --config configs/...yaml`` (LightningCLI, subclass mode)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

import lit_selfimprove.callbacks  # noqa: F401  (short class names resolve)
import lit_selfimprove.datamodules  # noqa: F401
import lit_selfimprove.modules  # noqa: F401
from lit_selfimprove.callbacks.run_directory import (
    RunDirectory,
    RunDirectoryNotFresh,
    check_fresh_run_directory,
)
from lit_selfimprove.moved_settings import check_moved_settings

TOOLS = {
    "failk": "lit_selfimprove.failk",
    "world": "lit_selfimprove.world",
    "sample-questions": "lit_selfimprove.sample_questions",
    "lm-eval": "lit_selfimprove.evaluation.lm_eval_cli",
    "gguf-to-hf": "lit_selfimprove.gguf",
    "memory-estimate": "lit_selfimprove.memory_estimate",
    "math500-mc": "lit_selfimprove.evaluation.tasks.math500_mc",
    "facts-world": "lit_selfimprove.datamodules.facts_world",
    "judge-labels": "lit_selfimprove.datamodules.tiny_judge_labels",
    "soar-corpus": "lit_selfimprove.datamodules.soar_corpus",
    "soar-sip": "lit_selfimprove.soar_sip",
}


class SelfImproveCLI(LightningCLI):
    """LightningCLI with what long runs need.

    * ``fit --ckpt_path=last`` resumes the newest run of the configured logger (its save_dir / name):
      the logger version becomes that run's, so metrics, PQ and students continue in the same run
      directory; with nothing to resume it is an error, not a fresh start.
    * ``--trainer.default_root_dir=DIR``: a logger ``save_dir`` given as a relative path is taken
      relative to DIR, so every output follows it.
    * ``fit --ckpt_path=FILE`` of a run under the logger's save_dir / name continues in that run's
      directory (the logger version becomes the run's); an empty or truncated checkpoint file is an
      error that names it and the checkpoints beside it.
    * a fresh ``fit`` (no ``--ckpt_path``) into a fixed logger version whose directory holds another
      run's outputs is refused (:func:`~lit_selfimprove.callbacks.run_directory.check_fresh_run_directory`).
    * every ``fit`` gets a :class:`~lit_selfimprove.callbacks.RunDirectory` (lock, run id, resumed
      metrics) and, unless another progress bar is configured, a
      :class:`~lit_selfimprove.callbacks.StepProgressBar`.
    * SIGTERM (a scheduler's stop, SLURM preemption) ends ``fit`` with exit status 143 and a message
      naming the run directory and the command that resumes it, within a grace period
      (``LIT_SELFIMPROVE_SIGTERM_GRACE`` seconds, default 30): see :class:`SigtermStop`.
    * a fit that fails removes the run directory it created when it leaves it empty.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        _quiet_known_warnings()
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        self._argv = list(sys.argv[1:] if args is None else args) if not hasattr(args, "items") else None
        if self._argv is not None:
            check_moved_settings(self._argv)  # an old config says where its settings went
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        trainer = config.get("trainer")
        loggers = _logger_configs(trainer)
        root = trainer.get("default_root_dir") if trainer is not None else None
        if root is not None:
            for logger in loggers:
                save_dir = logger.get("save_dir")
                if save_dir is not None and not Path(save_dir).is_absolute():
                    logger["save_dir"] = str(Path(root) / save_dir)
        if self.subcommand != "fit":
            return
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            config["ckpt_path"] = resolve_last_checkpoint(loggers, _checkpoint_dirs(trainer))
        elif ckpt_path is not None and Path(str(ckpt_path)).is_file():
            check_checkpoint_file(Path(str(ckpt_path)))
            _continue_in_run_of(Path(str(ckpt_path)), loggers)
        elif ckpt_path is None:
            for run in _fixed_run_dirs(loggers):
                try:
                    check_fresh_run_directory(run)
                except RunDirectoryNotFresh as error:
                    raise SystemExit(str(error)) from None

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand != "fit":
            return super()._run_subcommand(subcommand)
        run_dir = _run_dir(self.trainer)
        created = run_dir is not None and not run_dir.exists()
        stop = SigtermStop(self.trainer, resume_command(self._argv), sigterm_grace())
        try:
            with stop.installed():
                super()._run_subcommand(subcommand)
        except BaseException as error:
            if created:  # a run that failed (or was stopped) at setup leaves no empty version_N behind
                with contextlib.suppress(OSError):
                    run_dir.rmdir()  # only when empty
            if isinstance(error, SIGTERMException):
                stop.exit_stopped()
            raise

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        from lit_selfimprove.callbacks import StepProgressBar

        present = _as_list(config.get("callbacks")) + list(callbacks)
        extra = []
        fits = self.subcommand in ("fit", None)  # None: run=False, the caller fits
        if fits and not any(isinstance(c, RunDirectory) for c in present):
            extra.append(RunDirectory())
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in present
        ):
            extra.append(StepProgressBar())
        return super()._instantiate_trainer(config, list(callbacks) + extra)


def _as_list(value) -> list:
    """A config value that may be one item, a list of them, or ``None``, as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _logger_configs(trainer) -> list:
    """The ``init_args`` of the configured loggers (class_path form), empty for none / ``True``."""
    if trainer is None:
        return []
    items = _as_list(trainer.get("logger"))
    return [item["init_args"] for item in items if hasattr(item, "get") and item.get("init_args") is not None]


def _checkpoint_dirs(trainer) -> list[str]:
    """``dirpath`` of the configured ModelCheckpoint callbacks that set one."""
    items = _as_list(trainer.get("callbacks") if trainer is not None else None)
    dirs = []
    for item in items:
        if hasattr(item, "get") and str(item.get("class_path", "")).endswith("ModelCheckpoint"):
            dirpath = (item.get("init_args") or {}).get("dirpath")
            if dirpath:
                dirs.append(str(dirpath))
    return dirs


def _logger_root(logger) -> Path:
    return Path(logger.get("save_dir") or ".") / (logger.get("name") or "lightning_logs")


def _version_dir_name(version) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def _fixed_run_dirs(loggers: list) -> list[Path]:
    """The run directories of the loggers whose ``version`` is set (where a fresh run may find an old one)."""
    return [
        _logger_root(lg) / _version_dir_name(lg["version"]) for lg in loggers if lg.get("version") is not None
    ]


def _version_order(run: Path) -> tuple:
    """Sort key of ``version_N`` folders: by N (``version_10`` after ``version_9``), then by mtime."""
    tail = run.name.partition("_")[2]
    return (int(tail) if tail.isdigit() else -1, run.stat().st_mtime)


def _continue_in_run_of(ckpt: Path, loggers: list) -> None:
    """``--ckpt_path=<root>/<version>/checkpoints/X.ckpt``: the resumed run writes into that run directory
    (not a new version) when the first logger has no version of its own."""
    if not loggers or loggers[0].get("version") is not None:
        return
    run = ckpt.resolve().parent.parent
    if ckpt.resolve().parent.name == "checkpoints" and run.parent == _logger_root(loggers[0]).resolve():
        loggers[0]["version"] = run.name
        rank_zero_info(f"--ckpt_path: resuming the run in {run}")


def check_checkpoint_file(path: Path) -> None:
    """Stop with a message naming ``path`` (and the checkpoints beside it) when it is empty or truncated.

    Lightning writes checkpoints in place, so a run killed while writing one (or a full disk) leaves
    a zero-byte or truncated file, and loading it fails with a bare ``EOFError``.
    """
    size = path.stat().st_size
    if size > 0:
        with path.open("rb") as f:
            zip_format = f.read(2) == b"PK"  # torch.save's format (an old pickle-format file is not checked)
        if not zip_format or zipfile.is_zipfile(path):
            return
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p != path and p.stat().st_size > 0),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    hint = (
        f" The previous checkpoint there is {others[0]}: resume from it with --ckpt_path={others[0]}."
        if others
        else " There is no other checkpoint beside it: start the run again without --ckpt_path."
    )
    state = "empty (0 bytes)" if size == 0 else f"truncated ({size} bytes)"
    raise SystemExit(
        f"checkpoint {path} is {state}: the run was probably killed while writing it, or the disk was full."
        + hint
    )


def resolve_last_checkpoint(loggers: list, checkpoint_dirs: list[str]) -> str:
    """``last.ckpt`` of the newest run, with the logger version set to that run (or an error).

    Looks in the configured ModelCheckpoint ``dirpath`` first, else in
    ``<save_dir>/<name>/<version>/checkpoints/`` of the first logger: the given version, or the
    newest ``version_*`` (highest N) that is not empty. When that newest run has no ``last.ckpt``
    (it died before its first checkpoint), this is an error naming it, rather than a silent resume of
    an older, perhaps finished, run.
    """
    for dirpath in checkpoint_dirs:
        path = Path(dirpath) / ModelCheckpoint.CHECKPOINT_NAME_LAST
        path = path.with_suffix(ModelCheckpoint.FILE_EXTENSION)
        if path.is_file():
            check_checkpoint_file(path)
            rank_zero_info(f"--ckpt_path=last: resuming from {path}")
            return str(path)
    looked = [f"{d}/last.ckpt" for d in checkpoint_dirs]
    if loggers:
        logger = loggers[0]
        root = _logger_root(logger)
        version = logger.get("version")
        if version is not None:
            runs = [root / _version_dir_name(version)]
        else:  # empty folders (runs that failed at setup) hold nothing to resume or to lose
            runs = sorted(
                (p for p in root.glob("version_*") if p.is_dir() and any(p.iterdir())), key=_version_order
            )
        last = runs[-1] / "checkpoints" / "last.ckpt" if runs else None
        if last is not None and last.is_file():
            check_checkpoint_file(last)
            logger["version"] = runs[-1].name  # the resumed run writes into its own directory
            saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.stat().st_mtime))
            rank_zero_info(f"--ckpt_path=last: resuming the run in {runs[-1]} from {last} (saved {saved})")
            return str(last)
        if version is None and runs:
            older = [run for run in runs[:-1] if (run / "checkpoints" / "last.ckpt").is_file()]
            raise SystemExit(
                f"--ckpt_path=last: the newest run, {runs[-1]}, has no checkpoints/last.ckpt (it stopped before "
                "its first checkpoint), so it cannot be resumed."
                + (
                    f" To resume the older run {older[-1]} instead, add "
                    f"--trainer.logger.init_args.version={older[-1].name}."
                    if older
                    else ""
                )
                + " To start afresh, run without --ckpt_path."
            )
        looked.append(f"{root}/{version if version is not None else 'version_*'}/checkpoints/last.ckpt")
    raise SystemExit(
        "--ckpt_path=last: nothing to resume (no "
        + (" or ".join(looked) if looked else "logger or ModelCheckpoint dirpath to look in")
        + "). Start the run without --ckpt_path, or pass the checkpoint file."
    )


# ------------------------------------------------------------------------------------------ SIGTERM
SIGTERM_GRACE_ENV = "LIT_SELFIMPROVE_SIGTERM_GRACE"
DEFAULT_SIGTERM_GRACE = 30.0
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def sigterm_grace() -> float:
    """Seconds a SIGTERM'd ``fit`` waits for the step in progress to end (``LIT_SELFIMPROVE_SIGTERM_GRACE``)."""
    value = os.environ.get(SIGTERM_GRACE_ENV, "").strip()
    if not value:
        return DEFAULT_SIGTERM_GRACE
    try:
        grace = float(value)
    except ValueError:
        grace = -1.0
    if not grace >= 0:
        raise SystemExit(f"{SIGTERM_GRACE_ENV}={value!r}: expected a number of seconds >= 0 (e.g. 30)")
    return grace


def resume_command(argv: list[str] | None) -> str:
    """The command line that resumes this run: the same one with ``--ckpt_path=last``."""
    if argv is None:
        return "the same command with --ckpt_path=last"
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True  # its value follows
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    program = sys.argv[0] if sys.argv else ""
    if Path(program).name == "lit-selfimprove":  # the console script
        prefix = ["lit-selfimprove"]
    elif program.endswith(".py") and Path(program).name != "__main__.py":  # a script of the user's
        prefix = ["python", program]
    else:  # python -m lit_selfimprove, or main() called from Python
        prefix = ["python", "-m", "lit_selfimprove"]
    return shlex.join(prefix + kept + ["--ckpt_path=last"])


def _run_dir(trainer: Trainer) -> Path | None:
    """The run directory of the trainer's first logger, ``None`` without one (or when it cannot be told)."""
    try:
        return Path(trainer.logger.log_dir) if trainer.logger is not None and trainer.logger.log_dir else None
    except Exception:  # a logger whose log_dir needs a live experiment or process group
        return None


class SigtermStop:
    """What a ``fit`` does on SIGTERM: stop within a grace period, exit 143, say how to resume.

    Lightning's own handling finishes the step in progress, checkpoints it, then exits with status 0
    and no word that the run is incomplete, so a scheduler or a shell ``&&`` takes it for a finished
    run; and a step of a real model can take many minutes, longer than a scheduler waits. Here:

    * the step in progress may end (and be checkpointed) within ``grace`` seconds; then the run exits
      with 143 (128 + SIGTERM), naming the run directory, its last checkpoint and the resume command;
    * if it does not, the step is abandoned: the process exits with 143 at once, without writing a
      checkpoint mid-step. Resuming from the last checkpoint is exact (a run killed outright resumes
      bit-identically), only the abandoned step's work is redone. A second SIGTERM abandons at once.
    * SIGTERM before training starts (loading models) stops the run at once.

    Ctrl-C keeps Lightning's behaviour (a graceful stop with exit status 1).
    """

    def __init__(self, trainer: Trainer, resume: str, grace: float):
        self.trainer = trainer
        self.resume = resume
        self.grace = grace
        self.received_at: float | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._done = False
        self._before_training = False

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGTERM in the block (the main thread only: signals cannot be handled elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield self
        finally:
            if self._timer is not None:
                self._timer.cancel()
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        if self.received_at is not None:
            self._abandon(reason="was interrupted by a second SIGTERM")
            return
        self.received_at = time.monotonic()
        # Lightning installs its handler (which ours is composed into) only for the training loop
        in_loop = isinstance(signal.getsignal(signal.SIGTERM), _HandlersCompose)
        if not in_loop and self.trainer.state.status != TrainerStatus.FINISHED:
            self._before_training = True
            _say("SIGTERM before training started: stopping now.")
            raise SIGTERMException()  # setup, loading models: no step to finish
        _say(
            f"SIGTERM: finishing the step in progress (step {self.trainer.global_step}) and checkpointing it, "
            f"for at most {self.grace:g} s ({SIGTERM_GRACE_ENV}); then exiting with status {SIGTERM_EXIT_CODE}."
        )
        reason = f"did not end within {self.grace:g} s"
        self._timer = threading.Timer(self.grace, self._abandon, kwargs={"reason": reason})
        self._timer.daemon = True
        self._timer.start()

    def _abandon(self, reason: str) -> None:
        """Exit now (from the timer thread or a second SIGTERM), without a checkpoint of this step."""
        with self._lock:
            if self._done:
                return
            self._done = True
        step = self.trainer.global_step
        lines = [f"SIGTERM: step {step} {reason}; it is abandoned without a checkpoint (resuming redoes it)."]
        for cb in self.trainer.callbacks:  # free the run directory now: the resume needs no lock takeover
            if isinstance(cb, RunDirectory):
                with contextlib.suppress(Exception):
                    cb.release()
        for logger in self.trainer.loggers:  # metric rows of the checkpointed steps
            with contextlib.suppress(Exception):
                logger.save()
        _say("\n".join(lines + self._summary()))
        sys.stdout.flush()
        os._exit(SIGTERM_EXIT_CODE)

    def exit_stopped(self) -> None:
        """The training loop stopped after the step in progress: report and exit with 143."""
        with self._lock:
            abandoning = self._done
            self._done = True
        if abandoning:  # the timer thread is exiting the process (os._exit): let it
            time.sleep(60)
        if self._timer is not None:
            self._timer.cancel()
        where = "before training started" if self._before_training else "at the end of the step in progress"
        _say("\n".join([f"SIGTERM: the run stopped {where}."] + self._summary()))
        raise SystemExit(SIGTERM_EXIT_CODE)

    def _summary(self) -> list[str]:
        trainer = self.trainer
        total = f" of {trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        done = "" if self._before_training else f": {trainer.global_step}{total} steps done"
        lines = [f"  The run is NOT finished{done}."]
        run_dir = _run_dir(trainer)
        if run_dir is not None:
            lines.append(f"  Run directory: {run_dir}")
        ckpt = _last_checkpoint(trainer)
        if ckpt is None:
            lines.append(
                "  It wrote no checkpoint, so it cannot be resumed: run the command again without "
                "--ckpt_path (with a fixed logger version, choose another one or delete the run directory)."
            )
        else:
            lines += [
                f"  Last checkpoint: {ckpt}",
                f"  Resume it (exactly) from {os.getcwd()} with:",
                f"    {self.resume}",
            ]
        return lines


def _last_checkpoint(trainer: Trainer) -> str | None:
    """The newest checkpoint of this run: saved by its ModelCheckpoint callbacks, resumed from, or in
    its run directory's ``checkpoints/``."""
    known = [trainer.ckpt_path] + [
        getattr(cb, name, "")
        for cb in trainer.checkpoint_callbacks
        for name in ("last_model_path", "best_model_path")
    ]
    paths = [Path(p) for p in known if p and Path(p).is_file()]
    run_dir = _run_dir(trainer)
    if run_dir is not None:
        paths += list((run_dir / "checkpoints").glob("*.ckpt"))
    return str(max(paths, key=lambda p: p.stat().st_mtime)) if paths else None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet_known_warnings() -> None:
    """Silence warnings that are noise for this project's runs (each with why)."""
    # noise from Lightning's own internals (pytree API change), not actionable by users
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # ProblemStream gives each worker its own batches: its __len__ is exact
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # the modules here optimize manually; a checkpoint taken at the end of a step holds the state after
    # that step, which is what a resume needs (the SIGKILL test resumes bit-identically from it)
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")


def main(args: list[str] | None = None) -> LightningCLI | None:
    """Run LightningCLI; ``failk ...`` / ``world ...`` / ``sample-questions ...`` / ``lm-eval ...``
    dispatch to the tools."""
    _quiet_known_warnings()
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOLS:
        import importlib

        importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
        return None
    return SelfImproveCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,  # None: LightningCLI reads sys.argv itself
    )
