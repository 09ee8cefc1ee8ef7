"""The config hub is exercised, not only parsed: every ``configs/tiny/*.yaml`` runs ``fit`` for two
steps in-process (tiny limits by overrides), with everything it writes under a temporary folder."""

from __future__ import annotations

import json

import pytest

from lit_selfimprove.cli import main
from tests.helpers import REPO

TINY = sorted((REPO / "configs" / "tiny").glob("*.yaml"))

# per config: overrides that keep two steps short (the configs' own sizes are for real runs)
SMALL = {
    "soar.yaml": [
        "--model.init_args.dataset_size=4",
        "--model.init_args.num_repeats=1",
        "--model.init_args.inner.steps=1",
        "--model.init_args.inner.group_size=2",
        "--data.init_args.batch_size=4",
    ],
    "soar_intrinsic.yaml": [
        "--model.init_args.dataset_size=4",
        "--model.init_args.intrinsic_samples=2",
        "--data.init_args.batch_size=4",
    ],
    "soar_pq.yaml": ["--model.init_args.rl.group_size=2", "--data.init_args.batch_size=2"],
    "student_rlvr.yaml": ["--model.init_args.rl.group_size=2", "--data.init_args.batch_size=2"],
    "student_rlvr_hard.yaml": ["--model.init_args.rl.group_size=2", "--data.init_args.batch_size=2"],
    "student_rlvr_neptune.yaml": ["--model.init_args.rl.group_size=2", "--data.init_args.batch_size=2"],
    "sip_dpo.yaml": ["--model.init_args.candidates.num_rollouts=2", "--data.init_args.batch_size=2"],
    "sip_dpo_scratch.yaml": ["--data.init_args.batch_size=2"],
    "sip_rf_nll.yaml": ["--model.init_args.candidates.num_rollouts=2", "--data.init_args.batch_size=2"],
    "sip_next_token.yaml": ["--data.init_args.batch_size=2"],
    "soar_sip_next_token.yaml": ["--data.init_args.batch_size=2"],
    "soar_sip.yaml": ["--model.init_args.candidates.num_rollouts=2", "--data.init_args.batch_size=2"],
    "pretrain_student.yaml": ["--data.init_args.batch_size=4"],
    "pretrain_teacher.yaml": ["--data.init_args.batch_size=4"],
    "pretrain_sip_policy.yaml": ["--data.init_args.batch_size=4"],
    "judge_grpo.yaml": ["--model.init_args.rl.group_size=2", "--data.init_args.batch_size=2"],
    "rewriter_grpo.yaml": ["--model.init_args.rl.group_size=2", "--data.init_args.batch_size=2"],
}


def test_every_tiny_config_has_small_overrides():
    assert {p.name for p in TINY} == set(SMALL)


@pytest.mark.parametrize("config", TINY, ids=lambda p: p.name)
def test_tiny_config_fits_two_steps(config, tmp_path, monkeypatch):
    if "neptune" in config.name:  # offline (no token), its .neptune/ under tmp_path/runs
        pytest.importorskip("neptune", reason='neptune not installed (".[neptune]")')
        for var in ("NEPTUNE_API_TOKEN", "NEPTUNE_MODE", "NEPTUNE_DATA_DIRECTORY"):
            monkeypatch.delenv(var, raising=False)
    args = [
        "fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", *SMALL[config.name],
    ]  # fmt: skip
    if config.name.startswith("pretrain_"):  # never over the bundled assets
        args.append(f"--model.init_args.save_to={tmp_path / 'model'}")
    if config.name == "soar_pq.yaml":
        pq = tmp_path / "promotion_questions.jsonl"
        pq.write_text(
            "".join(json.dumps({"question": f"{i}+{i}", "answer": str(2 * i)}) + "\n" for i in range(4))
        )
        args.append(f"--data.init_args.extra_train_sources=[{pq}]")
    cli = main(args)
    assert cli.trainer.global_step == 2
    assert (tmp_path / "runs").is_dir()  # every output followed default_root_dir
    assert not (REPO / "runs").exists() or not any(
        p.stat().st_mtime > tmp_path.stat().st_mtime for p in (REPO / "runs").rglob("metrics.csv")
    )
