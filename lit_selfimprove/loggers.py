"""Loggers: Lightning's CSVLogger, with a history that survives a resume."""

from __future__ import annotations

import csv
import os
import warnings

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger

__all__ = ["CSVLogger"]


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
