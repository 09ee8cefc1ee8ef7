"""The SOAR -> SIP loop tool: stage order, one run directory, resume with --ckpt_path=last, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lit_selfimprove import soar_sip
from tests.helpers import REPO


class FakeStages:
    """Stands in for the stage subprocesses: records each command and writes what the stage would."""

    def __init__(self, fail: str | None = None, promote: bool = True):
        self.commands: list[tuple[str, list[str]]] = []
        self.fail, self.promote = fail, promote

    def __call__(self, cmd: list[str], stage: str) -> None:
        self.commands.append((stage, cmd))
        root = Path(
            next(a.split("=", 1)[1] for a in cmd if a.startswith("--trainer.logger.init_args.save_dir="))
        )
        run = root / stage / "version_0"
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        if stage == self.fail:
            raise SystemExit(f"[soar-sip] stage {stage!r} failed")
        (run / "checkpoints" / "last.ckpt").write_text("ckpt")
        if stage == "soar":
            rows = [{"question": f"{i}+{i}", "answer": str(2 * i)} for i in range(1, 6)]
            (run / "teacher_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            if self.promote:
                (run / "promotion_questions.jsonl").write_text(json.dumps(rows[0]) + "\n")
                (run / "students" / "promotion_0_step_1").mkdir(parents=True)
                (run / "students" / "promotion_1_step_4").mkdir(parents=True)
        if stage == "eval":
            (run / "metrics.csv").write_text("epoch,step,val/accuracy,val/pass@1\n0,0,0.25,0.125\n")


def _args(run_dir: Path, *extra: str) -> list[str]:
    configs = REPO / "configs" / "tiny"
    return [
        "--run-dir", str(run_dir), "--solutions", "teacher", "--keep", "all",
        "--soar-config", str(configs / "soar.yaml"), "--sip-config", str(configs / "soar_sip.yaml"),
        "--eval-config", str(configs / "soar_pq.yaml"), *extra,
    ]  # fmt: skip


def test_stages_run_in_order_in_one_run_directory(tmp_path, monkeypatch):
    stages = FakeStages()
    monkeypatch.setattr(soar_sip, "_run", stages)
    soar_sip.main(_args(tmp_path / "loop", "--seed", "3", "--sip=--trainer.max_steps=5"))
    assert [s for s, _ in stages.commands] == ["soar", "sip", "eval"]
    soar_cmd, sip_cmd, eval_cmd = (c for _, c in stages.commands)
    assert soar_cmd[:4] == [sys.executable, "-m", "lit_selfimprove", "fit"]
    assert "--seed_everything=3" in soar_cmd and "--model.init_args.log_samples_every=1" in soar_cmd
    loop = tmp_path / "loop"
    assert f"--data.init_args.sources=[{loop / 'corpus.jsonl'}]" in sip_cmd
    promoted = loop / "soar" / "version_0" / "students" / "promotion_1_step_4"  # the last promotion
    assert f"--model.init_args.rewriter.init_args.model={promoted}" in sip_cmd
    assert sip_cmd[-1] == "--trainer.max_steps=5"
    assert (
        eval_cmd[3] == "validate"
        and f"--model.init_args.model={loop / 'sip' / 'version_0' / 'hf'}" in eval_cmd
    )
    docs = [json.loads(line) for line in open(loop / "corpus.jsonl")]
    assert [d["text"] for d in docs][:2] == [
        "Q: 1+1\nA: \\boxed{2}",
        "Q: 2+2\nA: \\boxed{4}",
    ]  # PQ first, once
    state = json.loads((loop / "loop.json").read_text())
    assert state["done"] == ["soar", "corpus", "sip", "eval"]
    assert state["eval"] == {"val/accuracy": 0.25, "val/pass@1": 0.125}
    assert state["corpus"]["documents"] == 5 and state["corpus"]["promoted"]
    with pytest.raises(SystemExit, match="already holds a loop.*--ckpt_path=last"):
        soar_sip.main(_args(loop))


def test_resume_skips_finished_stages_and_continues_the_running_one(tmp_path, monkeypatch):
    loop = tmp_path / "loop"
    with pytest.raises(SystemExit, match="nothing to resume"):
        soar_sip.main(_args(loop, "--ckpt_path=last"))
    monkeypatch.setattr(soar_sip, "_run", FakeStages(fail="sip"))
    with pytest.raises(SystemExit, match="stage 'sip' failed"):
        soar_sip.main(_args(loop))
    assert json.loads((loop / "loop.json").read_text())["done"] == ["soar", "corpus"]
    # the SIP stage left a checkpoint: the resumed command continues it; SOAR and the corpus are not redone
    (loop / "sip" / "version_0" / "checkpoints" / "last.ckpt").write_text("ckpt")
    stages = FakeStages()
    monkeypatch.setattr(soar_sip, "_run", stages)
    soar_sip.main(_args(loop, "--ckpt_path=last"))
    assert [s for s, _ in stages.commands] == ["sip", "eval"]
    assert stages.commands[0][1][-1] == "--ckpt_path=last"
    assert "--ckpt_path=last" not in stages.commands[1][1]  # validate has nothing to resume


def test_a_stage_that_died_before_its_first_checkpoint_starts_over(tmp_path, monkeypatch):
    loop = tmp_path / "loop"
    monkeypatch.setattr(soar_sip, "_run", FakeStages(fail="soar"))
    with pytest.raises(SystemExit):
        soar_sip.main(_args(loop))
    leftover = loop / "soar" / "version_0" / "partial.txt"
    leftover.write_text("written before the crash")
    stages = FakeStages(promote=False)
    monkeypatch.setattr(soar_sip, "_run", stages)
    soar_sip.main(_args(loop, "--ckpt_path=last", "--no-eval"))
    assert "--ckpt_path=last" not in stages.commands[0][1] and not leftover.exists()
    assert [s for s, _ in stages.commands] == ["soar", "sip"]
    state = json.loads((loop / "loop.json").read_text())
    assert not state["corpus"]["promoted"] and state["corpus"]["student"] == "builtin:tiny-student"
    # no promotion: no PQ file, the teacher samples are the curriculum, the rewriter the base student
    assert "--model.init_args.rewriter.init_args.model=builtin:tiny-student" in stages.commands[1][1]


def test_extra_questions_join_the_curriculum_once(tmp_path, monkeypatch):
    monkeypatch.setattr(soar_sip, "_run", FakeStages())
    sampled = tmp_path / "grounded_t.jsonl"
    sampled.write_text('{"question": "1+1", "answer": "2"}\n{"question": "7+8", "answer": "15"}\n')
    soar_sip.main(_args(tmp_path / "loop", "--no-eval", "--extra-questions", str(sampled)))
    docs = [json.loads(line)["meta"]["question"] for line in open(tmp_path / "loop" / "corpus.jsonl")]
    assert docs == ["1+1", "2+2", "3+3", "4+4", "5+5", "7+8"]  # 1+1 was SOAR's already


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        soar_sip.main(_args(tmp_path / "x", "--solutions", "teacher", "--keep", "agree"))
    with pytest.raises(SystemExit):
        soar_sip.main(["--run-dir", str(tmp_path), "--sip-config", str(tmp_path / "missing.yaml")])


@pytest.mark.slow
def test_the_loop_runs_end_to_end_on_the_tiny_world_and_resumes(tmp_path):
    """The real stages, tiny: 2 SOAR outer steps (a forced promotion), the corpus from the promoted
    student's solutions, 3 SIP steps, the eval on the strict hard test set; then a SIP stage cut short
    is resumed from its checkpoint to 5 steps."""
    loop = tmp_path / "loop"
    soar = [
        "--model.init_args.log_samples_every=1", "--trainer.max_steps=2", "--model.init_args.dataset_size=4",
        "--model.init_args.num_repeats=1", "--model.init_args.inner.steps=1", "--model.init_args.inner.group_size=2",
        "--data.init_args.batch_size=4", "--model.init_args.promotion.tau=-1", "--model.init_args.promotion.window=1",
        "--model.init_args.promotion.require_improvement=false",
    ]  # fmt: skip
    sip = ["--data.init_args.splits={policy: 0.5, eval: 0.5}", "--data.init_args.num_val_prefixes=2"]
    evaluation = [
        "--data.init_args.extra_train_sources=null", "--model.init_args.val_num_samples=2",
        "--model.init_args.val_ks=[1,2]", "--data.init_args.test_source=builtin:tiny-strict-train",
    ]  # fmt: skip
    flags = [f"--soar={a}" for a in soar] + [f"--eval={a}" for a in evaluation]
    base = ["--run-dir", str(loop), "--keep", "all", "--max-new-tokens", "40", *flags]
    soar_sip.main([*base, *(f"--sip={a}" for a in [*sip, "--trainer.max_steps=3"])])
    state = json.loads((loop / "loop.json").read_text())
    assert state["done"] == ["soar", "corpus", "sip", "eval"]
    assert state["corpus"]["promoted"] and "promotion_1_step_1" in state["corpus"]["student"]
    assert set(state["eval"]) == {"val/accuracy", "val/pass@1", "val/pass@2"}
    docs = [json.loads(line) for line in open(loop / "corpus.jsonl")]
    assert docs and all(d["meta"]["solution"] == "student" and "agrees" in d["meta"] for d in docs)
    assert (loop / "sip" / "version_0" / "hf" / "config.json").is_file()
    # the SIP stage is cut short: resume it to 5 steps from its last checkpoint (step 3)
    state["done"] = ["soar", "corpus"]
    (loop / "loop.json").write_text(json.dumps(state))
    soar_sip.main([*base, "--ckpt_path=last", *(f"--sip={a}" for a in [*sip, "--trainer.max_steps=5"])])
    import csv

    steps = [
        int(r["step"])
        for r in csv.DictReader(open(loop / "sip" / "version_0" / "metrics.csv"))
        if r.get("train/loss")
    ]
    assert steps == list(range(5))  # steps 0-2 from the first run, 3-4 resumed: none repeated or lost
