"""An old config or override that uses a moved setting fails with a message naming where it went."""

import pytest
import yaml

from lit_selfimprove import cli
from lit_selfimprove.moved_settings import MOVED, MovedSettingError, check_moved_settings, moved_in_config


@pytest.fixture
def moved(monkeypatch):
    monkeypatch.setitem(MOVED, "TeacherMetaRL", {**MOVED["TeacherMetaRL"], "old_tau": "promotion.tau"})
    monkeypatch.setitem(
        MOVED, "Promotion", {**MOVED["Promotion"], "old_window": "TeacherMetaRL's promotion.window"}
    )


def _config(tmp_path, model_args: dict, callback_args: dict) -> str:
    config = {
        "trainer": {
            "callbacks": [
                {"class_path": "lit_selfimprove.callbacks.Promotion", "init_args": callback_args},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"old_window": 1}},
            ]
        },
        "model": {"class_path": "lit_selfimprove.modules.TeacherMetaRL", "init_args": model_args},
    }
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_config_names_each_moved_setting_and_only_those(tmp_path, moved):
    path = _config(tmp_path, {"old_tau": 0.1, "teacher": "x"}, {"old_window": 3, "save_students": True})
    found = moved_in_config(yaml.safe_load(open(path)))
    assert sorted(found) == [
        "model.TeacherMetaRL.old_tau -> TeacherMetaRL: promotion.tau",
        "trainer.callbacks.Promotion.old_window -> Promotion: TeacherMetaRL's promotion.window",
    ]  # ModelCheckpoint's key of the same name is not Promotion's
    with pytest.raises(MovedSettingError) as error:
        check_moved_settings(["fit", "--config", path])
    assert f"{path}: model.TeacherMetaRL.old_tau -> TeacherMetaRL: promotion.tau" in str(error.value)


def test_overrides_are_checked_against_the_model_class(tmp_path, moved):
    path = _config(tmp_path, {"teacher": "x"}, {})
    check_moved_settings(["fit", f"--config={path}"])  # nothing moved: no error
    for override in ("--model.init_args.old_tau=0.2", "--model.old_tau=0.2"):
        with pytest.raises(MovedSettingError, match="promotion.tau"):
            check_moved_settings(["fit", "--config", path, override])
    check_moved_settings(["fit", "--model", "SuffixPolicyDPO", "--model.old_tau=0.2"])  # not its setting


def test_the_command_line_stops_before_parsing(tmp_path, moved, capsys):
    path = _config(tmp_path, {"old_tau": 0.1}, {})
    with pytest.raises(SystemExit) as error:
        cli.main(["fit", "--config", path])
    assert "model.TeacherMetaRL.old_tau -> TeacherMetaRL: promotion.tau" in str(error.value.code)
