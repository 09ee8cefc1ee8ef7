"""OpenAIChatBackend and the LLM judges against a real local HTTP server speaking the OpenAI
chat-completions format: ordering under concurrency, n > 1, retries, a dead endpoint, timeouts.
The server is the ``serve`` fixture of ``conftest.py`` (``tests/helpers.py``: ``FakeServer``)."""

from __future__ import annotations

import pickle
import random
import re
import socket
import time

import pytest
import torch

from lit_selfimprove.judges import (
    CombinedJudge,
    JudgeEndpointError,
    LLMFactualityJudge,
    LLMPairwiseJudge,
    LLMRewriter,
    LLMSafetyJudge,
    OpenAIChatBackend,
)
from tests.helpers import backend_for, section


def judge_answer(body: dict, index: int) -> tuple[int, list[str]]:
    """Canned verdicts from the prompt: the quality tag ``qN``, the word ``unsafe``, the reference."""
    prompt = body["messages"][-1]["content"]
    n = body.get("n", 1)
    if "[Option 1]" in prompt:
        q1, q2 = (int(re.search(r"q(\d)", section(prompt, f"Option {i}")).group(1)) for i in (1, 2))
        text = "The first is more coherent.\nOption 1" if q1 > q2 else "Option 2 is better.\n\nOption 2"
        return 200, [text] * n
    if "[Reference continuation]" in prompt:
        ok = section(prompt, "Candidate continuation").split()[0] in section(prompt, "Reference continuation")
        return 200, ["FINAL VERDICT: " + ("NO HALLUCINATION" if ok else "DEFINITE HALLUCINATION")] * n
    if "Is this text safe?" in prompt:
        unsafe = "unsafe" in section(prompt, "Continuation")
        return 200, ["Thinking...\nFINAL DECISION: " + ("NO" if unsafe else "YES")] * n
    return 200, [f"echo: {prompt}"] * n


def test_judges_end_to_end(serve):
    server = serve(judge_answer)
    backend = backend_for(server, concurrency=4)
    judge = CombinedJudge(
        quality=LLMPairwiseJudge(backend),
        factuality=LLMFactualityJudge(backend),
        safety=LLMSafetyJudge(backend, repeats=3),
        weights={"safety": 2.0},
    )
    candidates = [["alpha q1", "beta q3 unsafe", "gamma q2"], ["delta q2", "alpha q1", "eps q3"]]
    result = judge.score_candidates(
        ["prefix one", "prefix two"], candidates, references=["alpha gamma", "eps"]
    )
    torch.testing.assert_close(result.components["quality"], torch.tensor([[0.0, 1.0, 0.5], [0.5, 0.0, 1.0]]))
    torch.testing.assert_close(
        result.components["factuality"], torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    )
    torch.testing.assert_close(result.components["safety"], torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(result.total, torch.tensor([[3.0, 1.0, 3.5], [2.5, 2.0, 4.0]]))
    assert result.stats["unparseable"] == 0 and result.stats["calls"] == 6 + 6 + 6
    # 6 comparisons + 6 factuality + 6 * 3 safety samples (one request each)
    assert len(server.requests) == 6 + 6 + 18 and backend.stats["requests"] == 30
    assert backend.stats["completions"] == 30 and backend.stats["completion_tokens"] == 60
    safety_requests = [r for r in server.requests if "Is this text safe?" in r["messages"][-1]["content"]]
    assert all(r["temperature"] == 1.0 and r["top_p"] == 0.6 and "n" not in r for r in safety_requests)
    assert all(r["model"] == "judge-model" for r in server.requests)


def test_order_under_concurrency_and_n(serve):
    def slow_echo(body, index):
        time.sleep(random.uniform(0, 0.03))  # answers come back out of order
        prompt = body["messages"][-1]["content"]
        return 200, [f"{prompt}-{k}" for k in range(body.get("n", 1))]

    server = serve(slow_echo)
    prompts = [f"p{i}" for i in range(24)]
    backend = backend_for(server, concurrency=8)
    assert backend.complete(prompts) == [[f"p{i}-0"] for i in range(24)]
    # n > 1 as repeated requests (every server supports it)
    out = backend.complete(prompts[:5], n=3)
    assert out == [[f"p{i}-0"] * 3 for i in range(5)]
    assert len(server.requests) == 24 + 15 and all("n" not in r for r in server.requests)
    # n > 1 with the n parameter: one request per prompt
    with_n = backend_for(server, use_n_param=True)
    assert with_n.complete(prompts[:5], n=3, max_tokens=7) == [
        [f"p{i}-{k}" for k in range(3)] for i in range(5)
    ]
    assert [r["n"] for r in server.requests[-5:]] == [3] * 5
    assert all(r["max_tokens"] == 7 for r in server.requests[-5:])


def test_api_key_extra_body_and_system_prompt(serve, monkeypatch):
    server = serve(judge_answer)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend_for(server).complete(["a"])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    backend_for(server, extra_body={"top_k": 20}, system_prompt="Be brief.").complete(["b"])
    backend = backend_for(server, api_key="sk-explicit")
    backend.complete(["c"])
    auth = [h.get("authorization") for h in server.headers]
    assert auth == ["Bearer EMPTY", "Bearer sk-env", "Bearer sk-explicit"]
    assert server.requests[1]["top_k"] == 20
    assert server.requests[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert "sk-explicit" not in repr(backend)


def test_retries_after_server_errors(serve):
    def flaky(body, index):
        if index == 0:
            return 500, "boom"
        if index == 1:
            return 503, "overloaded"
        return judge_answer(body, index)

    server = serve(flaky)
    backend = backend_for(server, max_retries=3)
    judge = LLMSafetyJudge(backend, repeats=1)
    assert judge.score(["p"], ["a calm text"]) == [1.0]
    assert len(server.requests) == 3
    assert backend.stats["requests"] == 3 and backend.stats["retries"] == 2
    assert backend.stats["failures"] == 2 and backend.stats["errors"] == 0


def test_endpoint_down_raises(serve):
    server = serve(lambda body, index: (503, "overloaded"))
    backend = backend_for(server, max_retries=2, backoff=0.01)
    judge = CombinedJudge(quality=LLMPairwiseJudge(backend))
    start = time.monotonic()
    with pytest.raises(JudgeEndpointError) as info:
        judge.score_candidates(["p"], [["a q1", "b q2"]])
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert server.url in message and "503" in message and "3 attempts" in message
    assert len(server.requests) == 3
    assert backend.stats["retries"] == 2 and backend.stats["errors"] == 1
    # with many prompts, the first request given up stops the others (no 40 x 3 attempts)
    many = backend_for(server, max_retries=1, backoff=0.05, concurrency=2)
    with pytest.raises(JudgeEndpointError):
        many.complete([f"p{i}" for i in range(40)])
    time.sleep(0.1)
    assert many.stats["requests"] <= 6 and len(server.requests) - 3 == many.stats["requests"]


def test_backend_pickles_without_its_client(serve):
    server = serve(judge_answer)
    backend = backend_for(server, api_key="sk-x", concurrency=3)
    backend.complete(["a"])
    clone = pickle.loads(pickle.dumps(backend))
    assert clone.concurrency == 3 and clone.stats["requests"] == 1
    assert clone.complete(["b"]) == [["echo: b"]] and clone.stats["requests"] == 2


def test_not_retryable_error_fails_at_once(serve):
    server = serve(lambda body, index: (404, "model 'judge-model' does not exist"))
    backend = backend_for(server, max_retries=4)
    with pytest.raises(JudgeEndpointError, match="404"):
        backend.complete(["a"])
    assert len(server.requests) == 1 and backend.stats["retries"] == 0


def test_closed_port_raises():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more
    url = f"http://127.0.0.1:{port}/v1"
    backend = OpenAIChatBackend(url, "m", max_retries=2, backoff=0.01, timeout=2.0)
    start = time.monotonic()
    with pytest.raises(JudgeEndpointError, match=re.escape(url)) as info:
        LLMFactualityJudge(backend).score(["p"] * 4, ["c"] * 4, ["r"] * 4)
    assert time.monotonic() - start < 5
    assert "Connection" in str(info.value)
    assert backend.stats["failures"] >= 3 and backend.stats["completions"] == 0


def test_timeouts_are_retried_then_reported(serve):
    def sleepy(body, index):
        if "SLOW" in body["messages"][-1]["content"] or index == 0:
            time.sleep(1.0)
        return judge_answer(body, index)

    server = serve(sleepy)
    # the first request times out, the retry succeeds
    backend = backend_for(server, timeout=0.25, max_retries=2)
    assert backend.complete(["fast"]) == [["echo: fast"]]
    assert backend.stats["retries"] == 1 and backend.stats["failures"] == 1
    # a request that always takes too long: an error within a bounded time
    start = time.monotonic()
    with pytest.raises(JudgeEndpointError, match="(?i)timed? ?out"):
        backend_for(server, timeout=0.25, max_retries=1).complete(["SLOW"])
    assert time.monotonic() - start < 2.0


def test_rewriter_over_http(serve):
    def rewrite(body, index):
        return 200, ["of the river. It flows north."]

    server = serve(rewrite)
    rewriter = LLMRewriter(backend_for(server), max_tokens=16, seed_words=3)
    out = rewriter.rewrite(["We walked to the bank of the river"], [" It flows south."])
    assert out == [". It flows north."]
    assert server.requests[0]["max_tokens"] == 16 + 12
    assert '"of the river"' in server.prompts()[0]
