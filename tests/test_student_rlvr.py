"""StudentRLVR: the update moves probability toward rewarded completions, seeded runs
repeat, zero rewards give no update, and it trains with a user's own DataModule."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_selfimprove.datamodules import ArithmeticProblemDataModule
from lit_selfimprove.loops.rlvr import rlvr_step
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer
from lit_selfimprove.modules import StudentRLVR
from lit_selfimprove.rl.logprobs import sequence_logprobs
from lit_selfimprove.rl.rlvr_config import RLVRConfig
from tests.helpers import PROMPT, DigitReward, tiny_trainer


class ZeroReward:
    def __call__(self, completions, answers, prompts=None):
        return torch.zeros(len(completions))


def test_update_moves_logprobs_toward_rewarded_completions(tiny_random_lm):
    torch.manual_seed(0)
    model, tok = load_causal_lm(tiny_random_lm), load_tokenizer(tiny_random_lm)
    ref = load_causal_lm(tiny_random_lm).requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    cfg = RLVRConfig(group_size=8, max_new_tokens=8, kl_coef=0.001, max_grad_norm=None)
    prompts = [PROMPT.format(question=q) for q in ("1+2", "33+44", "5+5", "12+9")]
    stats, ro, rewards = rlvr_step(
        model, tok, DigitReward(), prompts, ["3", "77", "10", "21"], cfg, opt, ref_model=ref
    )
    ids, attn, cmask = ro.sequences()
    with torch.no_grad():
        before = sequence_logprobs(ref, ids, attn, cmask).sum(-1)
        after = sequence_logprobs(model, ids, attn, cmask).sum(-1)
    advantages = rewards.view(-1, 8) - rewards.view(-1, 8).mean(-1, keepdim=True)
    # a policy-gradient step raises log-probs where the advantage is positive, lowers them elsewhere
    assert float((advantages.flatten() * (after - before)).sum()) > 0
    pos, neg = advantages.flatten() > 0, advantages.flatten() < 0
    assert (after - before)[pos].mean() > (after - before)[neg].mean()
    assert 0 < stats["reward"] < 1 and stats["zero_std_frac"] < 1 and stats["completion_len"] > 0


def test_zero_rewards_change_nothing(tiny_random_lm, tmp_path):
    """All-zero rewards (a fail@k hard set): zero advantages, KL gradient zero at the start."""
    module = StudentRLVR(
        tiny_random_lm,
        reward=ZeroReward(),
        prompt_template=PROMPT,
        rl=RLVRConfig(group_size=4, max_new_tokens=6),
        lr=1e-2,
        val_num_samples=0,
    )
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    data = ArithmeticProblemDataModule(levels=[2], num_train=16, num_test=4, batch_size=4)
    tiny_trainer(3, tmp_path, logger=True).fit(module, data)
    after = module.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("train/zero_std_frac")]
    assert logged and all(
        float(r["train/zero_std_frac"]) == 1.0 and float(r["train/reward"]) == 0.0 for r in logged
    )


def _fit_once(model_dir: str, tmp_path: Path, seed: int) -> tuple[list[dict], list[dict]]:
    L.seed_everything(seed)
    module = StudentRLVR(
        model_dir,
        reward=DigitReward(),
        prompt_template=PROMPT,
        rl=RLVRConfig(group_size=4, max_new_tokens=6),
        lr=1e-2,
        val_num_samples=4,
        val_ks=[1, 2, 4],
        log_samples_every=1,
        num_log_samples=2,
    )
    data = ArithmeticProblemDataModule(levels=[2], num_train=32, num_test=6, batch_size=2, val_batch_size=6)
    tiny_trainer(
        4, tmp_path, logger=True, limit_val_batches=None, val_check_interval=2, check_val_every_n_epoch=None
    ).fit(module, data)
    samples = [json.loads(line) for line in open(next(tmp_path.rglob("samples.jsonl")))]
    metrics = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    return samples, metrics


def test_seeded_runs_repeat_and_log_the_metrics(tiny_random_lm, tmp_path):
    s1, m1 = _fit_once(tiny_random_lm, tmp_path / "a", seed=3)
    s2, m2 = _fit_once(tiny_random_lm, tmp_path / "b", seed=3)
    s3, _ = _fit_once(tiny_random_lm, tmp_path / "c", seed=4)
    assert s1 == s2 and m1 == m2
    assert [r["completion"] for r in s1] != [r["completion"] for r in s3]
    columns = set(m1[0])
    for name in (
        "train/reward", "train/accuracy", "train/zero_std_frac", "train/kl", "train/completion_len",
        "train/clip_fraction", "train/verify_timeouts", "val/accuracy", "val/pass@1", "val/pass@2", "val/pass@4",
    ):  # fmt: skip
        if name == "train/verify_timeouts":
            continue  # only rewards with pop_stats() (MathVerifyReward) log it
        assert name in columns, name
    assert len(s1) == 4 * 2 and {"question", "answer", "completion", "reward", "step"} <= set(s1[0])


class TupleProblems(L.LightningDataModule):
    """A user's own DataModule yielding (questions, answers) batches."""

    def train_dataloader(self):
        pairs = [(f"{a}+{a}", str(2 * a)) for a in range(16)]
        return DataLoader(pairs, batch_size=4, collate_fn=lambda b: ([q for q, _ in b], [a for _, a in b]))


def test_user_datamodule_with_tuples(tiny_random_lm, tmp_path):
    module = StudentRLVR(
        tiny_random_lm,
        reward=DigitReward(),
        prompt_template=PROMPT,
        rl=RLVRConfig(group_size=2, max_new_tokens=4, kl_coef=0.0),
    )
    trainer = tiny_trainer(2, tmp_path, logger=True, limit_val_batches=None)
    trainer.fit(module, TupleProblems())
    assert trainer.global_step == 2
    assert module.ref_model is None  # kl_coef 0: no reference copy kept


def test_mathverify_reward_is_the_default_and_counts_timeouts(tiny_random_lm, tmp_path):
    module = StudentRLVR(
        tiny_random_lm,
        prompt_template=PROMPT,
        rl=RLVRConfig(group_size=2, max_new_tokens=4),
        val_num_samples=0,
    )
    assert type(module.reward).__name__ == "MathVerifyReward" and module.reward.mode == "shaped"
    data = ArithmeticProblemDataModule(levels=[1], num_train=8, num_test=2, batch_size=2)
    tiny_trainer(1, tmp_path, logger=True).fit(module, data)
    assert "train/verify_timeouts" in next(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_template": "no field"}, "{question}"),
        ({"rl": {"group_size": 1}}, "group_size"),
        ({"rl": {"advantage": "ppo"}}, "rloo"),
        ({"rl": {"kl_coef": -1.0}}, "kl_coef"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny_random_lm, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        StudentRLVR(tiny_random_lm, reward=DigitReward(), **kwargs)


def test_bad_batch_is_a_clear_error():
    from lit_selfimprove.modules.student_rlvr import unpack_problems

    assert unpack_problems({"question": ["1+1"], "answer": [2]}) == (["1+1"], ["2"])
    with pytest.raises(KeyError, match="question"):
        unpack_problems({"problem": ["1+1"]})
    with pytest.raises(TypeError):
        unpack_problems(42)


def test_resume_from_checkpoint_continues_training(tiny_random_lm, tmp_path):
    """A run stopped after 2 steps resumes from its checkpoint at step 2 with the trained weights."""

    def make():
        return StudentRLVR(tiny_random_lm, reward=DigitReward(), prompt_template=PROMPT,
                           rl=RLVRConfig(group_size=2, max_new_tokens=4), lr=1e-2, val_num_samples=0)  # fmt: skip

    data = ArithmeticProblemDataModule(levels=[2], num_train=32, num_test=4, batch_size=2)
    first = make()
    trainer = tiny_trainer(2, tmp_path / "a", logger=True)
    trainer.fit(first, data)
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 2 and all(k.startswith("policy.") for k in saved["state_dict"])

    resumed = make()
    calls = []

    class CountSteps(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            calls.append(batch_idx)

    trainer = tiny_trainer(3, tmp_path / "b", logger=True, callbacks=[CountSteps()])
    trainer.fit(resumed, data, ckpt_path=ckpt)
    assert trainer.global_step == 3 and len(calls) == 1  # one more step, not a restart from 0
    start = load_causal_lm(tiny_random_lm).state_dict()
    assert any(not torch.equal(start[k], v) for k, v in resumed.policy.state_dict().items())
    # the KL reference is the initial model, not the checkpoint's trained policy
    ref = resumed.ref_model.state_dict()
    assert all(torch.equal(start[k], ref[k]) for k in start)
