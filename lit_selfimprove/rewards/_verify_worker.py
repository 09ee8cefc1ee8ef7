"""Worker process for :class:`lit_selfimprove.rewards.MathVerifyReward`.

This file is executed as a standalone script (``python -c <bootstrap> _verify_worker.py FD TIMEOUT``), never
imported as part of the package: the worker then only imports ``math_verify`` (not torch, Lightning or the
caller's ``__main__``), which keeps start-up short and makes it safe to start from a process with CUDA or
many threads (the process is started with fork+exec, not a bare ``fork``).

Protocol, over the ``multiprocessing.connection.Connection`` wrapping the socket ``FD``:

* worker -> parent: ``("ready", pid)`` once ``math_verify`` is imported and warmed up;
* parent -> worker: a list of ``(item_id, predicted_answer, reference_answer)`` or ``None`` (quit);
* worker -> parent: ``(item_id, status)`` for every item, in order, as soon as it is done, with ``status`` in
  ``WRONG, CORRECT, TIMEOUT, ERROR`` below.

Each item runs under a soft wall-clock limit (``setitimer``/``SIGALRM``, which interrupts Python-level sympy
loops). Work stuck inside C code (e.g. a huge integer power) cannot be interrupted: the parent kills the
worker once the item's hard deadline has passed and starts a new one.
"""

import logging
import os
import signal
import sys

WRONG, CORRECT, TIMEOUT, ERROR = 0, 1, 2, 3

_MEMORY_LIMIT_BYTES = 4 << 30  # address-space cap: a runaway computation fails with MemoryError
_GOLD_CACHE_SIZE = 4096


class _SoftTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that ``except Exception`` in libraries can't eat it."""


def _on_alarm(signum, frame):
    raise _SoftTimeout()


def _limit_memory() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _MEMORY_LIMIT_BYTES
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass


def main(argv: list[str]) -> int:
    fd, timeout = int(argv[1]), float(argv[2])
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    # Ctrl-C in a terminal goes to the whole process group: the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_alarm)
    logging.disable(logging.CRITICAL)  # math_verify logs every parse failure and a no-timeout warning
    _limit_memory()

    from math_verify import parse, verify

    gold_cache: dict[str, list] = {}

    def parse_answer(text: str) -> list:
        # Timeouts are handled here (setitimer); math_verify's own signal.alarm would clobber our timer.
        return parse("\\boxed{" + text + "}", parsing_timeout=None)

    def check(pred: str, ref: str) -> int:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                gold = gold_cache.get(ref)
                if gold is None:
                    gold = parse_answer(ref)
                    if len(gold_cache) >= _GOLD_CACHE_SIZE:
                        gold_cache.clear()
                    gold_cache[ref] = gold
                ok = verify(gold, parse_answer(pred), timeout_seconds=None)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            return CORRECT if ok else WRONG
        except _SoftTimeout:
            return TIMEOUT
        except Exception:
            return ERROR

    check("\\frac{1}{2}", "0.5")  # warm-up: lazy imports (sympy, antlr parser) before the first deadline
    gold_cache.clear()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            break
        if batch is None:
            break
        for item_id, pred, ref in batch:
            status = check(pred, ref)
            try:
                conn.send((item_id, status))
            except OSError:
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
