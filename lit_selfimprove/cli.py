"""``python -m lit_selfimprove fit --config configs/...yaml`` (LightningCLI, subclass mode)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

import lit_selfimprove.callbacks  # noqa: F401  (short class names resolve)
import lit_selfimprove.datamodules  # noqa: F401
import lit_selfimprove.modules  # noqa: F401

TOOLS = {
    "failk": "lit_selfimprove.failk",
    "world": "lit_selfimprove.world",
    "sample-questions": "lit_selfimprove.sample_questions",
    "lm-eval": "lit_selfimprove.evaluation.lm_eval",
    "memory-estimate": "lit_selfimprove.memory_estimate",
}


class SelfImproveCLI(LightningCLI):
    """LightningCLI with what long runs need.

    * ``fit --ckpt_path=last`` resumes the newest run of the configured logger (its save_dir / name):
      the logger version becomes that run's, so metrics, PQ and students continue in the same run
      directory; with nothing to resume it is an error, not a fresh start.
    * ``--trainer.default_root_dir=DIR``: a logger ``save_dir`` given as a relative path is taken
      relative to DIR, so every output follows it.
    * every ``fit`` gets a :class:`~lit_selfimprove.callbacks.RunDirectory` (lock, run id, resumed
      metrics) and, unless another progress bar is configured, a
      :class:`~lit_selfimprove.callbacks.StepProgressBar`.
    """

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
        if self.subcommand == "fit" and config.get("ckpt_path") == "last":
            config["ckpt_path"] = resolve_last_checkpoint(loggers, _checkpoint_dirs(trainer))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        from lit_selfimprove.callbacks import RunDirectory, StepProgressBar

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


def resolve_last_checkpoint(loggers: list, checkpoint_dirs: list[str]) -> str:
    """``last.ckpt`` of the newest run, with the logger version set to that run (or an error).

    Looks in the configured ModelCheckpoint ``dirpath`` first, else in
    ``<save_dir>/<name>/<version>/checkpoints/`` of the first logger (the given version, or the
    newest ``version_*`` that holds a ``last.ckpt``).
    """
    for dirpath in checkpoint_dirs:
        path = Path(dirpath) / ModelCheckpoint.CHECKPOINT_NAME_LAST
        path = path.with_suffix(ModelCheckpoint.FILE_EXTENSION)
        if path.is_file():
            return str(path)
    looked = [f"{d}/last.ckpt" for d in checkpoint_dirs]
    if loggers:
        logger = loggers[0]
        root = Path(logger.get("save_dir") or ".") / (logger.get("name") or "lightning_logs")
        version = logger.get("version")
        if version is not None:
            runs = [root / (version if isinstance(version, str) else f"version_{version}")]
        else:
            runs = sorted(root.glob("version_*"), key=lambda p: p.stat().st_mtime)
        found = [run for run in runs if (run / "checkpoints" / "last.ckpt").is_file()]
        if found:
            run = max(found, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime)
            logger["version"] = run.name  # the resumed run writes into its own directory
            return str(run / "checkpoints" / "last.ckpt")
        looked.append(f"{root}/{version if version is not None else 'version_*'}/checkpoints/last.ckpt")
    raise SystemExit(
        "--ckpt_path=last: nothing to resume (no "
        + (" or ".join(looked) if looked else "logger or ModelCheckpoint dirpath to look in")
        + "). Start the run without --ckpt_path, or pass the checkpoint file."
    )


def main(args: list[str] | None = None) -> LightningCLI | None:
    """Run LightningCLI; ``failk ...`` / ``world ...`` / ``sample-questions ...`` / ``lm-eval ...``
    dispatch to the tools."""
    # noise from Lightning's own internals (pytree API change), not actionable by users
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # ProblemStream gives each worker its own batches: its __len__ is exact
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
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
