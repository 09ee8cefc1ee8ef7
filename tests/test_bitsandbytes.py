"""bitsandbytes on CPU, through the modules' own code paths: the ``optimizer`` choice of every
trained model (8-bit AdamW trains, checkpoints and resumes; SOAR's inner trainings use it) and
frozen models loaded in 4 / 8 bits (``ref_quantization`` of the KL / DPO references,
``HFChatBackend(quantization=...)`` of a judge), whose log-probs and verdicts stay close to the
full-precision ones.

bitsandbytes (0.50.2 here) runs its 8-bit optimizers and 4 / 8-bit linear layers on CPU; the tests
that need it are skipped where it is not installed (the ``dev`` extra, which CI installs, has it)."""

from __future__ import annotations

import importlib.util
import random

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_selfimprove.generation import generate
from lit_selfimprove.modules import NextTokenLM, StudentRLVR, SuffixPolicyDPO, TeacherMetaRL
from lit_selfimprove.modules._shared import OPTIMIZERS, adamw, adamw_with_warmup, check_optimizer
from lit_selfimprove.modules.soar_settings import InnerConfig
from lit_selfimprove.rl.logprobs import sequence_logprobs
from lit_selfimprove.rl.rlvr_config import RLVRConfig
from tests.helpers import PROMPT, HashReward, sum_problems, tiny_trainer

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(
    not HAS_BNB,
    reason="bitsandbytes is not installed: pip install 'lit-selfimprove[gpu]' (the dev extra has it)",
)
# 4-bit (FP4) and 8-bit (LLM.int8()) references of the bundled tiny models (hidden size 128, the
# worst case for quantization), on the policy's own samples: the mean |log p_ref - log p_policy| per
# completion token measured 0.12 / 0.014 nats (StudentRLVR, tiny-student), 0.13 / 0.014
# (SuffixPolicyDPO, tiny-student) and 0.17 / 0.010 (TeacherMetaRL, tiny-teacher); NF4 gave
# 0.35 / 0.15 / 0.11. The bounds leave room for other platforms.
MEAN_LOGP_TOLERANCE = {"4bit": 0.3, "8bit": 0.04}


class NoJudge:
    def score_candidates(self, prefixes, candidates, references=None):  # pragma: no cover - never called
        raise AssertionError("not used")


def flat_tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of an optimizer state dict's ``state``, nested dicts included (bitsandbytes 0.50
    packs its 8-bit states and quantization maps in ``__bnb_optimizer_quant_state__``)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(flat_tensors(value, f"{prefix}{key}/"))
        elif torch.is_tensor(value):
            out[f"{prefix}{key}"] = value
    return out


def uint8_states(optimizer) -> int:
    """How many optimizer state tensors are 8-bit (bitsandbytes keeps 32-bit ones below 4,096 elements)."""
    return sum(
        1
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dtype == torch.uint8
    )


# ------------------------------------------------------------------------------- argument checks
def test_bad_optimizer_and_quantization_names_fail_at_construction():
    from lit_selfimprove.judges import HFChatBackend

    with pytest.raises(ValueError, match="adamw8bit"):
        StudentRLVR("builtin:tiny-student", optimizer="sgd")
    with pytest.raises(ValueError, match="paged_adamw8bit"):
        NextTokenLM("builtin:tiny-student", optimizer="adam")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        InnerConfig(optimizer="lion")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TeacherMetaRL(
            "builtin:tiny-teacher", "builtin:tiny-student", teacher_update={"optimizer": "adafactor"}
        )
    with pytest.raises(ValueError, match="optimizer must be one of"):
        SuffixPolicyDPO("builtin:tiny-student", judge=NoJudge(), optim={"optimizer": "AdamW"})
    with pytest.raises(ValueError, match="'4bit', '8bit'"):
        StudentRLVR("builtin:tiny-student", ref_quantization="3bit")
    with pytest.raises(ValueError, match="'4bit', '8bit'"):
        TeacherMetaRL("builtin:tiny-teacher", "builtin:tiny-student", memory={"ref_quantization": "int4"})
    with pytest.raises(ValueError, match="'4bit', '8bit'"):
        HFChatBackend("builtin:tiny-student", quantization="fp8")


def test_missing_bitsandbytes_is_an_import_error_naming_the_extra(monkeypatch):
    from lit_selfimprove.judges import HFChatBackend

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    for make in (
        lambda: StudentRLVR("builtin:tiny-student", optimizer="adamw8bit"),
        lambda: InnerConfig(optimizer="adamw8bit"),
        lambda: StudentRLVR("builtin:tiny-student", ref_quantization="4bit"),
        lambda: HFChatBackend("builtin:tiny-student", quantization="8bit"),
    ):
        with pytest.raises(ImportError, match=r"pip install 'lit-selfimprove\[gpu\]'"):
            make()
    StudentRLVR("builtin:tiny-student")  # the default needs nothing


@needs_bnb
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error")
def test_paged_optimizer_without_a_gpu_fails_at_construction():
    with pytest.raises(ValueError, match="CUDA GPU"):
        StudentRLVR("builtin:tiny-student", optimizer="paged_adamw8bit")
    with pytest.raises(ValueError, match="CUDA GPU"):
        InnerConfig(optimizer="paged_adamw8bit")


def test_default_optimizer_is_torch_adamw():
    p = torch.nn.Parameter(torch.ones(3))
    assert OPTIMIZERS[0] == "adamw"
    [opt], _ = adamw_with_warmup([p], 1e-3, 0.1, 2)
    assert type(opt) is torch.optim.AdamW
    assert type(adamw([p], 1e-3, 0.0)) is torch.optim.AdamW
    check_optimizer("adamw")


# ----------------------------------------------------------------------------- 8-bit optimizers
@needs_bnb
def test_student_rlvr_adamw8bit_trains_checkpoints_and_resumes(tmp_path):
    """3 steps in one run == 2 steps, a checkpoint, and 1 more step resumed from it: the weights agree
    bit for bit only if the 8-bit optimizer states (and their quantization maps) were restored."""
    import bitsandbytes as bnb

    def make():
        return StudentRLVR("builtin:tiny-student", reward=HashReward(), prompt_template=PROMPT,
                           rl=RLVRConfig(group_size=4, max_new_tokens=6, temperature=2.0), lr=1e-3,
                           optimizer="adamw8bit", val_num_samples=0, log_samples_every=0)  # fmt: skip

    L.seed_everything(0)
    whole = make()
    run = tiny_trainer(3)
    run.fit(whole, sum_problems())
    opt = run.optimizers[0]
    assert isinstance(opt, bnb.optim.AdamW8bit) and uint8_states(opt) > 0
    start = make()
    start.configure_model()
    moved = [
        k for k, v in whole.policy.state_dict().items() if not torch.equal(v, start.policy.state_dict()[k])
    ]
    assert len(moved) > 10  # the weights moved

    L.seed_everything(0)
    first = make()
    run = tiny_trainer(2)
    run.fit(first, sum_problems())
    ckpt = tmp_path / "two.ckpt"
    run.save_checkpoint(ckpt)
    saved = flat_tensors(torch.load(ckpt, weights_only=True)["optimizer_states"][0]["state"])
    assert sum(v.dtype == torch.uint8 for v in saved.values()) > 10  # 8-bit states in the checkpoint
    restored = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            state = flat_tensors(trainer.optimizers[0].state_dict()["state"])
            restored.update({k: v.clone() for k, v in state.items()})  # the next step updates in place

    L.seed_everything(0)
    resumed = make()
    run = tiny_trainer(3, callbacks=[Capture()])
    run.fit(resumed, sum_problems(), ckpt_path=ckpt)
    assert run.global_step == 3
    assert saved.keys() == restored.keys()  # the 8-bit states came back as they were saved
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    final, expected = resumed.policy.state_dict(), whole.policy.state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


JUDGE_TEMPLATE = "{continuation}\nSafe? "


def safety_examples(count: int, seed: int) -> list[tuple[str, bool]]:
    """Short letter strings; half of them have a "!" somewhere (unsafe)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        text = [rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))]
        bad = rng.random() < 0.5
        if bad:
            text[rng.randrange(len(text))] = "!"
        out.append(("".join(text), bad))
    return out


def judge_rows(tok, examples, width: int = 40) -> list[dict]:
    rows = []
    for text, bad in examples:
        prompt = tok(JUDGE_TEMPLATE.format(continuation=text))["input_ids"]
        answer = tok("FINAL DECISION: " + ("NO" if bad else "YES"), add_special_tokens=False)["input_ids"]
        ids = prompt + answer + [tok.eos_token_id]
        pad = width - len(ids)
        labels = [-100] * len(prompt) + ids[len(prompt) :] + [-100] * pad
        rows.append(
            {
                "input_ids": torch.tensor(ids + [tok.pad_token_id] * pad),
                "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                "labels": torch.tensor(labels),
            }
        )
    return rows


@pytest.fixture(scope="module")
def judge_run(tmp_path_factory):
    """A tiny safety judge trained from scratch by NextTokenLM with 8-bit AdamW, saved as an HF folder:
    "FINAL DECISION: NO" for a continuation with a "!", else "... YES"."""
    if not HAS_BNB:
        pytest.skip("bitsandbytes is not installed")
    from lit_selfimprove.modeling import load_tokenizer

    tok = load_tokenizer("builtin:tiny-tokenizer")
    folder = tmp_path_factory.mktemp("tiny_judge")
    steps, batch = 100, 32
    L.seed_everything(0)
    module = NextTokenLM(
        tokenizer="builtin:tiny-tokenizer",
        model_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=64),
        lr=1e-2, warmup_steps=10, min_lr_ratio=0.1, optimizer="adamw8bit", save_to=str(folder),
    )  # fmt: skip
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    run = tiny_trainer(steps, callbacks=[Losses()])
    data = DataLoader(judge_rows(tok, safety_examples(steps * batch, seed=0)), batch_size=batch)
    run.fit(module, data)
    return folder, losses, run.optimizers[0]


@needs_bnb
def test_next_token_lm_adamw8bit_loss_falls(judge_run):
    import bitsandbytes as bnb

    _, losses, opt = judge_run
    assert isinstance(opt, bnb.optim.AdamW8bit) and uint8_states(opt) > 0
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.05 * first, (first, last)


@needs_bnb
def test_soar_outer_step_with_8bit_optimizers_and_quantized_references(tmp_path, monkeypatch):
    """One SOAR outer step with the teacher and every inner student on 8-bit AdamW, and the initial
    teacher (KL) and the baseline student (inner KL) as 4-bit references."""
    import bitsandbytes as bnb
    from bitsandbytes.nn import Linear4bit

    from lit_selfimprove.modules import soar_settings
    from tests.helpers import ScriptedTeacher, arithmetic_pairs, clone_state, fit_soar, tiny_soar

    inner_optimizers = []

    def spy(*args, **kwargs):
        inner_optimizers.append(adamw(*args, **kwargs))
        return inner_optimizers[-1]

    monkeypatch.setattr(soar_settings, "adamw", spy)  # InnerConfig.new_optimizer's builder
    module = tiny_soar(
        "builtin:tiny-student",
        teacher_update={"kl_coef": 0.001, "optimizer": "adamw8bit"},
        memory={"ref_quantization": "4bit"},
        inner=InnerConfig(steps=2, batch=2, group_size=4, max_new_tokens=6, lr=1e-2, kl_coef=0.01,
                          optimizer="adamw8bit"),
        save_teacher=False,
    )  # fmt: skip
    module.configure_model()
    baseline = clone_state(module.student)
    module.sample_teacher_round = ScriptedTeacher(module, arithmetic_pairs(8, "0123456789"))
    run = fit_soar(module, tmp_path)
    assert run.global_step == 1
    assert isinstance(run.optimizers[0], bnb.optim.AdamW8bit) and uint8_states(run.optimizers[0]) > 0
    assert len(inner_optimizers) == 4  # g * r fresh optimizers, each stepped
    assert all(isinstance(o, bnb.optim.AdamW8bit) and uint8_states(o) > 0 for o in inner_optimizers)
    kept = [s for s in module.last_outer.median_students if s is not None]
    assert len(kept) == 1  # the best dataset's median student: what a promotion can need
    trained = kept[0]
    assert any(not torch.equal(trained[k], baseline[k]) for k in baseline)  # inner students trained
    assert all(torch.equal(v, baseline[k]) for k, v in module.student.state_dict().items())  # restored
    for ref in (module.ref_teacher, module._frozen["student_ref"]):
        assert isinstance(ref.model.layers[0].self_attn.q_proj, Linear4bit)
        assert not any(p.requires_grad for p in ref.parameters())
    # the quantized inner reference is rebuilt only when the baseline changes (a promotion)
    snapshot = clone_state(module.student)
    ref = module._quantized_student_ref(snapshot)
    assert module._quantized_student_ref(snapshot) is ref
    module.promotions.append({"step": 0})
    assert module._quantized_student_ref(snapshot) is not ref


# ---------------------------------------------------------------------------- frozen references
def policy_and_reference(kind: str, quantization: str):
    """``(policy, frozen reference, tokenizer, prompts)`` of a module built as a run builds it."""
    if kind == "StudentRLVR":
        m = StudentRLVR("builtin:tiny-student", rl=RLVRConfig(kl_coef=0.01), ref_quantization=quantization)
        m.configure_model()
        return (
            m.policy,
            m.ref_model,
            m.tokenizer,
            [m.format_prompt(f"{a}+{b}") for a in range(4) for b in (1, 7)],
        )
    if kind == "SuffixPolicyDPO":
        m = SuffixPolicyDPO("builtin:tiny-student", judge=NoJudge(), ref_quantization=quantization)
        m.configure_model()
        return m.policy, m.ref_model, m.tokenizer, [f"{a}+{b}=" for a in range(4) for b in (2, 5)]
    m = TeacherMetaRL(
        "builtin:tiny-teacher", "builtin:tiny-student", memory={"ref_quantization": quantization}
    )
    m.configure_model()
    return m.teacher, m.ref_teacher, m.teacher_tokenizer, [m.teacher_prompt_text()] * 8


@needs_bnb
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.parametrize("kind", ["StudentRLVR", "SuffixPolicyDPO", "TeacherMetaRL"])
def test_quantized_reference_logprobs_are_close_to_full_precision(kind, quantization):
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    policy, ref, tok, prompts = policy_and_reference(kind, quantization)
    layer = ref.model.layers[0].mlp.down_proj
    assert isinstance(layer, Linear4bit if quantization == "4bit" else Linear8bitLt)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert ref.get_memory_footprint() < 0.3 * policy.get_memory_footprint()
    rollouts = generate(policy, tok, prompts, num_samples=2, max_new_tokens=24,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    ids, attn, cmask = rollouts.sequences()
    policy.eval()
    with torch.no_grad():
        full = sequence_logprobs(policy, ids, attn, cmask)
        quant = sequence_logprobs(ref, ids, attn, cmask)
    tokens = cmask[:, 1:].bool()
    diff = (full - quant)[tokens].abs()
    assert tokens.sum() > 100
    assert diff.mean() < MEAN_LOGP_TOLERANCE[quantization], diff.mean()
    if quantization == "8bit":  # per sequence, it ranks the completions as the full-precision model
        assert torch.corrcoef(torch.stack([full.sum(-1), quant.sum(-1)]))[0, 1] > 0.98  # measured > 0.99


@needs_bnb
def test_quantized_copy_of_trained_weights():
    """An in-memory model goes through a temporary folder: the copy has the given weights, quantized."""
    from bitsandbytes.nn import Linear8bitLt

    from lit_selfimprove.modeling import load_causal_lm, quantized_copy

    model = load_causal_lm("builtin:tiny-student")
    state = {k: v + 0.01 * torch.randn_like(v) if v.dim() == 2 else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    copy = quantized_copy(model, "8bit", state_dict=state)
    assert isinstance(copy.model.layers[0].self_attn.q_proj, Linear8bitLt)
    ids = torch.randint(4, 100, (2, 16))
    with torch.no_grad():
        diff = (model.eval()(input_ids=ids).logits - copy(input_ids=ids).logits).abs().mean()
        fresh = load_causal_lm("builtin:tiny-student")(input_ids=ids).logits - copy(input_ids=ids).logits
    assert diff < 0.5 * fresh.abs().mean()  # closer to the perturbed weights than to the originals


# ----------------------------------------------------------------------------------- judge
@needs_bnb
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_judge_verdicts_match_full_precision(judge_run, quantization):
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    from lit_selfimprove.judges import HFChatBackend, LLMSafetyJudge

    folder, _, _ = judge_run
    held_out = safety_examples(64, seed=1)
    texts, truth = [t for t, _ in held_out], [0.0 if bad else 1.0 for _, bad in held_out]

    def verdicts(quant):
        backend = HFChatBackend(str(folder), quantization=quant, use_chat_template=False, batch_size=64)
        judge = LLMSafetyJudge(backend, template=JUDGE_TEMPLATE, repeats=1, temperature=0.0, max_tokens=24)
        return judge.score([""] * len(texts), texts), backend

    full, full_backend = verdicts(None)
    quant, backend = verdicts(quantization)
    assert isinstance(
        backend.model.model.layers[0].mlp.up_proj, Linear4bit if quantization == "4bit" else Linear8bitLt
    )
    assert backend.model.get_memory_footprint() < 0.4 * full_backend.model.get_memory_footprint()
    accuracy = sum(v == t for v, t in zip(full, truth)) / len(truth)
    agreement = sum(a == b for a, b in zip(full, quant)) / len(full)
    assert accuracy >= 0.9, accuracy  # the full-precision judge learned the rule (measured: 64 of 64)
    assert agreement >= 0.9, (agreement, full, quant)  # measured: 64 of 64 (and 256 of 256)
    # the log-probs of the right verdict's tokens (measured mean |delta| 7e-5 (4-bit), 6e-6 (8-bit) nats)
    rows = judge_rows(full_backend.tokenizer, held_out)
    ids, attn = torch.stack([r["input_ids"] for r in rows]), torch.stack([r["attention_mask"] for r in rows])
    verdict = (torch.stack([r["labels"] for r in rows]) != -100).long()
    with torch.no_grad():
        diff = sequence_logprobs(full_backend.model, ids, attn, verdict) - sequence_logprobs(
            backend.model, ids, attn, verdict
        )
    assert diff[verdict[:, 1:].bool()].abs().mean() < 0.01
