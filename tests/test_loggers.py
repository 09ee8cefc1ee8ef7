"""Loggers besides the CSV default: the sample tables through any logger with a table API
(:func:`lit_selfimprove.loggers.log_table`), Neptune offline and TensorBoard in real tiny fits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import CSVLogger

from lit_selfimprove.cli import main
from lit_selfimprove.loggers import log_table
from lit_selfimprove.modules._shared import write_samples
from tests.helpers import REPO

ROWS = [
    {"step": 0, "question": "1+2", "completion": "3 | a\nb", "reward": 1.0},
    {"step": 0, "question": "4+5", "candidates": [{"text": "9", "score": 1.0}], "reward": 0.0},
]
# a two-step StudentRLVR fit that logs metrics and a sample table at every step
TINY_FIT = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--model.init_args.rl.group_size=2",
    "--model.init_args.rl.max_new_tokens=8",
    "--model.init_args.log_samples_every=1",
    "--data.init_args.batch_size=2",
]


class TableLogger(CSVLogger):
    """WandB's table API (``log_table(key, columns, data, step)``), recorded."""

    def __init__(self, save_dir):
        super().__init__(save_dir)
        self.tables = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, data, step))


class BrokenTableLogger(CSVLogger):
    def log_table(self, **kwargs):
        raise RuntimeError("table service down")


class TextWriter:
    def __init__(self):
        self.texts = []

    def add_text(self, tag, text, global_step=None):
        self.texts.append((tag, text, global_step))


def test_a_table_reaches_every_logger_with_a_table_api_and_skips_the_others(tmp_path):
    table, text = TableLogger(tmp_path), SimpleNamespace(experiment=TextWriter())
    with pytest.warns(UserWarning, match="could not log the table 'samples'.*table service down"):
        took = log_table([CSVLogger(tmp_path), table, BrokenTableLogger(tmp_path), text], "samples", ROWS, 3)
    assert took == ["TableLogger", "SimpleNamespace"]  # CSV has no table API; the broken one warned
    [(key, columns, data, step)] = table.tables
    assert (key, step) == ("samples", 3)
    assert columns == ["step", "question", "completion", "reward", "candidates"]  # union, first seen
    assert data[0] == [0, "1+2", "3 | a\nb", 1.0, None]
    assert json.loads(data[1][4]) == [{"text": "9", "score": 1.0}]  # non-scalars as JSON
    [(tag, markdown, step)] = text.experiment.texts
    assert (tag, step) == ("samples", 3)
    lines = markdown.splitlines()
    assert lines[:2] == [
        "| step | question | completion | reward | candidates |",
        "| --- | --- | --- | --- | --- |",
    ]
    assert lines[2] == "| 0 | 1+2 | 3 \\| a<br>b | 1.0 | None |"  # cells cannot break the table
    assert log_table([table], "samples", [], 0) == []  # nothing to log


def test_write_samples_logs_the_table_through_the_trainers_loggers(tmp_path):
    """The modules' one sample writer (StudentRLVR, TeacherMetaRL, SuffixPolicyDPO) logs tables too."""
    table = TableLogger(tmp_path)
    trainer = SimpleNamespace(
        log_dir=str(tmp_path), is_global_zero=True, loggers=[CSVLogger(tmp_path), table]
    )
    module = SimpleNamespace(_trainer=trainer)
    for step in range(3):
        write_samples(module, 2, step, "teacher_samples.jsonl", lambda step=step: [{"step": step}])
    assert [(key, data, step) for key, _, data, step in table.tables] == [
        ("teacher_samples", [[0]], 0),
        ("teacher_samples", [[2]], 2),
    ]
    trainer.is_global_zero = False  # other ranks: no file, no table
    write_samples(module, 1, 4, "teacher_samples.jsonl", lambda: [{"step": 4}])
    assert len(table.tables) == 2


def _ops(data_dir: Path) -> list[dict]:
    """The operations of the one offline Neptune run under ``data_dir`` (``.neptune/offline/run__*``)."""
    [run_dir] = (data_dir / "offline").glob("run__*")
    ops = []
    for log in sorted(run_dir.glob("data-*.log")):
        ops += [json.loads(line)["obj"] for line in log.read_text().splitlines() if line.strip()]
    for op in ops:
        op["key"] = "/".join(op["path"])
        op["run_dir"] = run_dir
    return ops


@pytest.mark.skipif(
    importlib.util.find_spec("neptune") is None, reason='neptune not installed (".[neptune]")'
)
def test_neptune_offline_run_gets_metrics_hyperparameters_and_sample_tables(tmp_path, monkeypatch):
    for var in ("NEPTUNE_API_TOKEN", "NEPTUNE_MODE", "NEPTUNE_PROJECT", "NEPTUNE_DATA_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)  # no credentials: the logger goes offline by itself
    config = REPO / "configs/tiny/student_rlvr_neptune.yaml"
    cli = main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", *TINY_FIT])
    assert cli.trainer.global_step == 2
    csv_logger, neptune_logger = cli.trainer.loggers
    assert neptune_logger.mode == "offline"
    log_dir = Path(csv_logger.log_dir)  # the CSV logger, first, keeps the run folder as it was
    assert (log_dir / "metrics.csv").exists()
    samples = [json.loads(line) for line in (log_dir / "samples.jsonl").read_text().splitlines()]

    ops = _ops(tmp_path / "runs" / ".neptune")  # the relative save_dir followed default_root_dir
    by_key = {}
    for op in ops:
        by_key.setdefault(op["key"], []).append(op)
    # metrics: series with their steps
    loss_steps = [v["step"] for op in by_key["training/train/loss"] for v in op["values"]]
    assert loss_steps == [0, 1]
    assert all(op["type"] == "LogFloats" for op in by_key["training/train/reward"])
    # hyper-parameters, nested groups as namespaces
    assert by_key["training/hyperparams/lr"][0]["value"] == pytest.approx(1e-4)
    assert by_key["training/hyperparams/rl/group_size"][0]["value"] == 2
    assert by_key["sys/name"][0]["value"] == "student_rlvr"
    assert set(by_key["sys/tags"][0]["values"]) == {"tiny", "student_rlvr"}
    # the sample tables: one HTML table per logged step, with the rows of samples.jsonl
    for step in (0, 1):
        [upload] = by_key[f"training/samples/step_{step}"]
        assert upload["type"] == "UploadFile" and upload["ext"] == "html"
        html = (upload["run_dir"] / "upload_path" / upload["tmp_file_name"]).read_text()
        assert "<table" in html and "completion" in html
    html = (by_key["training/samples/step_0"][0]["run_dir"] / "upload_path").glob("training_samples_step_0*")
    assert samples[0]["question"] in next(html).read_text()
    assert by_key["training/status"][-1]["value"] == "success"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_logger_from_the_command_line(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = REPO / "configs/tiny/student_rlvr.yaml"
    args = ["fit", "--config", str(config), "--trainer.logger=TensorBoardLogger"]
    cli = main([*args, f"--trainer.default_root_dir={tmp_path}", *TINY_FIT])
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir == tmp_path / "runs" / "student_rlvr" / "version_0"  # the config's save_dir / name
    [events] = log_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1]
    texts = acc.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [0, 1]
    table = texts[0].tensor_proto.string_val[0].decode()
    samples = [json.loads(line) for line in (log_dir / "samples.jsonl").read_text().splitlines()]
    assert table.startswith("| step | question | answer | completion | reward |")
    assert f"| {samples[0]['question']} | {samples[0]['answer']} |" in table
