"""Mistyped inputs fail fast, with a message that names the cause."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from lit_selfimprove import world
from lit_selfimprove.judges import HFChatBackend
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer
from lit_selfimprove.modules import NextTokenLM, StudentRLVR, TeacherMetaRL
from tests.helpers import REPO

MISSING = [
    "/nonexistent/model",
    "./no/such/model",
    "../no-such-model",
    "~/no-such-model-4f2a",
    "runs/x/teacher",
]


@pytest.mark.parametrize("name", MISSING)
@pytest.mark.parametrize("load", [load_tokenizer, load_causal_lm])
def test_a_missing_local_model_path_says_it_does_not_exist(load, name):
    with pytest.raises(FileNotFoundError, match=r"does not exist locally \(hub ids look like 'org/name'"):
        load(name)


def test_sample_questions_with_a_missing_teacher_path_names_the_path(tmp_path):
    from lit_selfimprove import sample_questions

    with pytest.raises(FileNotFoundError, match="'/nonexistent' does not exist locally"):
        sample_questions.main(["--teacher", "/nonexistent", "--out", str(tmp_path / "q.jsonl")])


def test_hub_ids_and_existing_paths_pass_the_check(tmp_path):
    from lit_selfimprove.assets import resolve_model

    assert resolve_model("org/name") == "org/name"  # left to the hub, which the check never calls
    assert resolve_model("gpt2") == "gpt2"
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("builtin:tiny-tokenizer").endswith("tiny-tokenizer")


def test_fit_with_a_missing_student_path_names_the_path(tmp_path):
    cmd = [sys.executable, "-m", "lit_selfimprove", "fit", "--config", str(REPO / "configs/tiny/soar.yaml")]
    cmd.append("--model.init_args.student=/nonexistent/model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # jsonargparse wraps the module's error in its own ValueError: the cause is in its "Errors:" list
    assert "'/nonexistent/model' does not exist locally (hub ids look like 'org/name'" in proc.stderr
    assert "Repo id must" not in proc.stderr


@pytest.mark.parametrize("levels", [["99"], ["0"], ["1", "7"]])
def test_world_eval_rejects_levels_the_world_does_not_have(levels, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the levels were not checked at argument parsing")

    monkeypatch.setattr(world, "level_accuracy", never)
    with pytest.raises(SystemExit) as exc:
        world.main(["eval", "--levels", *levels])
    assert exc.value.code == 2
    assert "the tiny world has levels 1-6" in capsys.readouterr().err


def test_world_eval_accepts_levels_1_to_6(monkeypatch):
    import lit_selfimprove.modeling as modeling

    seen = []
    monkeypatch.setattr(
        world, "level_accuracy", lambda model, tok, levels, *a, **k: seen.extend(levels) or {}
    )
    monkeypatch.setattr(modeling, "load_causal_lm", lambda name: None)
    monkeypatch.setattr(modeling, "load_tokenizer", lambda name: None)
    world.main(["eval", "--levels", "1", "6"])
    assert seen == [1, 6]


@pytest.mark.parametrize("name", ["soar_harp", "soar_math"])
def test_paper_soar_config_headers_run_themselves_and_name_the_pq_file(name):
    import inspect

    from lit_selfimprove.callbacks import Promotion

    pq = inspect.signature(Promotion).parameters["pq_filename"].default
    config = REPO / "configs" / "paper" / f"{name}.yaml"
    header = "\n".join(line for line in config.read_text().splitlines() if line.startswith("#"))
    assert f"fit --config configs/paper/{name}.yaml" in header
    assert f"<log dir>/{pq}" in header and "/pq.jsonl" not in header


# --------------------------------------------------------------- budgets validated at construction
@pytest.mark.parametrize(
    "cls, kwargs",
    [
        ("StudentRLVR", {"model": "builtin:tiny-student", "rl": {"max_new_tokens": 0}}),
        ("StudentRLVR", {"model": "builtin:tiny-student", "val_max_new_tokens": 0}),
        (
            "TeacherMetaRL",
            {
                "teacher": "builtin:tiny-teacher",
                "student": "builtin:tiny-student",
                "inner": {"max_new_tokens": 0},
            },
        ),
        (
            "TeacherMetaRL",
            {
                "teacher": "builtin:tiny-teacher",
                "student": "builtin:tiny-student",
                "teacher_sampling": {"max_new_tokens": 0},
            },
        ),
        (
            "SuffixPolicyDPO",
            {"model": "builtin:tiny-sip-policy", "judge": None, "candidates": {"max_new_tokens": 0}},
        ),
    ],
)
def test_a_zero_token_budget_fails_at_construction(cls, kwargs):
    import lit_selfimprove.modules as modules

    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        getattr(modules, cls)(**kwargs)


def test_a_reward_that_never_pays_warns_once():
    from lit_selfimprove.modules._shared import ZeroRewardWatch

    watch = ZeroRewardWatch("StudentRLVR", steps=3)
    with pytest.warns(
        UserWarning, match=r"reward was 0 for every sample in the last 3 steps.*'I like turtles.'"
    ):
        assert [watch.update(True, "I like turtles.") for _ in range(3)] == [False, False, True]
    assert not watch.update(True)  # once
    watch = ZeroRewardWatch("StudentRLVR", steps=3)
    assert not any(watch.update(z) for z in [True, True, False, True, True])  # the streak restarts


FLASH = {"attn_implementation": "flash_attention_2"}


@pytest.mark.parametrize(
    "build",
    [
        lambda: StudentRLVR(model="builtin:tiny-student", **FLASH),
        lambda: TeacherMetaRL(teacher="builtin:tiny-teacher", student="builtin:tiny-student", memory=FLASH),
        lambda: NextTokenLM(model="builtin:tiny-student", **FLASH),
        lambda: HFChatBackend("builtin:tiny-student", **FLASH),
        lambda: load_causal_lm("builtin:tiny-student", **FLASH),
    ],
    ids=["StudentRLVR", "TeacherMetaRL", "NextTokenLM", "HFChatBackend", "load_causal_lm"],
)
def test_flash_attention_without_its_package_or_a_gpu_fails_at_start_up(build):
    """Asking for flash_attention_2 where it cannot run fails when the object is built (config
    parsing time for the CLI), naming what is missing, not when the model loads mid-run."""
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("flash-attn and a GPU are here: flash_attention_2 is allowed")
    with pytest.raises(ValueError, match="flash_attention_2.*needs .*(flash_attn|CUDA GPU).*use 'sdpa'"):
        build()
