"""Shared fixtures: tiny models built in code, the repo's paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ASSETS = REPO / "lit_selfimprove" / "assets"


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


def needs_assets(*names: str):
    missing = [n for n in names if not (ASSETS / n).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"bundled assets not built: {missing}")
