"""Loggers: Lightning's CSVLogger, with a history that survives a resume; a Neptune logger (Lightning
2.6.2 dropped its own); :func:`log_table`, the one way the modules' sample tables reach any logger."""

from __future__ import annotations

import contextlib
import csv
import functools
import html
import json
import os
import warnings
from argparse import Namespace
from collections.abc import Iterable, Sequence
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.logger import _add_prefix, _convert_params, _sanitize_callable_params
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

__all__ = ["CSVLogger", "NeptuneLogger", "log_table"]


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` that appends to an existing ``metrics.csv`` instead of deleting it.

    Lightning's writer removes ``metrics.csv`` when its folder exists, so a run resumed in place
    (same ``version``) loses the rows of the steps before the crash, and every plot drawn from the
    file loses them too. Here the rows are kept and the new ones appended under the same header;
    :meth:`drop_rows_from` (called by :class:`~lit_selfimprove.callbacks.RunDirectory` on resume)
    removes the rows logged after the checkpoint, which the resumed run logs again.
    """

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        header, rows = _read_csv(path)
        with warnings.catch_warnings():  # "Previous log files ... will be deleted": not here
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            experiment = super().experiment  # Lightning's writer: removes the file
        if header:
            _write_csv(path, header, rows)
            experiment.metrics_keys = list(header)  # appended rows use the same columns
        return experiment

    def drop_rows_from(self, step: int) -> int:
        """Remove the rows whose ``step`` is >= ``step``; returns how many went."""
        self.save()
        path = os.path.join(self.log_dir, "metrics.csv")
        header, rows = _read_csv(path)
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        if len(kept) < len(rows):
            _write_csv(path, header, kept)
        return len(rows) - len(kept)


def _read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
    if not os.path.isfile(path):
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _write_csv(path: str, header: list[str], rows: list[dict[str, str]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- tables
def log_table(
    loggers: Iterable[Logger], key: str, rows: Sequence[dict], step: int | None = None
) -> list[str]:
    """Log ``rows`` (dicts, one per table row) as the table ``key`` through every logger that has a
    table API; returns the class names of the loggers that took it.

    * a ``log_table(key, columns, data, step=...)`` method (WandB, :class:`NeptuneLogger`): called;
    * an experiment with ``add_text`` (TensorBoard's ``SummaryWriter``): a markdown table, tag ``key``;
    * anything else (CSVLogger...): skipped. A logger that fails is warned about, never fatal.

    Columns are the union of the rows' keys in first-seen order; a cell that is not a scalar
    (SIP's candidate lists) is written as JSON.
    """
    if not rows:
        return []
    columns = list(dict.fromkeys(k for row in rows for k in row))
    data = [[_cell(row.get(c)) for c in columns] for row in rows]
    took = []
    for logger in loggers:
        try:
            method = getattr(logger, "log_table", None)
            if callable(method):
                method(key=key, columns=columns, data=data, step=step)
            elif callable(add_text := getattr(getattr(logger, "experiment", None), "add_text", None)):
                add_text(key, _markdown_table(columns, data), global_step=step)
            else:
                continue
        except Exception as err:  # a table is a convenience: never stop a run for it
            rank_zero_warn(f"{type(logger).__name__} could not log the table {key!r}: {err!r}")
            continue
        took.append(type(logger).__name__)
    return took


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, default=str)


def _markdown_table(columns: list[str], data: list[list[Any]]) -> str:
    def text(value: Any) -> str:
        return html.escape(str(value)).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(text(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- Neptune
def _catch_inactive(func):
    """A stopped / inactive Neptune run warns instead of failing the training."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from neptune.exceptions import InactiveRunException

        try:
            return func(*args, **kwargs)
        except InactiveRunException:
            rank_zero_warn("NeptuneLogger: the run is no longer active; nothing more is logged to it.")

    return wrapper


class NeptuneLogger(Logger):
    """Log to Neptune with the ``neptune`` 1.x client (``pip install -e ".[neptune]"``).

    Lightning's own ``NeptuneLogger`` raises since Lightning 2.6.2 ("Neptune has been sunset");
    this one keeps its layout: metrics as series ``<prefix>/<metric>``, hyper-parameters under
    ``<prefix>/hyperparams``, the final status at ``<prefix>/status``, and the modules' sample
    tables (:func:`log_table`) as HTML files ``<prefix>/<key>/step_<N>`` (Neptune's way to show a
    DataFrame).

    Args:
        project: ``workspace/project`` (default: ``NEPTUNE_PROJECT``; not needed offline).
        api_key: the API token (default: ``NEPTUNE_API_TOKEN``).
        name: the run's name; also the folder name Lightning puts checkpoints under when this is
            the first logger.
        mode: ``async`` / ``sync`` / ``offline`` / ``debug``. Default: ``NEPTUNE_MODE``, else
            ``async`` when ``NEPTUNE_API_TOKEN`` is set and ``offline`` when not, so a run without
            credentials writes locally (``neptune sync --path <save_dir>`` uploads it later).
        save_dir: the folder that gets Neptune's ``.neptune/`` data directory (default: Neptune's,
            ``$NEPTUNE_DATA_DIRECTORY`` or ``./.neptune``); a relative one follows
            ``--trainer.default_root_dir`` like the CSV logger's.
        prefix: the namespace of everything logged.
        tags: the run's tags.
        run_kwargs: more ``neptune.init_run`` arguments (``with_id`` to continue a run,
            ``capture_hardware_metrics``, ``source_files``...).

    The run stops (flushed to disk or to the server) when training ends; one used again after that
    (``trainer.test`` in the same process) continues it online, or starts a new one offline.
    Checkpoints are not uploaded: they stay where ``ModelCheckpoint`` writes them.
    """

    LOGGER_JOIN_CHAR = "/"

    def __init__(
        self,
        *,
        project: str | None = None,
        api_key: str | None = None,
        name: str | None = None,
        mode: str | None = None,
        save_dir: str | None = None,
        prefix: str = "training",
        tags: list[str] | None = None,
        run_kwargs: dict[str, Any] | None = None,
    ):
        try:
            import neptune  # noqa: F401
        except ImportError as err:
            raise ModuleNotFoundError(
                'NeptuneLogger needs the neptune client: pip install -e ".[neptune]"'
            ) from err
        super().__init__()
        if mode is None:
            mode = os.environ.get("NEPTUNE_MODE") or (
                "async" if os.environ.get("NEPTUNE_API_TOKEN") else "offline"
            )
        self.mode, self._project, self._api_key, self._name = mode, project, api_key, name
        self._save_dir, self._prefix, self._run_kwargs = save_dir, prefix, dict(run_kwargs or {})
        if tags:
            self._run_kwargs["tags"] = list(tags)
        self._run_instance = None
        self._run_id: str | None = None

    @property
    def data_dir(self) -> str:
        """Neptune's data directory (``.neptune``) this logger writes to."""
        if self._save_dir is not None:
            return os.path.join(self._save_dir, ".neptune")
        return os.environ.get("NEPTUNE_DATA_DIRECTORY", ".neptune")

    @property
    @rank_zero_experiment
    def experiment(self):
        """The ``neptune.Run``: ``self.logger.experiment["any/path"].append(...)`` for the rest."""
        return self.run

    @property
    @rank_zero_experiment
    def run(self):
        import neptune

        if self._run_instance is None:
            kwargs = dict(self._run_kwargs)
            if self._project is not None:
                kwargs["project"] = self._project
            if self._api_key is not None:
                kwargs["api_token"] = self._api_key
            if self._name is not None:
                kwargs["name"] = self._name
            if self._run_id is not None and self.mode != "offline":
                kwargs["with_id"] = self._run_id  # used again after a stop: the same run
            with _env("NEPTUNE_DATA_DIRECTORY", os.path.abspath(self.data_dir)):
                run = neptune.init_run(mode=self.mode, **kwargs)
            run.wait()
            self._run_id = (
                run["sys/id"].fetch() if run.exists("sys/id") else str(getattr(run, "_id", "offline"))
            )
            if self.mode == "offline":
                rank_zero_info(
                    f"NeptuneLogger: offline run {self._run_id} in {os.path.abspath(self.data_dir)} "
                    "(upload it with `neptune sync --path <the folder holding .neptune>`)"
                )
            self._run_instance = run
        return self._run_instance

    def _path(self, *keys: str) -> str:
        return self.LOGGER_JOIN_CHAR.join([self._prefix, *keys] if self._prefix else keys)

    @rank_zero_only
    @_catch_inactive
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        from neptune.utils import stringify_unsupported

        params = _sanitize_callable_params(_convert_params(params))
        if params:
            self.run[self._path("hyperparams")] = stringify_unsupported(params)

    @rank_zero_only
    @_catch_inactive
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items():
            self.run[key].append(value, step=step)

    @rank_zero_only
    @_catch_inactive
    def log_table(
        self,
        key: str,
        columns: list[str] | None = None,
        data: list[list[Any]] | None = None,
        dataframe: Any = None,
        step: int | None = None,
    ) -> None:
        """A table (``columns`` + ``data`` rows, or a pandas ``dataframe``) as an HTML file at
        ``<prefix>/<key>/step_<step>`` (``<prefix>/<key>`` without a step); WandbLogger's signature."""
        import pandas as pd
        from neptune.types import File

        df = dataframe if dataframe is not None else pd.DataFrame(data or [], columns=columns)
        path = self._path(key, f"step_{step}") if step is not None else self._path(key)
        self.run[path].upload(File.as_html(df))

    @rank_zero_only
    @_catch_inactive
    def finalize(self, status: str) -> None:
        if self._run_instance is None:
            return
        if status:
            self.run[self._path("status")] = status
        self._run_instance.stop()
        self._run_instance = None

    @property
    def save_dir(self) -> str:
        """The folder holding ``.neptune`` (the working directory by default)."""
        return self._save_dir if self._save_dir is not None else os.getcwd()

    @property
    def name(self) -> str:
        return self._name or "neptune"

    @property
    def version(self) -> str | None:
        """The run's id (``sys/id`` online, the local run id offline); starts the run."""
        if self._run_id is None:
            _ = self.run
        return self._run_id

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_run_instance"] = None  # a Run does not pickle; it is opened again where needed
        return state


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
