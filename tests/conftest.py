"""Shared fixtures: a tiny model built in code, a local OpenAI-compatible judge server.

Constants and plain helpers (paths, tiny trainers, scripted teachers and judges, toy data) are in
``tests/helpers.py``; this file holds only fixtures and hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from tests.helpers import FakeServer, Handler


@pytest.fixture(scope="session")
def tiny_random_lm(tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama with the bundled char tokenizer, as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_selfimprove.modeling import load_tokenizer

    tok = load_tokenizer("builtin:tiny-tokenizer")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_random_lm")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tok():
    """The bundled character tokenizer (``builtin:tiny-tokenizer``: one character, one token)."""
    from lit_selfimprove.modeling import load_tokenizer

    return load_tokenizer("builtin:tiny-tokenizer")


@pytest.fixture(scope="module")
def student():
    """The bundled tiny student (``builtin:tiny-student``) in eval mode, one per test module."""
    from lit_selfimprove.modeling import load_causal_lm

    return load_causal_lm("builtin:tiny-student").eval()


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], FakeServer]]:
    """``serve(handler)`` starts a :class:`~tests.helpers.FakeServer` (a real local HTTP server speaking
    the OpenAI chat-completions format); every server started is shut down after the test."""
    servers: list[FakeServer] = []

    def start(handler: Handler) -> FakeServer:
        server = FakeServer(handler)
        server.thread.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()
