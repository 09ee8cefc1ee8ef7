"""Every YAML under configs/ loads through the CLI (--print_config), so configs never rot."""

from __future__ import annotations

import pytest
import yaml

from lit_selfimprove.cli import main
from tests.helpers import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 4, CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("lit_selfimprove.modules.")
    assert "data" in printed


def test_overrides_and_short_names(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs/tiny/student_rlvr.yaml"),
                "--model.init_args.rl.group_size=4",
                "--data=ArithmeticProblemDataModule",
                "--data.init_args.levels=[2]",
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["rl"]["group_size"] == 4
    assert printed["data"]["class_path"] == "lit_selfimprove.datamodules.ArithmeticProblemDataModule"
    assert printed["data"]["init_args"]["levels"] == [2]


def test_bad_override_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs/tiny/student_rlvr.yaml"),
                "--model.init_args.no_such_arg=1",
            ]
        )
    assert exit_info.value.code != 0


@pytest.mark.parametrize(
    "override",
    [
        "--model.init_args.rl.advantage=ppo",
        "--model.init_args.rl.loss_aggregation=mean",
        "--model.init_args.generation.backend=sglang",
    ],
)
def test_a_bad_choice_in_a_settings_group_is_a_parse_error(override):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/tiny/student_rlvr.yaml"), override, "--print_config"])


def test_a_bad_teacher_choice_is_a_parse_error():
    for override in ("--model.init_args.teacher_reward=learned", "--model.init_args.inner.advantage=ppo"):
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(REPO / "configs/tiny/soar.yaml"), override, "--print_config"])


def test_the_generation_backend_is_a_settings_group(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/tiny/soar.yaml"), "--model.init_args.generation.backend=vllm",
              "--model.init_args.generation.kv_cache_gb=2", "--print_config"])  # fmt: skip
    generation = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["generation"]
    assert generation["backend"] == "vllm" and generation["kv_cache_gb"] == 2.0
