"""Promotion (SOAR's promotion rule): the moving-average rule on hand numbers, the PQ file, the
saved Hugging Face student, the callback's checkpoint state and PQ truncation on resume, a real
TeacherMetaRL outer step that promotes, and a run killed with SIGKILL and resumed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_selfimprove.callbacks import Promotion, RunDirectory
from lit_selfimprove.modules import TeacherMetaRL
from lit_selfimprove.modules.soar_outer import OuterStep
from lit_selfimprove.rl.promotion import PromotionRule
from tests.helpers import (
    REPO,
    ScriptedTeacher,
    arithmetic_pairs,
    clone_state,
    fit_soar,
    same_state,
    tiny_soar,
)


# ------------------------------------------------------------------------ stand-ins
class FakeStrategy:
    def broadcast(self, obj, src=0):
        return obj


def fake_trainer(log_dir: Path, rank_zero: bool = True):
    return SimpleNamespace(
        is_global_zero=rank_zero,
        log_dir=str(log_dir),
        default_root_dir=str(log_dir),
        strategy=FakeStrategy(),
        callbacks=[RunDirectory()],
    )


class FakeModule:
    """TeacherMetaRL's step 5 (``promote``, borrowed) on a stand-in: ``last_outer``, ``student``,
    ``student_tokenizer``, the rule and its promotions, ``log_dict``."""

    promote = TeacherMetaRL.promote
    promotes = True

    def __init__(self, student, tokenizer=None, rule: PromotionRule | None = None):
        self.student, self.student_tokenizer, self.last_outer, self.logged = student, tokenizer, None, []
        self.promotion_rule, self.promotions = rule or PromotionRule(), []

    def median_student(self, k):
        return self.last_outer.median_students[k]

    def log_dict(self, logs, **kwargs):
        self.logged.append(dict(logs))


def linear_states(g: int, step: int) -> list[dict]:
    """A distinct ``nn.Linear(2, 2)`` state per dataset: weights filled with 100 * step + k."""
    return [{"weight": torch.full((2, 2), 100.0 * step + k), "bias": torch.zeros(2)} for k in range(g)]


def outer(module: FakeModule, step: int, rewards: list[float], states=None) -> None:
    module.last_outer = OuterStep(
        step=step,
        rewards=rewards,
        per_repeat=[[r] for r in rewards],
        datasets=[
            [{"question": f"q{step}.{k}.{i}", "answer": str(k)} for i in range(2)]
            for k in range(len(rewards))
        ],
        median_students=states if states is not None else linear_states(len(rewards), step),
        median_owner=[0] * len(rewards),
        baseline_accuracy=0.0,
        advantages=[0.0] * len(rewards),
    )
    module.promote(module.last_outer)


def drive(cb: Promotion, module: FakeModule, trainer, step: int, rewards: list[float], states=None) -> bool:
    cb.setup(trainer, module, "fit")  # the callback reads the module's rule and promotions
    before = cb.count
    outer(module, step, rewards, states)
    cb.on_train_batch_end(trainer, module, None, None, step)
    return cb.count > before


# ------------------------------------------------------------------------ the rule
def test_moving_average_rule_by_hand(tmp_path):
    cb = Promotion(save_students=False)
    rule = PromotionRule(tau=0.25, window=3, reset_after_promotion=False, require_improvement=False)
    module, trainer = FakeModule(torch.nn.Linear(2, 2), rule=rule), fake_trainer(tmp_path)
    # Rbar = mean_k R_k: 0.5, 0.5 (window not full: no promotion even above tau)
    assert not drive(cb, module, trainer, 0, [0.25, 0.75])
    assert not drive(cb, module, trainer, 1, [0.75, 0.25])
    assert cb.moving_average() is None and module.logged[-1] == {
        "promotion/count": 0.0,
        "promotion/event": 0.0,
    }
    # Rbar = -0.5: (0.5 + 0.5 - 0.5) / 3 = 1/6 <= 0.25
    assert not drive(cb, module, trainer, 2, [-0.25, -0.75])
    assert module.logged[-1]["promotion/moving_avg"] == pytest.approx(1 / 6)
    # Rbar = 1.0: (0.5 - 0.5 + 1) / 3 = 1/3 > 0.25 -> k* = argmax R = 1
    assert drive(cb, module, trainer, 3, [0.5, 1.5])
    assert torch.equal(module.student.weight, torch.full((2, 2), 301.0))  # the median student of X_1
    assert module.logged[-1] == {
        "promotion/count": 1.0,
        "promotion/event": 1.0,
        "promotion/moving_avg": pytest.approx(1 / 3),
    }
    assert cb.promotions == [{"step": 3, "dataset": 1, "reward": 1.5, "moving_avg": pytest.approx(1 / 3)}]
    # no reset: Rbar = 0.5 -> (-0.5 + 1 + 0.5) / 3 = 1/3 > 0.25 again, k* = 0
    assert drive(cb, module, trainer, 4, [1.0, 0.0])
    assert torch.equal(module.student.weight, torch.full((2, 2), 400.0))
    # Rbar = -1: (1 + 0.5 - 1) / 3 = 1/6 -> no promotion, the student stays
    assert not drive(cb, module, trainer, 5, [-1.0, -1.0])
    assert torch.equal(module.student.weight, torch.full((2, 2), 400.0)) and cb.count == 2
    # the same outer step seen twice (no new training_step) is not counted twice
    cb.on_train_batch_end(trainer, module, None, None, 6)
    assert len(cb.history) == 6


def test_promotions_do_not_cascade(tmp_path):
    """Rbar = [0, .02, .03, .03, -.02], tau .01, window 3: one promotion (the old rule made three,
    the last with Rbar = -0.02, measured against the new baseline)."""
    rule = PromotionRule(tau=0.01, window=3)
    module, trainer = FakeModule(torch.nn.Linear(2, 2), rule=rule), fake_trainer(tmp_path)
    rbar = [0.0, 0.02, 0.03, 0.03, -0.02]
    cb = Promotion(save_students=False)
    assert [drive(cb, module, trainer, s, [r, r]) for s, r in enumerate(rbar)] == [
        False,
        False,
        True,
        False,
        False,
    ]
    old, old_rule = Promotion(save_students=False), PromotionRule(0.01, 3, False, False)  # no reset, no check
    module = FakeModule(torch.nn.Linear(2, 2), rule=old_rule)
    assert [drive(old, module, trainer, s, [r, r]) for s, r in enumerate(rbar)] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_no_promotion_without_a_student_that_beat_the_baseline(tmp_path):
    """A full window above tau from earlier steps does not promote a step whose best R_k <= 0."""
    rule = PromotionRule(tau=0.01, window=3, reset_after_promotion=False)
    module, trainer = FakeModule(torch.nn.Linear(2, 2), rule=rule), fake_trainer(tmp_path)
    cb = Promotion(save_students=False)
    steps = [[0.06, 0.06], [0.05, 0.04], [-0.01, 0.0], [0.0, -0.02]]  # moving avg 0.03, then 0.0167
    assert [drive(cb, module, trainer, s, r) for s, r in enumerate(steps)] == [False] * 4
    assert cb.moving_average() == pytest.approx((0.045 - 0.005 - 0.01) / 3)
    # the same with improvement: promoted
    assert drive(cb, module, trainer, 4, [0.2, -0.1])


def test_reset_after_promotion_needs_a_full_window_again(tmp_path):
    cb, rule = Promotion(save_students=False), PromotionRule(tau=0.0, window=2, reset_after_promotion=True)
    module, trainer = FakeModule(torch.nn.Linear(2, 2), rule=rule), fake_trainer(tmp_path)
    assert [drive(cb, module, trainer, s, [1.0, 2.0]) for s in range(5)] == [False, True, False, True, False]
    assert cb.history == [1.5]
    cb, rule = Promotion(save_students=False), PromotionRule(tau=0.0, window=2, reset_after_promotion=False)
    module = FakeModule(torch.nn.Linear(2, 2), rule=rule)
    assert [drive(cb, module, trainer, s, [1.0, 2.0]) for s in range(5)] == [False, True, True, True, True]


def test_pq_file_and_saved_student(tiny_random_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    from lit_selfimprove.modeling import load_tokenizer

    student = AutoModelForCausalLM.from_pretrained(tiny_random_lm)
    module = FakeModule(student, load_tokenizer(tiny_random_lm), rule=PromotionRule(tau=0.0, window=1))
    base = clone_state(student)
    states = [{k: v + 0.01 * (k_ + 1) for k, v in base.items()} for k_ in range(3)]
    cb = Promotion()
    trainer = fake_trainer(tmp_path)
    assert drive(cb, module, trainer, 7, [0.1, 0.3, 0.2], states)
    assert same_state(states[1], student.state_dict())
    rows = [json.loads(line) for line in open(tmp_path / "promotion_questions.jsonl")]
    run_id = trainer.callbacks[0].run_id
    assert rows == [
        {
            "question": f"q7.1.{i}",
            "answer": "1",
            "step": 7,
            "promotion": 0,
            "dataset": 1,
            "reward": 0.3,
            "run_id": run_id,
        }
        for i in range(2)
    ]
    folder = tmp_path / "students" / "promotion_0_step_7"
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert same_state(states[1], loaded.state_dict())
    assert load_tokenizer(str(folder)).get_vocab() == module.student_tokenizer.get_vocab()
    # a second promotion appends with the next index
    assert drive(cb, module, trainer, 8, [0.5, 0.1, 0.2], states)
    rows = [json.loads(line) for line in open(tmp_path / "promotion_questions.jsonl")]
    assert [(r["promotion"], r["step"], r["dataset"]) for r in rows] == [(0, 7, 1)] * 2 + [(1, 8, 0)] * 2
    assert (tmp_path / "students" / "promotion_1_step_8" / "config.json").exists()


def test_a_full_disk_during_a_promotion_leaves_no_partial_student(tiny_random_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    from lit_selfimprove.modeling import load_tokenizer

    student = AutoModelForCausalLM.from_pretrained(tiny_random_lm)
    module = FakeModule(student, load_tokenizer(tiny_random_lm), rule=PromotionRule(tau=0.0, window=1))
    states = [clone_state(student)] * 2

    def disk_full(folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("{")  # half written
        raise OSError(28, "No space left on device")

    student.save_pretrained = disk_full
    cb = Promotion()
    with pytest.raises(OSError, match="No space"):
        drive(cb, module, fake_trainer(tmp_path), 3, [0.1, 0.3], states)
    assert not (tmp_path / "students" / "promotion_0_step_3").exists()  # nothing under the final name
    # a resume from the checkpoint before removes the leftover
    cb = Promotion()
    cb.load_state_dict({"history": [], "promotions": [], "pq_lines": 0, "last_step": 2})
    cb._drop_unrecorded(tmp_path)
    assert list((tmp_path / "students").iterdir()) == []


def test_only_rank_zero_writes_but_every_rank_installs(tmp_path):
    cb = Promotion()
    module = FakeModule(torch.nn.Linear(2, 2), rule=PromotionRule(tau=0.0, window=1))
    assert drive(cb, module, fake_trainer(tmp_path, rank_zero=False), 0, [0.0, 1.0])
    assert torch.equal(module.student.weight, torch.full((2, 2), 1.0))
    assert not any(tmp_path.iterdir()) and cb.pq_lines == 2


def test_missing_trained_students_is_a_clear_error(tmp_path):
    cb = Promotion()
    module = FakeModule(torch.nn.Linear(2, 2), rule=PromotionRule(tau=0.0, window=1))
    with pytest.raises(RuntimeError, match="keep_median_students"):
        drive(cb, module, fake_trainer(tmp_path), 0, [0.0, 1.0], [None, None])


@pytest.mark.parametrize("promotes", [True, False])
def test_end_message_cites_tau_only_when_promotions_ran(tmp_path, monkeypatch, promotes):
    said = []
    monkeypatch.setattr("lit_selfimprove.callbacks.promotion.rank_zero_info", said.append)
    cb, module = Promotion(), FakeModule(torch.nn.Linear(2, 2), rule=PromotionRule(tau=0.5, window=1))
    module.promotes = promotes
    cb.setup(None, module, "fit")
    said.clear()  # only the end message counts
    cb.on_train_end(fake_trainer(tmp_path), module)
    assert len(said) == 1 and said[0].startswith("SOAR: no promotion")
    assert ("tau=0.5" in said[0]) == promotes
    assert ("promote=false" in said[0]) == (not promotes)


# ------------------------------------------------------------------------ checkpoint state
def test_state_round_trip_and_pq_truncation_on_resume(tmp_path):
    trainer = fake_trainer(tmp_path)
    cb = Promotion(save_students=False)
    module = FakeModule(torch.nn.Linear(2, 2), rule=PromotionRule(tau=0.0, window=1))
    drive(cb, module, trainer, 0, [-1.0, -2.0])
    drive(cb, module, trainer, 1, [1.0, 2.0])
    state = cb.state_dict()
    module_state = {}
    TeacherMetaRL.on_save_checkpoint(module, module_state)  # the rule's state is the module's
    assert {**module_state["promotion"], **state} == {
        "history": [],  # reset by the promotion
        "promotions": [{"step": 1, "dataset": 1, "reward": 2.0, "moving_avg": 1.5}],
        "pq_lines": 2,
        "last_step": 1,
    }
    module_state = json.loads(json.dumps(module_state))
    # the run goes on, promotes again (writes 2 more lines and a student folder), then crashes
    # before the next checkpoint
    drive(cb, module, trainer, 2, [3.0, 2.0])
    (tmp_path / "students" / "promotion_1_step_2").mkdir(parents=True)
    (tmp_path / "students" / "promotion_0_step_1").mkdir(parents=True)
    assert len(open(tmp_path / "promotion_questions.jsonl").readlines()) == 4
    resumed = Promotion(save_students=False)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
    TeacherMetaRL.on_load_checkpoint(module, module_state)
    resumed.setup(trainer, module, "fit")
    assert resumed.state_dict() == state and resumed.count == 1
    resumed.on_train_start(trainer, module)
    lines = [json.loads(line) for line in open(tmp_path / "promotion_questions.jsonl")]
    assert [(r["promotion"], r["step"]) for r in lines] == [(0, 1)] * 2
    assert sorted(p.name for p in (tmp_path / "students").iterdir()) == ["promotion_0_step_1"]
    # replaying step 2 gives the same file as a run that never crashed
    drive(resumed, module, trainer, 2, [3.0, 2.0])
    lines = [json.loads(line) for line in open(tmp_path / "promotion_questions.jsonl")]
    assert [(r["promotion"], r["step"]) for r in lines] == [(0, 1)] * 2 + [(1, 2)] * 2
    assert resumed.pq_lines == 4
    # a second train start (no new load) does not truncate anything
    resumed.on_train_start(trainer, module)
    assert len(open(tmp_path / "promotion_questions.jsonl").readlines()) == 4


# ------------------------------------------------------------------------ a real outer step
def test_teacher_meta_rl_promotes_the_best_median_student_and_resumes(tiny_random_lm, tmp_path):
    always = {"tau": -2.0, "window": 1, "require_improvement": False}  # R_k >= -1: always promote
    module = tiny_soar(tiny_random_lm, promotion=always)
    module.configure_model()
    module.sample_teacher_round = ScriptedTeacher(module, arithmetic_pairs(8, "123"))
    baseline = clone_state(module.student)
    cb = Promotion()
    trainer = fit_soar(module, tmp_path, callbacks=[cb])
    last = module.last_outer
    k_star = last.rewards.index(max(last.rewards))
    promoted = clone_state(module.student)
    assert same_state(promoted, last.median_students[k_star])
    assert not same_state(baseline, promoted)
    log_dir = Path(trainer.log_dir)
    rows = [json.loads(line) for line in open(log_dir / "promotion_questions.jsonl")]
    assert [(r["question"], r["answer"]) for r in rows] == [
        (p["question"], p["answer"]) for p in last.datasets[k_star]
    ]
    assert all(r["step"] == 0 and r["promotion"] == 0 and r["dataset"] == k_star for r in rows)
    assert (log_dir / "students" / "promotion_0_step_0" / "config.json").exists()
    metrics = list(csv.DictReader(open(log_dir / "metrics.csv")))
    logged = {k: float(v) for r in metrics for k, v in r.items() if v and k.startswith("promotion/")}
    assert logged == {
        "promotion/count": 1.0,
        "promotion/event": 1.0,
        "promotion/moving_avg": last.rewards[0] / 2 + last.rewards[1] / 2,
    }
    # the checkpoint holds the promoted student (a registered submodule) and the callback state
    ckpt = tmp_path / "step0.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert any("Promotion" in key for key in saved["callbacks"])
    assert torch.equal(saved["state_dict"]["student.lm_head.weight"], promoted["lm_head.weight"])
    # resume for one more outer step without promotion: the baseline is the promoted student
    module2 = tiny_soar(tiny_random_lm, promotion={"tau": 1e9, "window": 1})
    module2.configure_model()
    module2.sample_teacher_round = ScriptedTeacher(module2, arithmetic_pairs(8, "123"))
    cb2 = Promotion()
    fit_soar(module2, tmp_path, callbacks=[cb2], steps=2, ckpt_path=str(ckpt), version=0)  # the same log dir
    assert module2.last_outer.step == 1
    assert same_state(promoted, module2.student.state_dict())
    assert cb2.count == 1 and cb2.pq_lines == 4 and len(cb2.history) == 1  # reset by the promotion
    assert len(open(log_dir / "promotion_questions.jsonl").readlines()) == 4  # nothing lost or duplicated


# ------------------------------------------------------------------------ SIGKILL and resume
RUN_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import lightning as L
    from tests.helpers import ScriptedTeacher, arithmetic_pairs, fit_soar, tiny_soar
    from lit_selfimprove.callbacks import Promotion

    root, max_steps, kill_at, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    class Killer(L.Callback):  # after Promotion wrote its files, before the step's checkpoint
        def on_train_batch_end(self, trainer, pl_module, *args):
            if pl_module.last_outer.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    L.seed_everything(0)
    module = tiny_soar({lm!r}, promotion={{"tau": -2.0, "window": 1, "require_improvement": False}})
    module.configure_model()
    module.sample_teacher_round = ScriptedTeacher(module, arithmetic_pairs(8, "123"))
    callbacks = [
        Promotion(save_students=False),
        Killer(),
        L.pytorch.callbacks.ModelCheckpoint(dirpath=root + "/ckpt", every_n_train_steps=1, save_last=True),
    ]
    fit_soar(module, __import__("pathlib").Path(root), callbacks=callbacks, steps=max_steps,
             enable_checkpointing=True, ckpt_path=None if ckpt == "none" else ckpt, version=0)
    """
)


def test_sigkill_after_a_promotion_then_resume(tiny_random_lm, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(repo=str(REPO), lm=tiny_random_lm))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args):
        cmd = [sys.executable, str(script), str(tmp_path), *map(str, args)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    killed = run(3, 1, "none")  # promotes at step 0 (checkpointed) and step 1 (killed before its checkpoint)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    pq = tmp_path / "run" / "version_0" / "promotion_questions.jsonl"
    assert len(pq.read_text().splitlines()) == 8  # 2 promotions x n = 4 pairs
    resumed = run(3, -1, tmp_path / "ckpt" / "last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in pq.read_text().splitlines()]
    assert [(r["promotion"], r["step"]) for r in rows] == [(0, 0)] * 4 + [(1, 1)] * 4 + [(2, 2)] * 4
