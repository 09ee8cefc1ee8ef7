"""Verifiable math reward: the last ``\\boxed{}`` answer of a completion checked against a reference.

:class:`MathVerifyReward` compares answers with `math-verify <https://github.com/huggingface/Math-Verify>`_
(sympy-based equivalence: ``\\frac{1}{2}`` == ``0.5`` == ``\\dfrac12``). Verification runs in a small pool
of long-lived worker processes with a per-item wall-clock timeout, so that a hostile completion (an
exponent tower that sympy tries to evaluate, megabytes of text, lone surrogates, NUL bytes) can neither
hang nor crash the training process: math-verify's own timeout relies on ``SIGALRM`` (main thread only) and
cannot interrupt a computation stuck in C code, whereas a worker process can always be killed.

Cheap work stays in the parent: answer extraction (pure Python), length checks, exact-match short-circuits
and de-duplication of identical (answer, reference) pairs within a call; only the extracted answer and
the reference travel to a worker.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

import torch
from torch import Tensor

from lit_selfimprove.rewards.answers import (
    _SURROGATE_RE,
    _normalize,
    _sanitize,
    _to_text,
    extract_boxed,
    strip_answer,
)

__all__ = ["MathVerifyReward", "extract_boxed", "strip_answer"]

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_verify_worker.py")
# Run the worker file as __main__ without putting its folder (which holds this ``math_verify.py``, shadowing
# the real library) or the current directory on sys.path.
_BOOTSTRAP = (
    "import runpy, sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)

# Status codes sent back by the worker (see _verify_worker.py).
_WRONG, _CORRECT, _TIMEOUT, _ERROR = 0, 1, 2, 3

_SHAPED_CORRECT, _SHAPED_CONTAINS, _SHAPED_BOXED, _SHAPED_NONE = 120.0, 20.0, 10.0, 0.0


class _Worker:
    __slots__ = ("proc", "conn", "ready", "ready_deadline", "batch", "pos", "deadline")

    def __init__(self, proc: subprocess.Popen, conn: Connection, ready_deadline: float) -> None:
        self.proc = proc
        self.conn = conn
        self.ready = False
        self.ready_deadline = ready_deadline
        self.batch: list[int] | None = None  # item ids sent, not all answered yet
        self.pos = 0  # index in ``batch`` of the item being processed
        self.deadline = math.inf  # hard deadline of that item

    def kill(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        """Ask an idle worker to exit, kill it if it does not within a short grace period."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class _VerifierPool:
    """Long-lived worker processes that verify (answer, reference) pairs with a per-item deadline."""

    MAX_START_FAILURES = 3

    def __init__(self, num_workers: int, timeout: float, startup_timeout: float = 120.0) -> None:
        self.num_workers = num_workers
        self.timeout = timeout
        # The worker enforces ``timeout`` itself (SIGALRM); the parent kills it ``grace`` seconds later.
        self.hard_timeout = timeout + min(1.0, 0.25 + 0.25 * timeout)
        self.startup_timeout = startup_timeout
        self.pid = os.getpid()
        self.workers: list[_Worker | None] = [None] * num_workers
        self.restarts = 0
        self._start_failures = 0
        self._crashed: set[int] = set()  # items (of the current run) whose worker died once already

    # -- process management -------------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        if not sys.executable:
            raise RuntimeError(
                "MathVerifyReward: sys.executable is unknown, cannot start verification workers"
            )
        parent_sock, child_sock = socket.socketpair()
        try:
            child_fd = child_sock.fileno()
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _WORKER_SCRIPT, str(child_fd), repr(float(self.timeout))],
                pass_fds=(child_fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        return _Worker(proc, conn, time.monotonic() + self.startup_timeout)

    def _replace(self, index: int, *, failed_start: bool = False) -> None:
        worker = self.workers[index]
        if worker is not None:
            worker.kill()
        if failed_start:
            self._start_failures += 1
            if self._start_failures >= self.MAX_START_FAILURES:
                self.workers[index] = None
                self.close()
                raise RuntimeError(
                    "MathVerifyReward: verification worker failed to start "
                    f"{self._start_failures} times in a row (see its stderr above); is math-verify installed "
                    f"for {sys.executable}?"
                )
        else:
            self.restarts += 1
        self.workers[index] = self._spawn()

    def start(self) -> None:
        for index, worker in enumerate(self.workers):
            if worker is None or worker.proc.poll() is not None:
                if worker is not None:
                    worker.kill()
                self.workers[index] = self._spawn()

    def close(self) -> None:
        workers, self.workers = self.workers, [None] * self.num_workers
        if os.getpid() != self.pid:  # a forked copy must not touch the parent's workers
            return
        for worker in workers:
            if worker is not None:
                worker.stop()

    # -- verification -------------------------------------------------------------------------------------
    def run(self, jobs: Sequence[tuple[str, str]]) -> list[int]:
        """Verify ``(answer, reference)`` pairs; return one status code per pair, in order."""
        statuses: list[int] = [_ERROR] * len(jobs)
        if not jobs:
            return statuses
        self.start()
        pending: deque[int] = deque(range(len(jobs)))
        self._crashed = set()
        remaining = len(jobs)
        # Several items per message, few enough that a slow item holds up little work behind it.
        chunk = max(1, min(8, math.ceil(len(jobs) / (2 * self.num_workers))))
        try:
            while remaining:
                now = time.monotonic()
                # Hand out work to idle workers.
                for index, worker in enumerate(self.workers):
                    if not pending or worker is None or not worker.ready or worker.batch is not None:
                        continue
                    ids = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                    try:
                        worker.conn.send([(i, jobs[i][0], jobs[i][1]) for i in ids])
                    except (OSError, ValueError):
                        pending.extendleft(reversed(ids))
                        self._replace(index)
                        continue
                    worker.batch, worker.pos, worker.deadline = ids, 0, now + self.hard_timeout

                # Wait for results or for the nearest deadline.
                conns = {w.conn: i for i, w in enumerate(self.workers) if w is not None}
                deadlines = [
                    (w.deadline if w.ready else w.ready_deadline)
                    for w in self.workers
                    if w is not None and (w.batch is not None or not w.ready)
                ]
                wait_for = max(0.0, min(deadlines) - now) if deadlines else 1.0
                for conn in wait(list(conns), timeout=wait_for):
                    remaining -= self._drain(conns[conn], statuses, pending)

                # Enforce deadlines.
                now = time.monotonic()
                for index, worker in enumerate(self.workers):
                    if worker is None:
                        continue
                    if worker.batch is not None and now > worker.deadline:
                        statuses[worker.batch[worker.pos]] = _TIMEOUT
                        remaining -= 1
                        pending.extendleft(reversed(worker.batch[worker.pos + 1 :]))
                        self._replace(index)
                    elif not worker.ready and now > worker.ready_deadline:
                        self._replace(index, failed_start=True)
        except BaseException:
            # Interrupted mid-call (e.g. KeyboardInterrupt): workers may hold stale work, start afresh.
            self.close()
            raise
        return statuses

    def _drain(self, index: int, statuses: list[int], pending: deque[int]) -> int:
        """Read all available messages of worker ``index``; return the number of items completed.

        If the worker died, the rest of its batch is requeued.
        """
        worker = self.workers[index]
        done = 0
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "ready":
                    worker.ready = True
                    self._start_failures = 0
                    continue
                item_id, status = message
                if worker.batch is None or worker.batch[worker.pos] != item_id:
                    continue  # cannot happen with this protocol; ignore rather than mis-assign
                statuses[item_id] = status
                done += 1
                worker.pos += 1
                worker.deadline = time.monotonic() + self.hard_timeout
                if worker.pos == len(worker.batch):
                    worker.batch, worker.pos, worker.deadline = None, 0, math.inf
        except (EOFError, OSError):
            # The worker died (crash, out of memory, killed from outside). Its current item is retried once
            # (the worker may have died before even reading it); an item that kills two workers is an error.
            if worker.batch is not None:
                current = worker.batch[worker.pos]
                rest = worker.batch[worker.pos + 1 :]
                if current in self._crashed:
                    statuses[current] = _ERROR
                    done += 1
                else:
                    self._crashed.add(current)
                    rest.insert(0, current)
                pending.extendleft(reversed(rest))
            self._replace(index, failed_start=not worker.ready)
        return done


def _shutdown_pool(pool_ref: list) -> None:
    pool = pool_ref[0]
    pool_ref[0] = None
    if pool is not None:
        pool.close()


class MathVerifyReward:
    """Reward a completion by checking its last ``\\boxed{}`` answer against a reference with math-verify.

    Args:
        mode: ``"binary"``: 1.0 if the boxed answer is equivalent to the reference, else 0.0.
            ``"shaped"`` (SOAR): 120 if equivalent; 20 if boxed, not equivalent, but the reference string
            occurs inside the boxed answer; 10 if boxed and wrong; 0 if there is no boxed answer.
        timeout: wall-clock seconds allowed to verify one answer. An answer that runs over scores as wrong
            (counted in :attr:`timeouts`); a worker stuck in C code is killed and replaced.
        num_workers: number of verification processes. They start on the first call and are reused.
        max_completion_chars: longer completions are not verified and score as wrong (shaped: 10 if the
            last ``max_completion_chars`` characters hold a boxed answer, else 0); counted as ``too_long``.

    Call as ``reward(completions, answers)`` (``prompts=`` is accepted and ignored) for a float32 tensor of
    rewards, :meth:`correct` for a bool tensor of plain correctness, or :meth:`score` for both from one
    verification pass. References may be wrapped in ``$..$``, ``\\(..\\)`` or ``\\boxed{}``.

    Counters: :attr:`timeouts`, :attr:`num_verified` (answers compared with their reference, including
    exact-match short-circuits), :attr:`num_too_long`, :attr:`worker_restarts` (all since construction) and
    :meth:`pop_stats` (since the previous pop). Call :meth:`close` to stop the workers early; otherwise
    they stop when the object is garbage-collected or at interpreter exit. Pickling/deep-copying drops the
    workers (the copy starts its own on first use).
    """

    MODES = ("binary", "shaped")
    _short_circuit = True  # accept an answer equal to the reference (up to whitespace) without a worker

    def __init__(
        self,
        mode: str = "binary",
        timeout: float = 5.0,
        num_workers: int = 2,
        max_completion_chars: int = 20000,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"MathVerifyReward: mode must be one of {self.MODES}, got {mode!r}")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(
                f"MathVerifyReward: timeout must be a positive number of seconds, got {timeout!r}"
            )
        if int(num_workers) != num_workers or num_workers < 1:
            raise ValueError(f"MathVerifyReward: num_workers must be an integer >= 1, got {num_workers!r}")
        if int(max_completion_chars) != max_completion_chars or max_completion_chars < 1:
            raise ValueError(
                f"MathVerifyReward: max_completion_chars must be an integer >= 1, got {max_completion_chars!r}"
            )
        self.mode = mode
        self.timeout = float(timeout)
        self.num_workers = int(num_workers)
        self.max_completion_chars = int(max_completion_chars)
        self.timeouts = 0
        self.num_verified = 0
        self.num_too_long = 0
        self._since_pop = {"timeouts": 0, "verified": 0, "too_long": 0}
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._pool_ref: list[_VerifierPool | None] = [None]
        self._finalizer = weakref.finalize(self, _shutdown_pool, self._pool_ref)
        self._restarts_closed = 0

    # -- pickling / copying: never carry processes or locks ------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_lock", "_pool_ref", "_finalizer"):
            state.pop(key, None)
        state["_since_pop"] = dict(self._since_pop)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode!r}, timeout={self.timeout}, num_workers={self.num_workers}, "
            f"max_completion_chars={self.max_completion_chars})"
        )

    # -- lifecycle ----------------------------------------------------------------------------------------
    def _pool(self) -> _VerifierPool:
        pool = self._pool_ref[0]
        if pool is not None and pool.pid != os.getpid():  # forked copy: the workers belong to the parent
            pool = None
        if pool is None:
            pool = _VerifierPool(self.num_workers, self.timeout)
            self._pool_ref[0] = pool
            if not self._finalizer.alive:
                self._finalizer = weakref.finalize(self, _shutdown_pool, self._pool_ref)
        return pool

    def close(self) -> None:
        """Stop the worker processes (they are restarted if the reward is called again)."""
        pool = self._pool_ref[0]
        if pool is not None:
            self._restarts_closed += pool.restarts
        _shutdown_pool(self._pool_ref)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def worker_restarts(self) -> int:
        """Workers replaced so far (after a timeout or a crash)."""
        pool = self._pool_ref[0]
        return self._restarts_closed + (pool.restarts if pool is not None else 0)

    def pop_stats(self) -> dict[str, int]:
        """Counts since the previous call: ``timeouts``, ``verified`` and ``too_long``; resets them."""
        with self._lock:
            stats, self._since_pop = self._since_pop, {"timeouts": 0, "verified": 0, "too_long": 0}
        return stats

    # -- scoring ------------------------------------------------------------------------------------------
    def __call__(self, completions: Sequence[str], answers: Sequence[str], prompts=None) -> Tensor:
        return self.score(completions, answers)[0]

    def correct(self, completions: Sequence[str], answers: Sequence[str]) -> Tensor:
        """Bool tensor ``[len(completions)]``: is the last boxed answer equivalent to the reference."""
        return self.score(completions, answers)[1]

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Return ``(rewards float32 [N], correct bool [N])`` from a single verification pass."""
        if isinstance(completions, str) or isinstance(answers, str):
            raise TypeError(
                "MathVerifyReward: completions and answers must be sequences of strings, not a str"
            )
        completions, answers = list(completions), list(answers)
        if len(completions) != len(answers):
            raise ValueError(
                f"MathVerifyReward: got {len(completions)} completions but {len(answers)} answers; "
                "pass one reference answer per completion"
            )
        n = len(completions)
        correct = [False] * n
        boxed = [False] * n
        contains = [False] * n
        jobs: dict[tuple[str, str], list[int]] = {}
        verified = too_long = 0
        ref_cache: dict[str, tuple[str, str]] = {}

        for i, (completion, answer) in enumerate(zip(completions, answers)):
            answer = _to_text(answer)
            ref_entry = ref_cache.get(answer)
            if ref_entry is None:
                ref = _sanitize(strip_answer(answer))
                ref_entry = ref_cache[answer] = (ref, _normalize(ref))
            ref, ref_norm = ref_entry

            completion = _to_text(completion)
            if len(completion) > self.max_completion_chars:
                too_long += 1
                boxed[i] = extract_boxed(completion[-self.max_completion_chars :]) is not None
                continue
            pred = extract_boxed(completion)
            if pred is None:
                continue
            boxed[i] = True
            if "\x00" in pred or _SURROGATE_RE.search(pred) is not None:
                continue  # NUL bytes / invalid UTF-8 in the answer itself: boxed but wrong, not verified
            verified += 1
            pred_norm = _normalize(pred)
            if not pred_norm or not ref_norm:
                continue
            if self._short_circuit and pred_norm == ref_norm:
                correct[i] = True
                continue
            contains[i] = ref_norm in pred_norm
            jobs.setdefault((pred, ref), []).append(i)

        with self._lock:
            timeouts = 0
            if jobs:
                keys = list(jobs)
                statuses = self._pool().run(keys)
                for key, status in zip(keys, statuses):
                    if status == _TIMEOUT:
                        timeouts += 1
                    if status == _CORRECT:
                        for i in jobs[key]:
                            correct[i] = True
            self.timeouts += timeouts
            self.num_verified += verified
            self.num_too_long += too_long
            self._since_pop["timeouts"] += timeouts
            self._since_pop["verified"] += verified
            self._since_pop["too_long"] += too_long

        correct_t = torch.tensor(correct, dtype=torch.bool)
        return self._rewards(correct_t, correct, contains, boxed), correct_t.reshape(n)

    def _rewards(
        self, correct_t: Tensor, correct: list[bool], contains: list[bool], boxed: list[bool]
    ) -> Tensor:
        """float32 rewards: the correctness bits (``binary``) or the shaped 120/20/10/0 levels."""
        if self.mode == "binary":
            return correct_t.to(torch.float32)
        values = [
            _SHAPED_CORRECT
            if ok
            else _SHAPED_CONTAINS
            if inside
            else _SHAPED_BOXED
            if has_box
            else _SHAPED_NONE
            for ok, inside, has_box in zip(correct, contains, boxed)
        ]
        return torch.tensor(values, dtype=torch.float32)
