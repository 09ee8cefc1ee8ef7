"""TeacherMetaRL (SOAR's outer loop): lenient pair parsing, rejection sampling, RLOO over
datasets, in-place restoration of the baseline student, the teacher update direction, the
intrinsic (learnability) reward and one end-to-end outer step.

The teacher is a tiny random Llama whose sampling is replaced by a scripted round of chosen
texts (real token ids through the real tokenizer), so that valid pairs exist and the teacher's
log-probs of them are those of the real model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_selfimprove.datamodules.arithmetic import TINY_TEACHER_PROMPT, teacher_text
from lit_selfimprove.loops import soar as soar_loops
from lit_selfimprove.loops.teacher_pairs import math_verify_parseable, parse_pair, parse_pairs
from lit_selfimprove.modules.soar_settings import InnerConfig
from lit_selfimprove.rewards import MathVerifyReward
from lit_selfimprove.rl.logprobs import sequence_logprobs
from lit_selfimprove.rl.teacher_rewards import learnability, learnability_per_question, teacher_advantages
from tests.helpers import (
    ScriptedTeacher,
    arithmetic_pairs,
    clone_state,
    fit_soar,
    same_state,
    tiny_soar,
)


# ------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "text, expected",
    [
        ("<question>3+4</question><answer>\\boxed{7}</answer>", ("3+4", "7")),
        (  # reasoning outside the tags, text around the box
            "Let me think.\n<question> What is 2+2? </question>\nso <answer>It is \\boxed{4}.</answer> done",
            ("What is 2+2?", "4"),
        ),
        ("<question>Find x.<question><answer>\\boxed{5}</answer>", ("Find x.", "5")),  # paper's typo
        ("<question>Find x. <answer>\\boxed{5}</answer>", ("Find x.", "5")),  # no closing tag
        ("<Question >Find x.</ QUESTION><ANSWER>\\boxed{\\frac{1}{2}}</Answer>", ("Find x.", "\\frac{1}{2}")),
        ("<question>q</question><answer>\\boxed{12}", ("q", "12")),  # no </answer>
        ("<question>q</question><answer>\\boxed{1} or \\boxed{2}</answer>", ("q", "2")),  # the last box
        ("What is 3+4? <answer>\\boxed{7}</answer>", None),  # no question tag
        ("<question>3+4</question> \\boxed{7}", None),  # no answer tag
        ("<question>  </question><answer>\\boxed{7}</answer>", None),  # empty question
        ("<question>q</question><answer>\\boxed{ }</answer>", None),  # empty answer
        ("<question>q</question><answer>\\boxed{\\frac{1}{2}</answer>", None),  # unbalanced braces
        ("<question>q</question><answer>seven</answer> \\boxed{7}", None),  # box outside the answer
        ("<answer>\\boxed{7}</answer><question>3+4</question>", None),  # answer before the question
        ("<question>q</question><answer>\\boxed{" + "1" * 201 + "}</answer>", None),  # too long
        ("", None),
    ],
)
def test_parse_pair(text, expected):
    assert parse_pair(text) == expected


def test_answer_checks():
    text = "<question>q</question><answer>\\boxed{7}</answer>"
    assert parse_pair(text, answer_ok=lambda a: a == "7") == ("q", "7")
    assert parse_pair(text, answer_ok=lambda a: a != "7") is None
    # math-verify parses expressions, not a bare command or punctuation
    assert math_verify_parseable(["7", "\\frac{1}{2}", "(1,2]", "???", "\\sqrt"]) == [
        True,
        True,
        True,
        False,
        False,
    ]
    texts = [text, "garbage", "<question>p</question><answer>\\boxed{???}</answer>"]
    calls = []

    def batched(answers):
        calls.append(list(answers))
        return math_verify_parseable(answers)

    assert parse_pairs(texts, batched) == [("q", "7"), None, None]
    assert calls == [["7", "???"]]  # one batched call, structurally invalid texts never reach it


def test_teacher_advantages_by_hand():
    # R = [0.1, 0.2, 0.3, 0.6], sum 1.2: A_k = R_k - (1.2 - R_k) / 3
    # -> 0.1 - 1.1/3 = -0.26667, 0.2 - 1.0/3 = -0.13333, 0.3 - 0.9/3 = 0, 0.6 - 0.6/3 = 0.4
    adv = teacher_advantages([0.1, 0.2, 0.3, 0.6])
    torch.testing.assert_close(adv, torch.tensor([-0.26667, -0.13333, 0.0, 0.4]), atol=1e-4, rtol=0)
    assert abs(float(adv.sum())) < 1e-6


def test_learnability_by_hand():
    # s = 0 -> 0 (never solved); else 1 - s: [0, 0.75, 0, 0.5] -> mean 1.25 / 4 = 0.3125
    torch.testing.assert_close(
        learnability_per_question([0.0, 0.25, 1.0, 0.5]), torch.tensor([0.0, 0.75, 0.0, 0.5])
    )
    assert learnability([0.0, 0.25, 1.0, 0.5]) == pytest.approx(0.3125)
    assert learnability([]) == 0.0


# -------------------------------------------------------------------- rejection sampling
def test_rejection_sampling_bound_names_the_validity_rate(tiny_random_lm):
    module = tiny_soar(tiny_random_lm, teacher_sampling={"batch": 4, "max_rounds": 2, "max_new_tokens": 8})
    module.configure_model()
    with pytest.raises(RuntimeError, match=r"8 samples \(2 rounds of 4\): validity rate 0\.0%"):
        module.sample_valid_pairs()  # a random teacher never writes a valid pair


def test_rejection_sampling_keeps_the_valid_rows(tiny_random_lm):
    module = tiny_soar(tiny_random_lm, teacher_sampling={"batch": 4, "answer_check": "math_verify"})
    module.configure_model()
    good = arithmetic_pairs(8, "123456789")
    bad = ["no tags at all", "<question>1+1</question><answer>\\boxed{???}</answer>"]  # 2nd: unparseable
    # rounds of 4: [good, bad, good (longer), bad] -> 2 valid per round, 4 rounds for g*n = 8
    texts = [t for i in range(4) for t in (good[2 * i], bad[i % 2], good[2 * i + 1] + " " * (3 * i), bad[1])]
    module.sample_teacher_round = ScriptedTeacher(module, texts)
    pairs, ro, stats = module.sample_valid_pairs()
    assert stats["validity"] == 0.5 and stats["sampling_rounds"] == 4
    assert len(pairs) == len(ro) == 8
    expected = [t for i in range(4) for t in (good[2 * i], good[2 * i + 1] + " " * (3 * i))]
    assert ro.texts == expected and pairs == [parse_pair(t) for t in expected]
    tok = module.teacher_tokenizer
    ids, attn, cmask = ro.sequences()
    for i, text in enumerate(expected):  # the kept token rows are those of the valid texts
        assert tok.decode(ids[i][cmask[i].bool()], skip_special_tokens=True) == text
        assert (
            tok.decode(ids[i][attn[i].bool() & ~cmask[i].bool()], skip_special_tokens=True)
            == TINY_TEACHER_PROMPT
        )


# ------------------------------------------------------------------------- outer step
def test_baseline_student_is_restored_between_inner_loops(tiny_random_lm, tmp_path, monkeypatch):
    module = tiny_soar(tiny_random_lm, promotion={"keep_median_students": "all"})  # every dataset's median
    module.configure_model()
    module.sample_teacher_round = ScriptedTeacher(module, arithmetic_pairs(8, "123"))
    baseline = clone_state(module.student)
    entries, exits = [], []
    train = soar_loops.train_inner

    def recording(*args, **kwargs):
        entries.append(clone_state(module.student))
        out = train(*args, **kwargs)
        exits.append(clone_state(module.student))
        return out

    monkeypatch.setattr(soar_loops, "train_inner", recording)
    fit_soar(module, tmp_path)
    assert len(entries) == 2 * 2  # g datasets x r repeats
    assert all(same_state(baseline, e) for e in entries)  # every inner training starts from the baseline
    assert not any(same_state(baseline, e) for e in exits)  # ... and really trained
    assert same_state(baseline, module.student.state_dict())  # the baseline again after the step
    last = module.last_outer
    for k in range(2):  # the kept student is the (lower) median-reward repeat of dataset k
        deltas = last.per_repeat[k]
        median = sorted(range(2), key=deltas.__getitem__)[0]
        assert same_state(exits[2 * k + median], last.median_students[k])
        assert last.rewards[k] == pytest.approx(sum(deltas) / 2)
    assert next(iter(last.median_students[0].values())).device.type == "cpu"


def test_teacher_update_raises_the_best_dataset(tiny_random_lm, tmp_path):
    g, n = 3, 4
    module = tiny_soar(
        tiny_random_lm, num_datasets=g, dataset_size=n, teacher_update={"lr": 1e-3, "kl_coef": 0.0}
    )
    module.configure_model()
    texts = [t for k, digits in enumerate(("12", "45", "89")) for t in arithmetic_pairs(n, digits, seed=k)]
    scripted = ScriptedTeacher(module, texts)
    module.sample_teacher_round = scripted
    known = [0.5, 0.0, -0.5]  # A = [0.75, 0, -0.75]
    module.grounded_rewards = lambda datasets, q, a, base: {
        "rewards": known,
        "per_repeat": [[r] for r in known],
        "median_students": [None] * g,
        "inner_stats": {"reward": 0.0},
    }

    def dataset_logps() -> torch.Tensor:
        ids, attn, cmask = scripted.calls[0].sequences()
        with torch.no_grad():
            return sequence_logprobs(module.teacher, ids, attn, cmask).sum(-1).view(g, n).mean(-1)

    scripted(g * n)  # build the rollouts once to measure before
    before = dataset_logps()
    scripted.pos, scripted.calls = 0, []
    fit_soar(module, tmp_path)
    assert module.last_outer.datasets[0][0]["answer"] == parse_pair(texts[0])[1]
    torch.testing.assert_close(torch.tensor(module.last_outer.advantages), torch.tensor([0.75, 0.0, -0.75]))
    delta = dataset_logps() - before
    # (Adam's first step is sign-like: all log-probs may move together; the ordering is what counts)
    assert delta[0] > delta[1] > delta[2], delta


class CountingReward:
    """Intrinsic test reward: of the samples of a question whose answer is ``c``, the first ``c``
    (of ``m`` in a row) are correct, so its success rate is ``c / m``."""

    def __init__(self, m: int):
        self.m = m

    def __call__(self, completions, answers, prompts=None):
        return torch.tensor([float(i % self.m < int(a)) for i, a in enumerate(answers)])


def test_intrinsic_reward_is_learnability_without_training(tiny_random_lm, tmp_path, monkeypatch):
    m = 4
    module = tiny_soar(
        tiny_random_lm, teacher_reward="intrinsic", intrinsic_samples=m, reward=CountingReward(m)
    )
    module.configure_model()
    # X_0 answers 0, 1, 2, 4 -> s = 0, .25, .5, 1 -> (0 + .75 + .5 + 0) / 4 = 0.3125; X_1 all 1 -> .75
    qa = [("0+0", "0"), ("0+1", "1"), ("1+1", "2"), ("2+2", "4")] + [("1+0", "1")] * 4
    module.sample_teacher_round = ScriptedTeacher(module, [teacher_text(q, a) for q, a in qa])
    monkeypatch.setattr(
        soar_loops, "train_inner", lambda *a, **k: pytest.fail("intrinsic mode must not train the student")
    )
    baseline = clone_state(module.student)
    fit_soar(module, tmp_path)
    last = module.last_outer
    assert last.rewards == pytest.approx([0.3125, 0.75])
    assert last.success_rates[0] == pytest.approx([0.0, 0.25, 0.5, 1.0])
    assert same_state(baseline, module.student.state_dict())
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert float(rows[0]["teacher/reward_mean"]) == pytest.approx((0.3125 + 0.75) / 2)
    assert float(rows[0]["intrinsic/success_rate"]) == pytest.approx((1.75 + 1.0) / 8)


def test_one_outer_step_end_to_end(tiny_random_lm, tmp_path):
    reward = MathVerifyReward(mode="binary", num_workers=1)
    module = tiny_soar(
        tiny_random_lm,
        reward=reward,
        teacher_sampling={"answer_check": "auto"},
        teacher_update={"kl_coef": 0.001},
        inner=InnerConfig(steps=2, batch=2, group_size=4, max_new_tokens=6, lr=1e-2, kl_coef=0.01),
        log_samples_every=1,
    )
    module.configure_model()
    baseline = clone_state(module.student)
    module.sample_teacher_round = ScriptedTeacher(module, arithmetic_pairs(8, "0123456789"))
    trainer = fit_soar(
        module, tmp_path, limit_val_batches=1, val_check_interval=1, check_val_every_n_epoch=None
    )
    reward.close()
    assert trainer.global_step == 1  # global_step counts outer steps (teacher optimizer steps)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = {k for r in rows for k, v in r.items() if v}
    for name in (
        "teacher/reward_mean", "teacher/reward_0", "teacher/reward_1", "teacher/validity", "teacher/kl",
        "teacher/loss", "teacher/lr", "baseline/accuracy", "inner/mean_reward", "inner/accuracy_after",
        "inner/verify_timeouts", "val/accuracy", "teacher/vendi",
    ):  # fmt: skip
        assert name in logged, name
    assert float(next(r for r in rows if r["teacher/validity"])["teacher/validity"]) == 1.0
    samples = [json.loads(line) for line in open(next(tmp_path.rglob("teacher_samples.jsonl")))]
    assert len(samples) == 8 and {"step", "dataset", "reward", "question", "answer"} <= set(samples[0])
    last = module.last_outer
    assert len(last.datasets) == 2 and all(len(d) == 4 for d in last.datasets)
    assert len(last.per_repeat[0]) == 2 and 0.0 <= last.baseline_accuracy <= 1.0
    # diversity of the step's questions: the Vendi score of all g*n questions, logged as is
    from lit_selfimprove.metrics import HashingNgramEmbedding, vendi_score

    questions = [p["question"] for d in last.datasets for p in d]
    expected = float(vendi_score(HashingNgramEmbedding()(questions)))
    logged_vendi = float(next(r for r in rows if r["teacher/vendi"])["teacher/vendi"])
    assert expected > 1.0 and logged_vendi == pytest.approx(expected, rel=1e-5)
    # checkpoint: teacher policy and baseline student; the frozen initial teacher stays out
    keys = module.state_dict().keys()
    n_params = sum(1 for _ in module.teacher.state_dict()) + sum(1 for _ in module.student.state_dict())
    assert len(keys) == n_params and all(k.startswith(("teacher.", "student.")) for k in keys)
    assert module.ref_teacher is not None
    assert same_state(baseline, module._frozen["student_ref"].state_dict())  # inner KL to the baseline
    # the final teacher as a Hugging Face folder (what sample-questions reads for Grounded-T)
    from lit_selfimprove.modeling import load_causal_lm

    saved = load_causal_lm(str(Path(trainer.log_dir) / "teacher"))
    assert same_state(clone_state(module.teacher), saved.state_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"teacher_reward": "oracle"}, "teacher_reward"),
        ({"num_datasets": 1}, "num_datasets"),
        ({"teacher_sampling": {"answer_check": "strict"}}, "answer_check"),
        ({"prompt_template": "no field"}, "question"),
        ({"promotion": {"median": "middle"}}, "median"),
        ({"promotion": {"keep_median_students": "maybe"}}, "keep_median_students"),
        # a promotion installs a kept student: without any, the first promotion (hours in) would fail
        ({"promotion": {"keep_median_students": False}}, "keep_median_students=False keeps none"),
        # a real model's prompt says \\boxed{}: str.format would fail at the first step, after loading
        ({"prompt_template": "Q: {question}\\nPut the answer in \\\\boxed{}."}, "braces doubled"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny_random_lm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_soar(tiny_random_lm, **kwargs)


def test_median_keeper_holds_at_most_r_plus_g_copies():
    """keep_median_students: a dataset's copies live until its r repeats are measured, then only the
    median's stays, so g=4 datasets x r=3 repeats peak at r + g - 1 = 6 copies, not g * r = 12."""
    from lit_selfimprove.modules.soar_outer import MedianStudents

    g, r = 4, 3
    keeper, model = MedianStudents(r, pick=(r - 1) // 2), torch.nn.Linear(2, 2)
    medians = []
    for k in range(g):
        for i in range(r):
            with torch.no_grad():
                model.weight.fill_(10 * k + i)
            keeper.offer(k * r + i, model)
        medians.append(keeper.settle(k, [0.3, 0.1, 0.2]))  # repeat 2 is the median
    assert medians == [k * r + 2 for k in range(g)] and sorted(keeper.states) == medians
    assert keeper.peak == r + g - 1
    assert all(
        torch.equal(keeper.states[j]["weight"], torch.full((2, 2), float(j // r * 10 + 2))) for j in medians
    )


def test_keeping_no_students_is_fine_without_promotions(tiny_random_lm):
    tiny_soar(tiny_random_lm, promotion={"keep_median_students": False, "promote": False})
    tiny_soar(
        tiny_random_lm, promotion={"keep_median_students": False}, teacher_reward="intrinsic"
    )  # trains none


# ------------------------------------------------------------- keep_median_students: disk
def test_a_full_disk_names_the_student_file_and_the_free_space(tmp_path, monkeypatch):
    """torch's own error for a full disk names no path; the keeper's says where, and how much room."""
    from lit_selfimprove.modules.soar_outer import MedianStudents

    def disk_full(obj, f, *args, **kwargs):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", disk_full)
    keeper = MedianStudents(2, 0, "best", offload_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        keeper.offer(0, torch.nn.Linear(2, 2), 0.5)
    message = str(err.value)
    assert str(tmp_path / "student_0.pt") in message and "free on that disk" in message
    assert "median_students_dir" in message and "unexpected pos" in message
    assert not list(tmp_path.iterdir())  # the partial file is removed


def test_student_folder_removes_leftovers_and_fails_early_when_not_writable(tmp_path):
    from lit_selfimprove.modules.median_students import StudentFolder

    folder = StudentFolder(tmp_path / "kept", rank=1)
    folder.path.mkdir(parents=True)
    (folder.path / "student_3.pt").write_bytes(b"left by a crash")
    (folder.path / "notes.txt").write_text("not ours")
    folder.prepare()
    assert sorted(p.name for p in folder.path.iterdir()) == ["notes.txt"]
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RuntimeError, match="a_file.*median_students_dir"):
        StudentFolder(tmp_path / "a_file" / "kept").prepare()


def test_disk_students_live_in_the_run_directory_and_are_removed(tiny_random_lm, tmp_path, monkeypatch):
    """keep_median_students='disk': the files go to <log dir>/median_students/rank_0 (not the system temp
    folder), what a crashed run left there is removed when fit starts, and the folder when it ends."""
    import tempfile

    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: pytest.fail("the system temp folder was used"))
    folder = tmp_path / "run" / "version_0" / "median_students" / "rank_0"
    folder.mkdir(parents=True)
    (folder / "student_5.pt").write_bytes(b"left by a crashed run")
    module = tiny_soar(tiny_random_lm, promotion={"keep_median_students": "disk"}, save_teacher=False)
    module.configure_model()
    module.sample_teacher_round = ScriptedTeacher(module, arithmetic_pairs(8, "123"))
    seen = []

    class Look(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.extend(pl_module.median_keeper.states.values())
            seen.append(sorted(p.name for p in folder.iterdir()))

    fit_soar(module, tmp_path, version=0, callbacks=[Look()])
    kept, names = seen
    assert Path(kept).parent == folder and names == [Path(kept).name]  # the crash's file is gone
    assert not folder.parent.exists()  # removed at the end of training
    (tmp_path / "not_a_dir").write_text("")
    module = tiny_soar(
        tiny_random_lm,
        promotion={"keep_median_students": "disk", "median_students_dir": str(tmp_path / "not_a_dir")},
    )
    module.sample_teacher_round = lambda num: pytest.fail("an outer step ran before the folder was checked")
    with pytest.raises(RuntimeError, match="not_a_dir"):
        fit_soar(module, tmp_path / "second")
