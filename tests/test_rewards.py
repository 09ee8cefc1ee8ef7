"""Tests for lit_selfimprove.rewards.MathVerifyReward and its helpers."""

from __future__ import annotations

import copy
import json
import os
import pickle
import signal
import time

import pytest
import torch

from lit_selfimprove.rewards import MathVerifyReward, extract_boxed, strip_answer
from tests.helpers import MATH500, SHARED_DATA

TOWER = "\\boxed{9^{9^{9^{9^{9}}}}}"


@pytest.fixture(scope="module")
def binary():
    reward = MathVerifyReward(mode="binary", timeout=3.0)
    yield reward
    reward.close()


@pytest.fixture(scope="module")
def shaped():
    reward = MathVerifyReward(mode="shaped", timeout=3.0)
    yield reward
    reward.close()


def _worker_pids(reward: MathVerifyReward) -> list[int]:
    pool = reward._pool_ref[0]
    assert pool is not None, "workers were not started"
    return [w.proc.pid for w in pool.workers if w is not None]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- helpers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{5}.", "5"),
        ("first \\boxed{1}, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{ \\left( 3, \\frac{\\pi}{2} \\right) }", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} and finally \\fbox{x^{2}}", "x^{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("$\\boxed 42$", "42"),
        ("\\boxed {3}", "3"),
        ("\\boxed{}", ""),
        ("\\boxed{3} then \\boxed{\\frac{1", None),  # last box unterminated (truncated generation)
        ("no box here", None),
        ("\\boxedfoo{3}", None),
        ("\\boxed{2} \\boxedfoo{3}", "2"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        (" $\\frac{1}{2}$ ", "\\frac{1}{2}"),
        ("$$x+1$$", "x+1"),
        ("\\(3\\pi\\)", "3\\pi"),
        ("\\[ 7 \\]", "7"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("$\\boxed{5}$", "5"),
        ("\\fbox{4}", "4"),
        ("$69$,$84$", "69,84"),
        ("$90^{\\circ}$.", "90^{\\circ}"),
        ("\\$5", "\\$5"),
        ("$\\$5$", "\\$5"),
        ("\\boxed{1}+\\boxed{2}", "\\boxed{1}+\\boxed{2}"),
    ],
)
def test_strip_answer(ref, expected):
    assert strip_answer(ref) == expected


# -- argument checks ----------------------------------------------------------------------------------------
def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        MathVerifyReward(mode="dense")
    with pytest.raises(ValueError, match="timeout"):
        MathVerifyReward(timeout=0)
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifyReward(num_workers=0)
    reward = MathVerifyReward()
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        reward(["\\boxed{1}", "\\boxed{2}"], ["1"])
    with pytest.raises(ValueError):
        reward.correct(["\\boxed{1}"], [])
    assert reward._pool_ref[0] is None  # nothing started for failed calls


def test_empty_batch_starts_nothing():
    reward = MathVerifyReward(mode="shaped")
    rewards, correct = reward.score([], [])
    assert rewards.shape == (0,) and rewards.dtype == torch.float32
    assert correct.shape == (0,) and correct.dtype == torch.bool
    assert reward._pool_ref[0] is None


# -- values -------------------------------------------------------------------------------------------------
EQUIV_CASES = [
    # (completion, reference, correct)
    ("The answer is \\boxed{0.5}.", "\\frac{1}{2}", True),
    ("The answer is \\boxed{\\dfrac12}.", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{2}{4}}", "$\\frac{1}{2}$", True),  # reference in $...$
    ("\\boxed{\\sqrt{2}/2}", "\\boxed{\\frac{\\sqrt{2}}{2}}", True),  # reference in \boxed{}
    ("\\fbox{3\\pi}", "\\(3\\pi\\)", True),
    ("first \\boxed{7}, no wait, \\boxed{8}", "8", True),  # last box counts
    ("first \\boxed{8}, no wait, \\boxed{7}", "8", False),
    ("\\boxed{0.51}", "\\frac{1}{2}", False),
    ("\\boxed{(1, 2)}", "(2, 1)", False),
    ("the answer is 1/2", "\\frac{1}{2}", False),  # no box
]


def test_binary_values(binary):
    completions = [c for c, _, _ in EQUIV_CASES]
    answers = [a for _, a, _ in EQUIV_CASES]
    expected = torch.tensor([float(ok) for _, _, ok in EQUIV_CASES])
    rewards = binary(completions, answers)
    assert rewards.dtype == torch.float32 and rewards.shape == (len(EQUIV_CASES),)
    torch.testing.assert_close(rewards, expected)
    # protocol compatibility: prompts= is accepted and ignored
    torch.testing.assert_close(binary(completions, answers, prompts=["p"] * len(completions)), expected)
    correct = binary.correct(completions, answers)
    assert correct.dtype == torch.bool
    assert correct.tolist() == [ok for _, _, ok in EQUIV_CASES]


def test_shaped_values(shaped):
    completions = [
        "so \\boxed{\\frac{1}{2}}",  # correct
        "hence \\boxed{0.5}",  # correct (equivalent form)
        "\\boxed{x = 1/2 \\text{ or } x = 3}",  # not equivalent, contains the reference "1/2"
        "\\boxed{ 1 / 2 + 1 }",  # contains the reference up to whitespace
        "\\boxed{3}",  # boxed and wrong
        "\\boxed{}",  # empty box: boxed and wrong
        "the answer is 1/2",  # no box
    ]
    answers = ["$1/2$"] * len(completions)
    rewards, correct = shaped.score(completions, answers)
    torch.testing.assert_close(rewards, torch.tensor([120.0, 120.0, 20.0, 20.0, 10.0, 10.0, 0.0]))
    assert correct.tolist() == [True, True, False, False, False, False, False]
    torch.testing.assert_close(shaped(completions, answers), rewards)
    assert shaped.correct(completions, answers).tolist() == correct.tolist()


def test_duplicates_are_scored_consistently(binary):
    completions = ["\\boxed{0.25}", "\\boxed{0.3}"] * 8
    rewards = binary(completions, ["\\frac14"] * 16)
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.0] * 8))


def test_counters_and_pop_stats():
    reward = MathVerifyReward(mode="binary", max_completion_chars=100)
    try:
        reward.pop_stats()
        reward(["\\boxed{2}", "\\boxed{0.5}", "no box", "x" * 200 + "\\boxed{2}"], ["2", "1/2", "2", "2"])
        assert reward.pop_stats() == {"timeouts": 0, "verified": 2, "too_long": 1}
        assert reward.pop_stats() == {"timeouts": 0, "verified": 0, "too_long": 0}
        assert reward.num_verified == 2 and reward.num_too_long == 1 and reward.timeouts == 0
    finally:
        reward.close()


# -- hostile inputs ---------------------------------------------------------------------------------------------
def test_hostile_inputs_are_fast_and_wrong():
    timeout = 1.0
    reward = MathVerifyReward(mode="shaped", timeout=timeout)
    try:
        reward(["\\boxed{1}"], ["2"])  # start the workers outside of the timed region
        reward.pop_stats()
        big = "x" * (5 * 1024 * 1024)
        completions = [
            TOWER,
            big + "\\boxed{2}",  # 5 MB, boxed: too long -> boxed and wrong
            big,  # 5 MB, no box
            "\\boxed{2\ud800}",  # lone surrogate (invalid UTF-8) inside the answer
            "\\boxed{2\x00}",  # NUL byte inside the answer
            "\ud800\x00 junk \udfff then \\boxed{7}",  # junk outside the box is harmless
        ]
        answers = ["5", "2", "2", "2", "2", "7"]
        start = time.monotonic()
        rewards, correct = reward.score(completions, answers)
        elapsed = time.monotonic() - start
        assert elapsed < timeout + 3.0, f"hostile batch took {elapsed:.1f}s"
        torch.testing.assert_close(rewards, torch.tensor([10.0, 10.0, 0.0, 10.0, 10.0, 120.0]))
        assert correct.tolist() == [False, False, False, False, False, True]
        assert reward.timeouts == 1
        stats = reward.pop_stats()
        assert stats["timeouts"] == 1 and stats["too_long"] == 2

        # The reward keeps working afterwards.
        rewards = reward(["\\boxed{0.5}", "\\boxed{3}", TOWER], ["\\frac{1}{2}", "3", "5"])
        torch.testing.assert_close(rewards, torch.tensor([120.0, 120.0, 10.0]))
        assert reward.timeouts == 2
    finally:
        reward.close()


def test_hung_worker_is_killed_and_replaced():
    """A worker stuck where SIGALRM cannot reach it (here: SIGSTOP) is killed at the hard deadline and its
    remaining items go to a fresh worker."""
    timeout = 1.0
    reward = MathVerifyReward(mode="binary", timeout=timeout, num_workers=1)
    try:
        assert reward(["\\boxed{0.5}"], ["1/2"]).tolist() == [1.0]
        (old_pid,) = _worker_pids(reward)
        os.kill(old_pid, signal.SIGSTOP)
        start = time.monotonic()
        # chunks of 2 items: item 0 hangs, item 1 is re-sent to the replacement worker with item 2
        rewards = reward(["\\boxed{0.5}", "\\boxed{0.25}", "\\boxed{3}"], ["1/2", "1/4", "4"])
        elapsed = time.monotonic() - start
        assert rewards.tolist() == [0.0, 1.0, 0.0]
        assert reward.timeouts == 1 and reward.worker_restarts == 1
        assert not _pid_alive(old_pid)
        (new_pid,) = _worker_pids(reward)
        assert new_pid != old_pid
        assert elapsed < timeout + 30.0  # hard deadline + start-up of the replacement on a loaded machine
        assert reward(["\\boxed{0.5}"], ["1/2"]).tolist() == [1.0]
    finally:
        reward.close()


def test_dead_worker_is_replaced():
    reward = MathVerifyReward(mode="binary", num_workers=1)
    try:
        assert reward(["\\boxed{0.5}"], ["1/2"]).tolist() == [1.0]
        (old_pid,) = _worker_pids(reward)
        os.kill(old_pid, signal.SIGKILL)
        assert reward(["\\boxed{0.5}", "\\boxed{2}"], ["1/2", "3"]).tolist() == [1.0, 0.0]
        assert _worker_pids(reward)[0] != old_pid
    finally:
        reward.close()


# -- lifecycle -------------------------------------------------------------------------------------------------
def test_workers_are_reused_and_closed(binary):
    binary(["\\boxed{0.5}"], ["1/2"])
    pids = _worker_pids(binary)
    assert len(pids) == 2
    binary(["\\boxed{0.75}"], ["3/4"])
    assert _worker_pids(binary) == pids

    reward = MathVerifyReward(num_workers=1)
    reward(["\\boxed{0.5}"], ["1/2"])
    (pid,) = _worker_pids(reward)
    reward.close()
    assert reward._pool_ref[0] is None and not _pid_alive(pid)
    assert reward(["\\boxed{0.5}"], ["1/2"]).tolist() == [1.0]  # restarts lazily after close()
    (pid,) = _worker_pids(reward)
    del reward  # garbage collection stops the workers
    deadline = time.monotonic() + 5.0
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(pid)


def test_pickle_and_deepcopy(shaped):
    shaped(["\\boxed{0.5}"], ["1/2"])  # workers running
    for clone in (pickle.loads(pickle.dumps(shaped)), copy.deepcopy(shaped)):
        assert clone._pool_ref[0] is None
        assert (clone.mode, clone.timeout, clone.num_workers) == ("shaped", 3.0, 2)
        assert "mode='shaped'" in repr(clone)
    clone = copy.deepcopy(shaped)
    torch.testing.assert_close(
        clone(["\\boxed{0.5}", "\\boxed{1}"], ["1/2", "2"]), torch.tensor([120.0, 10.0])
    )
    assert set(_worker_pids(clone)).isdisjoint(_worker_pids(shaped))
    clone.close()
    torch.testing.assert_close(shaped(["\\boxed{0.5}"], ["1/2"]), torch.tensor([120.0]))


def test_warm_call_is_fast(binary):
    binary(["\\boxed{1}"], ["2"])  # warm
    completions = [f"Reasoning... so the answer is \\boxed{{\\frac{{{i}}}{{{i + 1}}}}}." for i in range(64)]
    answers = [f"{i}/{i + 1}" for i in range(64)]
    start = time.monotonic()
    correct = binary.correct(completions, answers)
    elapsed = time.monotonic() - start
    assert bool(correct.all())
    assert elapsed < 64 * 0.05, f"64 warm verifications took {elapsed:.2f}s"


# -- real data ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} not found")
def test_math500_reference_solutions_are_accepted(binary):
    records = [json.loads(line) for line in MATH500.read_text().splitlines() if line.strip()]
    assert len(records) == 500
    solutions = [r["solution"] for r in records]
    answers = [r["answer"] for r in records]

    rate = binary(solutions, answers).mean().item()
    print(f"MATH-500 acceptance of reference solutions: {rate:.4f}")
    assert rate >= 0.99

    # Same check with every pair going through math-verify in the workers (no exact-match shortcut).
    slow = copy.deepcopy(binary)
    slow._short_circuit = False
    try:
        rate_verified = slow(solutions, answers).mean().item()
        print(f"MATH-500 acceptance via math-verify only: {rate_verified:.4f}")
        assert rate_verified >= 0.99
        assert slow.pop_stats()["timeouts"] == 0
        # ... and it is not accepting everything: solutions paired with another problem's answer.
        subset = slice(0, 100)
        wrong_rate = slow(solutions[subset], answers[1:101]).mean().item()
        print(f"MATH-500 acceptance of mismatched pairs: {wrong_rate:.4f}")
        assert wrong_rate <= 0.05
    finally:
        slow.close()
