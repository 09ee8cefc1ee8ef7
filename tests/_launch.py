"""Run a test script as a 2-process (or 1-process) gloo job in a subprocess, with a hang guard.

The pytest process never initialises torch.distributed itself: the script calls Lightning's
Trainer with ``devices=2`` and Lightning's launcher re-runs it for rank 1. Each rank saves
``OUT/rank{r}.pt``; this returns them in rank order.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path, args: list[str], out: Path, timeout_s: float, ranks: int = 2) -> list[dict]:
    """Run ``script *args out`` with one thread per process; fail (never hang) on errors or timeouts."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_ENV and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_", "LT_"))
    }
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    what = " ".join([script.name, *args])
    proc = subprocess.Popen(
        [sys.executable, str(script), *args, str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Lightning's launcher starts rank 1: a hang must not leave it behind
    )
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{what}: run hung for {timeout_s} s\n{log[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftover ranks of a failed run
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{what}: exit code {proc.returncode}\n{log[-4000:]}"
    missing = [r for r in range(ranks) if not (out / f"rank{r}.pt").exists()]
    assert not missing, f"{what}: ranks {missing} wrote no result\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def cached_runs(script: Path, model_dir: str, tmp_path_factory, timeout_s: float):
    """``mode -> [rank results]``, each mode (``single`` = one process, else two ranks) run once."""
    cache: dict[str, list[dict]] = {}

    def get(mode: str) -> list[dict]:
        if mode not in cache:
            out = tmp_path_factory.mktemp(mode)
            ranks = 1 if mode == "single" else 2
            cache[mode] = run_ranks(script, [mode, model_dir], out, timeout_s, ranks=ranks)
        return cache[mode]

    return get


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------- used inside the rank scripts
def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on every rank, as float CPU copies; collective under FSDP2."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        sd = model.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}
