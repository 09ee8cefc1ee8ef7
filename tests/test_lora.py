"""LoRA (peft) through the modules' own code paths: only the adapters train (the base weights do not
move), the KL / DPO reference is the same model with its adapters disabled (no second copy), SOAR's
inner trainings snapshot and restore the adapters only, and a promotion writes the promoted student
as a plain Hugging Face folder. Also the bounded copies of SOAR's median students."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_selfimprove.callbacks import Promotion
from lit_selfimprove.modeling import (
    AdapterDisabledReference,
    adapter_state,
    is_peft,
    load_causal_lm,
    merged_state_dict,
)
from lit_selfimprove.modules import NextTokenLM, StudentRLVR, TeacherMetaRL
from lit_selfimprove.modules.soar_outer import MedianStudents
from lit_selfimprove.modules.soar_settings import InnerConfig
from lit_selfimprove.rl.logprobs import sequence_logprobs
from lit_selfimprove.rl.rlvr_config import RLVRConfig
from tests.helpers import (
    PROMPT,
    HashReward,
    ModuleJudge,
    ScriptedTeacher,
    ToyPrefixSuffixData,
    arithmetic_pairs,
    fit_soar,
    sum_problems,
    tiny_sip,
    tiny_soar,
    tiny_trainer,
    toy_documents,
)

pytest.importorskip("peft", reason="LoRA needs peft: pip install 'lit-selfimprove[gpu]'")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


def base_weights(model) -> dict[str, torch.Tensor]:
    """The frozen (non-adapter) weights of a peft model, by plain transformers name."""
    return {
        k: v.detach().clone() for k, v in model.get_base_model().state_dict().items() if ".lora_" not in k
    }


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def token_logps(model, tok, texts: list[str]) -> torch.Tensor:
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return sequence_logprobs(model, enc["input_ids"], enc["attention_mask"], enc["attention_mask"])


TEXTS = ["Q: 1+2\nA: 3", "Q: 12+30\nA: 42 and more"]


def test_student_rlvr_lora_trains_adapters_only_and_the_reference_is_adapters_off(tiny_random_lm, tmp_path):
    L.seed_everything(0)
    module = StudentRLVR(
        tiny_random_lm, reward=HashReward(), prompt_template=PROMPT, lora=LORA, lr=1e-2,
        rl=RLVRConfig(group_size=4, max_new_tokens=6, temperature=2.0, kl_coef=0.1),
        val_num_samples=0, log_samples_every=0,
    )  # fmt: skip
    module.configure_model()
    ref, policy, tok = module.ref_model, module.policy, module.tokenizer
    assert is_peft(policy) and isinstance(ref, AdapterDisabledReference) and ref.model is policy  # no copy
    base = load_causal_lm(tiny_random_lm)
    initial_base, initial_lora = base_weights(policy), lora_params(policy)
    # before training: reference == adapters-off == the base model (LoRA's B starts at 0: == policy too)
    assert torch.equal(token_logps(ref, tok, TEXTS), token_logps(base, tok, TEXTS))
    policy.train()
    token_logps(ref, tok, TEXTS)
    assert policy.training  # the reference restores the policy's mode

    run = tiny_trainer(2, tmp_path)
    run.fit(module, sum_problems())
    opt_params = {id(p) for g in run.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for n, p in policy.named_parameters() if "lora_" in n}
    after_base, after_lora = base_weights(policy), lora_params(policy)
    assert all(torch.equal(after_base[k], v) for k, v in initial_base.items())  # the base did not move
    assert any(not torch.equal(after_lora[k], v) for k, v in initial_lora.items())  # adapters trained
    ref_logps = token_logps(module.ref_model, tok, TEXTS)
    with policy.disable_adapter():
        off = token_logps(policy, tok, TEXTS)
    assert torch.equal(ref_logps, off)
    assert torch.equal(ref_logps, token_logps(base, tok, TEXTS))  # still the initial model
    assert not torch.allclose(token_logps(policy, tok, TEXTS), ref_logps)  # the policy moved away


def test_lora_and_a_quantized_reference_are_an_error(tiny_random_lm):
    with pytest.raises(ValueError, match="ref_quantization"):
        StudentRLVR(tiny_random_lm, lora=LORA, ref_quantization="4bit")
    with pytest.raises(ValueError, match="merge_promoted_adapter"):
        tiny_soar(tiny_random_lm, memory={"student_lora": LORA, "merge_promoted_adapter": False},
                  inner=InnerConfig(steps=1, batch=2, group_size=2, kl_coef=0.1))  # fmt: skip
    with pytest.raises(ValueError, match="peft.LoraConfig"):
        NextTokenLM(tiny_random_lm, lora=["r", 8])


def test_next_token_lm_lora_trains_adapters_and_saves_a_plain_folder(tiny_random_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    L.seed_everything(0)
    out = tmp_path / "saved"
    module = NextTokenLM(tiny_random_lm, lora=LORA, lr=1e-2, warmup_steps=0, save_to=str(out))
    tok = module.tokenizer
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
            for i in range(len(TEXTS))]  # fmt: skip
    module.configure_model()
    initial_base, initial_lora = base_weights(module.model), lora_params(module.model)
    tiny_trainer(3, tmp_path).fit(module, DataLoader(rows, batch_size=2))
    assert all(torch.equal(base_weights(module.model)[k], v) for k, v in initial_base.items())
    assert any(not torch.equal(lora_params(module.model)[k], v) for k, v in initial_lora.items())
    saved = AutoModelForCausalLM.from_pretrained(out)  # no peft files: a plain folder
    assert not (out / "adapter_config.json").exists()
    assert torch.allclose(token_logps(saved, tok, TEXTS), token_logps(module.model, tok, TEXTS), atol=1e-5)


def test_sip_dpo_lora_reference_is_the_policy_with_adapters_off(tiny_random_lm, tmp_path):
    module = tiny_sip(tiny_random_lm, ModuleJudge(), optim={"lr": 1e-2}, lora=LORA)
    module.configure_model()
    initial_base, initial_lora = base_weights(module.policy), lora_params(module.policy)
    tiny_trainer(2, tmp_path).fit(module, ToyPrefixSuffixData(toy_documents(4), batch_size=2))
    ref = module.ref_model
    assert isinstance(ref, AdapterDisabledReference) and ref.model is module.policy
    assert all(torch.equal(base_weights(module.policy)[k], v) for k, v in initial_base.items())
    assert any(not torch.equal(lora_params(module.policy)[k], v) for k, v in initial_lora.items())
    tok = module.tokenizer
    base = load_causal_lm(tiny_random_lm)
    assert torch.equal(token_logps(ref, tok, TEXTS), token_logps(base, tok, TEXTS))


# ---------------------------------------------------------------------------------------- SOAR
def lora_soar(tiny_random_lm, **kw) -> TeacherMetaRL:
    kw.setdefault(
        "inner", InnerConfig(steps=2, batch=2, group_size=4, max_new_tokens=6, lr=5e-2, kl_coef=0.01)
    )
    memory = {"lora": LORA, "student_lora": LORA, **kw.pop("memory", {})}
    module = tiny_soar(
        tiny_random_lm, memory=memory, teacher_update={"kl_coef": 0.01}, save_teacher=False, **kw
    )
    module.configure_model()
    module.sample_teacher_round = ScriptedTeacher(module, arithmetic_pairs(8, "123"))
    return module


def test_soar_lora_inner_trainings_restore_the_baseline_adapter_bit_for_bit(
    tiny_random_lm, tmp_path, monkeypatch
):
    from lit_selfimprove.loops import soar as soar_loops
    from lit_selfimprove.modules import soar_settings

    module = lora_soar(tiny_random_lm, promotion={"promote": False})
    teacher, student = module.teacher, module.student
    assert isinstance(module.ref_teacher, AdapterDisabledReference) and module.ref_teacher.model is teacher
    baseline = adapter_state(student)
    assert baseline and all("lora_" in k for k in baseline)  # the snapshot is the adapters only
    student_base, teacher_base, teacher_lora = (
        base_weights(student),
        base_weights(teacher),
        lora_params(teacher),
    )
    entries, exits, optimizers = [], [], []
    train, adamw = soar_loops.train_inner, soar_settings.adamw  # the inner optimizers' builder

    def recording(*args, **kwargs):
        entries.append(adapter_state(student))
        out = train(*args, **kwargs)
        exits.append(adapter_state(student))
        return out

    def spy(*args, **kwargs):
        optimizers.append(adamw(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(soar_loops, "train_inner", recording)
    monkeypatch.setattr(soar_settings, "adamw", spy)
    fit_soar(module, tmp_path)
    assert len(entries) == 4 and len(optimizers) == 4  # g * r trainings, a fresh optimizer each
    for opt in optimizers:  # ... over the adapters only
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {
            id(p) for n, p in student.named_parameters() if "lora_" in n
        }
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert all(same(baseline, e) for e in entries)  # every inner training starts from the baseline
    assert not any(same(baseline, e) for e in exits)  # ... and trained its adapters
    assert same(baseline, adapter_state(student))  # the baseline adapters again, bit for bit
    assert all(torch.equal(base_weights(student)[k], v) for k, v in student_base.items())  # base never moved
    assert all(torch.equal(base_weights(teacher)[k], v) for k, v in teacher_base.items())
    assert any(
        not torch.equal(lora_params(teacher)[k], v) for k, v in teacher_lora.items()
    )  # teacher trained
    assert "student_ref" in module._frozen and module._frozen["student_ref"].model is student  # no copy


@pytest.mark.parametrize("merge", [True, False])
def test_soar_lora_promotion_saves_a_loadable_folder_with_the_promoted_outputs(
    tiny_random_lm, tmp_path, merge
):
    from transformers import AutoModelForCausalLM

    inner = InnerConfig(
        steps=2, batch=2, group_size=4, max_new_tokens=6, lr=5e-2, kl_coef=0.01 if merge else 0.0
    )
    always = {"tau": -2.0, "window": 1, "require_improvement": False}  # R_k >= -1: always promote
    module = lora_soar(
        tiny_random_lm, memory={"merge_promoted_adapter": merge}, inner=inner, promotion=always
    )
    initial = load_causal_lm(tiny_random_lm, lora=LORA)  # the promoted student = this + its adapters
    cb = Promotion()
    run = fit_soar(module, tmp_path, callbacks=[cb])
    last = module.last_outer
    assert last.promoted
    k_star = last.promotion.dataset
    kept = [k for k, s in enumerate(last.median_students) if s is not None]
    assert kept == [k_star]  # only what the promotion could need was kept
    promoted = initial.load_state_dict(last.median_students[k_star], strict=False)
    assert not promoted.unexpected_keys
    tok = module.student_tokenizer
    expected = token_logps(initial, tok, TEXTS)
    folder = next((Path(run.log_dir) / "students").iterdir())
    saved = AutoModelForCausalLM.from_pretrained(folder)
    assert not is_peft(saved)
    assert torch.allclose(token_logps(saved, tok, TEXTS), expected, atol=1e-5)
    assert torch.allclose(token_logps(module.student, tok, TEXTS), expected, atol=1e-5)  # the new baseline
    b_zero = all(not p.any() for n, p in module.student.named_parameters() if "lora_B" in n)
    assert b_zero == merge  # merged: the adapters were folded into the base and start again from 0
    if merge:  # the inner reference (adapters off) is the new baseline
        off = token_logps(AdapterDisabledReference(module.student), tok, TEXTS)
        assert torch.allclose(off, expected, atol=1e-5)
    assert set(merged_state_dict(module.student)) == set(load_causal_lm(tiny_random_lm).state_dict())


# ------------------------------------------------------------------------------- median copies
@pytest.mark.parametrize("g", [3, 12])
def test_best_median_keeper_copies_do_not_grow_with_g_times_r(g):
    """keep='best' keeps the same student a promotion would install as keep='all', but its copies stay
    bounded by the repeats (one candidate + what can still be the median), whatever g."""
    r, pick = 4, 1
    rng = random.Random(g)
    model = torch.nn.Linear(2, 2)
    keepers = {"all": MedianStudents(r, pick), "best": MedianStudents(r, pick, "best")}
    rewards, medians = [], {"all": [], "best": []}
    for k in range(g):
        deltas = [rng.choice([-0.25, 0.0, 0.25, 0.5]) for _ in range(r)]
        for i in range(r):
            with torch.no_grad():
                model.weight.fill_(k * r + i)
            for keeper in keepers.values():
                keeper.offer(k * r + i, model, deltas[i])
        for mode, keeper in keepers.items():
            medians[mode].append(keeper.settle(k, deltas))
        rewards.append(sum(deltas) / r)
    assert medians["all"] == medians["best"]
    k_star = max(range(g), key=rewards.__getitem__)
    best = keepers["best"]
    assert list(best.states) == [medians["best"][k_star]]
    assert torch.equal(
        best.states[medians["best"][k_star]]["weight"],
        keepers["all"].states[medians["all"][k_star]]["weight"],
    )
    assert best.peak <= pick + 2 < r + g - 1
    assert keepers["all"].peak == r + g - 1


def test_soar_keeps_one_median_copy_with_full_fine_tuning(tiny_random_lm, tmp_path):
    """The default (keep_median_students=True) holds one CPU copy at the end of the step, the best
    dataset's median student, and the promoted student is the one keep_median_students='all' keeps."""
    module = tiny_soar(tiny_random_lm, num_datasets=3, save_teacher=False)
    module.configure_model()
    module.sample_teacher_round = ScriptedTeacher(module, arithmetic_pairs(12, "123"))
    fit_soar(module, tmp_path)
    last, keeper = module.last_outer, module.median_keeper
    k_star = max(range(3), key=last.rewards.__getitem__)
    assert [k for k, s in enumerate(last.median_students) if s is not None] == [k_star]
    assert len(keeper.states) == 1 and keeper.peak <= 2


def test_soar_median_students_on_disk_promote_the_same_student(tiny_random_lm, tmp_path):
    """keep_median_students='disk': no copy in memory (the keeper holds a file path), and the promoted
    student is the one the in-memory keeper promotes."""
    promoted = {}
    for keep in (True, "disk"):
        L.seed_everything(0)
        always = {"tau": -2.0, "window": 1, "require_improvement": False}
        module = tiny_soar(
            tiny_random_lm, promotion={"keep_median_students": keep, **always}, save_teacher=False
        )
        module.configure_model()
        module.sample_teacher_round = ScriptedTeacher(module, arithmetic_pairs(8, "123"))
        fit_soar(module, tmp_path / str(keep), callbacks=[Promotion()])
        assert module.last_outer.promoted
        kept = [s for s in module.median_keeper.states.values()]
        assert len(kept) == 1 and isinstance(kept[0], str) == (keep == "disk")
        promoted[keep] = {k: v.clone() for k, v in module.student.state_dict().items()}
    assert all(torch.equal(promoted["disk"][k], v) for k, v in promoted[True].items())
    assert module._median_dir is None  # the files are removed when training ends


# ------------------------------------------------------------- settings checked at construction
@pytest.mark.parametrize(
    "extra",
    [
        {"bias": "all"},  # trained base biases stay on with the adapters disabled: a moving reference
        {"bias": "lora_only"},
        {"modules_to_save": ["lm_head"]},  # the merged save wrote the untrained lm_head
        {"trainable_token_indices": [1, 2]},
        {"lora_bias": True},
        {"use_dora": True},
        {"task_type": "SEQ_CLS"},
    ],
)
def test_lora_settings_the_reference_or_the_merge_cannot_follow_are_rejected(tiny_random_lm, extra):
    (key,) = extra
    with pytest.raises(ValueError, match=f"{key}=.* is not supported"):
        StudentRLVR(tiny_random_lm, lora={**LORA, **extra})
    with pytest.raises(ValueError, match=f"student_lora: {key}="):
        tiny_soar(tiny_random_lm, memory={"student_lora": {**LORA, **extra}})
    with pytest.raises(ValueError, match=f"{key}="):
        NextTokenLM(tiny_random_lm, lora={**LORA, **extra})


def test_a_typo_in_a_lora_key_fails_at_construction_with_the_closest_key(tiny_random_lm):
    with pytest.raises(
        ValueError, match="unknown peft.LoraConfig key 'lora_alfa'; did you mean 'lora_alpha'"
    ):
        StudentRLVR(tiny_random_lm, lora={"r": 4, "lora_alfa": 8})
    # values peft rejects, in LoraConfig or only when it wraps the model (here: an empty one)
    with pytest.raises(ValueError, match="lora: peft.LoraConfig rejects .*layers_to_transform"):
        StudentRLVR(tiny_random_lm, lora={"r": 4, "layers_pattern": "layers"})
    for bad, named in (({"init_lora_weights": "nonsense"}, "init_lora_weights"), ({"r": 0}, "positive")):
        with pytest.raises(ValueError, match=f"lora: .*{named}"):
            StudentRLVR(tiny_random_lm, lora={**LORA, **bad})


@pytest.mark.parametrize(
    "targets, named",
    [
        (["q_proj", "q_prj"], r"\['q_prj'\]"),  # one typo next to a real module: peft alone accepts it
        (["attn"], r"\['attn'\]"),
        (r".*\.nothing_here", "not found"),  # a regex that matches nothing
    ],
)
def test_lora_target_modules_missing_from_the_model_fail_at_construction(
    tiny_random_lm, monkeypatch, targets, named
):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("the check must not load weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    lora = {"r": 4, "target_modules": targets}
    with pytest.raises(ValueError, match=named) as err:
        StudentRLVR(tiny_random_lm, lora=lora)
    assert "tiny_random_lm" in str(err.value)
    if isinstance(targets, list):
        assert "q_proj" in str(err.value) and "all-linear" in str(err.value)  # what to write instead
    with pytest.raises(ValueError, match="student_lora: target_modules"):
        tiny_soar(tiny_random_lm, memory={"student_lora": {"r": 4, "target_modules": ["q_prj"]}})
    # real modules pass, with no weights loaded and the seeded RNG untouched
    rng = torch.random.get_rng_state()
    StudentRLVR(tiny_random_lm, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    StudentRLVR(tiny_random_lm, lora=LORA)
    assert torch.equal(rng, torch.random.get_rng_state())


# ------------------------------------------------------------------------- no dropout in the loss
def rollouts_of(tok, prompts: list[str], completions: list[str]):
    from lit_selfimprove.generation import Rollouts

    p = tok(prompts, return_tensors="pt", padding=True)
    tok.padding_side = "right"
    try:
        c = tok(completions, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = "left"
    return Rollouts(p["input_ids"], p["attention_mask"], c["input_ids"], c["attention_mask"],
                    completions, torch.ones(len(completions), dtype=torch.bool))  # fmt: skip


def dropout_model(tiny_random_lm, where: str):
    """A model whose train-mode forward is random: LoRA dropout on adapters that are not zero
    (``init_lora_weights: false``), or attention dropout (with gradient checkpointing, which needs
    train mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if where == "lora_dropout":
        return load_causal_lm(tiny_random_lm, lora={**LORA, "lora_dropout": 0.5, "init_lora_weights": False})
    config = AutoConfig.from_pretrained(tiny_random_lm)
    config.attention_dropout = 0.5
    model = AutoModelForCausalLM.from_pretrained(tiny_random_lm, config=config)
    model.gradient_checkpointing_enable()
    return model


@pytest.mark.parametrize("where", ["lora_dropout", "attention_dropout"])
def test_policy_update_log_probs_are_the_samplers_with_dropout_in_the_model(
    tiny_random_lm, monkeypatch, where
):
    """The loss forward sees the log-probs the sampler and the reference see (no dropout), so the KL
    to an identical reference is 0; the policy stays in train mode and keeps its dropout rates."""
    import lit_selfimprove.loops.policy_update as pu
    from lit_selfimprove.modeling import frozen_copy, load_tokenizer

    model, tok = dropout_model(tiny_random_lm, where), load_tokenizer(tiny_random_lm)
    rollouts = rollouts_of(tok, ["Q: 1+2\nA: ", "Q: 12+30\nA: "] * 2, ["3", "42 and more", "4", "0"])
    ref = frozen_copy(model)  # eval mode, like the sampler
    model.train()
    input_ids, attention_mask, completion_mask = rollouts.sequences()
    with torch.no_grad():
        expected = sequence_logprobs(ref, input_ids, attention_mask, completion_mask)
        model.train()
        noisy = sequence_logprobs(model, input_ids, attention_mask, completion_mask)
    assert not torch.allclose(noisy, expected, atol=1e-4)  # train mode alone would not do
    seen, forward = [], pu.micro_batch_logprobs  # the loss forwards (the frozen ones: chunked_logprobs)

    def recording(policy, *args):
        seen.append((policy.training, forward(policy, *args)))
        return seen[-1][1]

    monkeypatch.setattr(pu, "micro_batch_logprobs", recording)
    cfg = pu.UpdateConfig(kl_coef=0.5, ppo_epochs=2, clip_eps_low=0.2, clip_eps_high=0.2, micro_batch_size=2)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    stats = pu.policy_gradient_update(model, rollouts, torch.tensor([1.0, -1.0, 0.5, -0.5]), sgd, cfg, ref)
    assert len(seen) == 4 and all(training for training, _ in seen)  # train mode in every loss forward
    for i, (_, logps) in enumerate(seen):
        rows = slice(2 * (i % 2), 2 * (i % 2) + 2)
        assert torch.allclose(logps.detach(), expected[rows], atol=1e-5)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6) and stats["clip_fraction"] == 0.0
    assert model.training
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates += [m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")]
    assert 0.5 in rates and all(r in (0.0, 0.5) for r in rates)  # restored after the update
