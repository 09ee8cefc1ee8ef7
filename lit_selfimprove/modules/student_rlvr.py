"""StudentRLVR: RL with verifiable rewards for a math student (SOAR's inner loop).

Each training step (``global_step`` counts optimizer steps: one per batch of questions,
times ``ppo_epochs``):

1. sample ``group_size`` completions per question from the policy;
2. score them with the injected reward (math-verify by default);
3. group advantages (RLOO default, GRPO, Dr.GRPO);
4. policy-gradient loss (optional PPO clipping) + ``kl_coef`` * k3 KL to a frozen
   reference (no reference is kept when ``kl_coef`` is 0);
5. manual backward, gradient clipping, optimizer step.

Validation measures greedy accuracy and unbiased pass@k from ``val_num_samples`` samples.
Batches are dicts with ``question`` and ``answer`` lists, or ``(questions, answers)`` pairs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
from lightning import LightningModule

from lit_selfimprove.datamodules.prompt_length import check_datamodule_prompts
from lit_selfimprove.generation import GenerationConfig, attach_backend, generate
from lit_selfimprove.loops.rlvr import rlvr_step
from lit_selfimprove.metrics import PassAtK
from lit_selfimprove.modeling import (
    check_attn_implementation,
    check_lora,
    check_quantization,
    load_tokenizer,
    warn_if_half_trainable,
)
from lit_selfimprove.modules._shared import (
    ZeroRewardWatch,
    adamw_with_warmup,
    check_at_least_one,
    check_optimizer,
    generation_config,
    load_policy,
    on_device,
    sampling_generator,
    write_samples,
)
from lit_selfimprove.prompts import SOAR_STUDENT_PROMPT, as_user_turn, check_student_prompt
from lit_selfimprove.rewards.base import pop_reward_stats, score_completions
from lit_selfimprove.rl.rlvr_config import RLVRConfig


def unpack_problems(batch) -> tuple[list[str], list[str]]:
    """``(questions, answers)`` from a dict batch or a ``(questions, answers)`` pair."""
    if isinstance(batch, dict):
        if "question" not in batch or "answer" not in batch:
            raise KeyError(f"a problem batch needs 'question' and 'answer' keys, got {sorted(batch)}")
        return list(batch["question"]), [str(a) for a in batch["answer"]]
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return list(batch[0]), [str(a) for a in batch[1]]
    raise TypeError(f"cannot read (question, answer) pairs from a batch of type {type(batch).__name__}")


class StudentRLVR(LightningModule):
    """RLVR (RLOO / GRPO / Dr.GRPO) on (question, answer) problems for any HF causal LM.

    Args:
        model: hub id, local folder or ``builtin:tiny-student``.
        tokenizer: defaults to ``model``.
        reward: ``reward(completions, answers) -> Tensor``; default
            ``MathVerifyReward(mode="shaped")`` (SOAR's 120/20/10/0).
        prompt_template: student prompt with a ``{question}`` field (SOAR's by default).
        use_chat_template: wrap the formatted prompt as a user turn of the tokenizer's chat template.
        rl: the RL settings group (:class:`~lit_selfimprove.rl.rlvr_config.RLVRConfig`, ``rl:`` in
            YAML; default: SOAR's student settings): ``group_size`` (completions per question, G),
            ``max_new_tokens``, ``temperature``, ``top_p``, ``advantage`` (``rloo`` | ``grpo`` |
            ``dr_grpo``), ``loss_aggregation`` (``token`` | ``sequence`` | ``fixed``: Dr.GRPO's
            constant normaliser), ``clip_eps_low`` (PPO clip epsilon; ``None``: plain REINFORCE/RLOO
            as SOAR), ``clip_eps_high``, ``ppo_epochs`` (optimizer steps per generation batch),
            ``kl_coef`` (KL to the frozen reference, SOAR: 0.001), ``kl_estimator`` (``k3`` | ``k1``
            | ``k2``), ``micro_batch_size`` (sequences per forward/backward; ``None``: all) and
            ``max_grad_norm`` (``None`` disables clipping).
        lr: AdamW learning rate (SOAR: 1e-5).
        weight_decay: AdamW weight decay.
        warmup_steps: linear lr warmup (optimizer steps).
        optimizer: ``adamw`` (torch), ``adamw8bit`` (bitsandbytes' 8-bit AdamW: optimizer states in
            8 bits; CPU or GPU) or ``paged_adamw8bit`` (CUDA only); see
            :func:`~lit_selfimprove.modules._shared.adamw`.
        val_num_samples: samples per validation problem for pass@k (0: greedy only).
        val_ks: the k of pass@k (k > val_num_samples are skipped).
        val_temperature: sampling temperature for pass@k.
        val_max_new_tokens: generation budget at validation (defaults to ``max_new_tokens``).
        generation: the sampling backend (``GenerationConfig``; YAML ``generation: {backend: vllm}``):
            the built-in sampler (default) or a colocated vLLM engine refreshed from the trained
            weights before each generation that follows a change.
        dtype: compute dtype (``float32`` on CPU; ``bfloat16`` on GPUs, through FSDP2's
            MixedPrecisionPolicy or the Trainer's ``precision: bf16-mixed``) and storage dtype of the
            frozen KL reference. The trained policy always keeps float32 master weights.
        attn_implementation: e.g. ``sdpa`` or ``flash_attention_2``.
        quantization: ``BitsAndBytesConfig`` kwargs (``gpu`` extra).
        ref_quantization: load the frozen KL reference in ``4bit`` or ``8bit`` (or
            ``BitsAndBytesConfig`` kwargs) from ``model`` again instead of copying the policy
            (``None``: an unquantized copy in ``dtype``); bitsandbytes, CPU or GPU.
        lora: ``peft.LoraConfig`` kwargs (e.g. ``{r: 8, lora_alpha: 16, target_modules: all-linear}``):
            only the adapters train, and the KL reference is the policy with its adapters disabled
            (no second copy; not with ``ref_quantization``).
        log_samples_every: write sample completions to ``samples.jsonl`` at the first training step
            and every N-th after, counted in optimizer steps before the step (0: never; see
            :func:`~lit_selfimprove.modules._shared.write_samples`).
        num_log_samples: completions written each time.
        warn_zero_reward_steps: warn when the reward is 0 for every sample this many steps in a row
            (a wrong answer format or template; ``None`` never warns).
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        reward: Callable | None = None,
        prompt_template: str = SOAR_STUDENT_PROMPT,
        use_chat_template: bool = False,
        rl: RLVRConfig | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        optimizer: str = "adamw",
        val_num_samples: int = 32,
        val_ks: Sequence[int] = (1, 4, 8, 16, 32),
        val_temperature: float = 1.0,
        val_max_new_tokens: int | None = None,
        generation: GenerationConfig | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        quantization: dict | None = None,
        ref_quantization: str | dict | None = None,
        lora: dict | None = None,
        log_samples_every: int = 50,
        num_log_samples: int = 4,
        warn_zero_reward_steps: int | None = 20,
    ):
        super().__init__()
        check_attn_implementation(attn_implementation)  # at start-up, not when the model loads
        check_optimizer(optimizer)
        check_quantization(ref_quantization)
        check_lora(lora, ref_quantization, model=model)
        check_student_prompt(prompt_template)
        self.rl = (
            RLVRConfig(**rl) if isinstance(rl, dict) else rl or RLVRConfig()
        )  # a dict: from hparams.yaml
        check_at_least_one(val_max_new_tokens=val_max_new_tokens, micro_batch_size=self.rl.micro_batch_size)
        self.generation = generation_config(generation)
        self.save_hyperparameters(ignore=["reward"])
        self.hparams["rl"] = dataclasses.asdict(self.rl)  # plain data in checkpoints (weights_only loads)
        self.hparams["generation"] = dataclasses.asdict(self.generation)
        self.automatic_optimization = False
        if reward is None:
            from lit_selfimprove.rewards import MathVerifyReward

            reward = MathVerifyReward(mode="shaped")
        self.reward = reward
        self.zero_reward = ZeroRewardWatch("StudentRLVR", warn_zero_reward_steps)
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.policy: torch.nn.Module | None = None
        self._frozen: dict[str, torch.nn.Module] = {}  # KL reference: kept out of state_dict
        self.val_pass_at_k = PassAtK(ks=[k for k in val_ks if k <= max(1, val_num_samples)])

    # ----------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        load_policy(self, reference=self.rl.kl_coef > 0)
        attach_backend(self.policy, self.generation)

    def on_fit_start(self) -> None:
        warn_if_half_trainable("StudentRLVR", self.policy)
        # before step 0: a prompt over the context would generate past it for minutes, not fail
        check_datamodule_prompts(
            self.trainer,
            self.tokenizer,
            self.format_prompt,
            self.policy,
            self.rl.max_new_tokens,
            self.hparams.val_max_new_tokens,
        )

    @property
    def ref_model(self) -> torch.nn.Module | None:
        return on_device(self._frozen.get("ref"), self.device)

    def sampling_generator(self) -> torch.Generator:
        return sampling_generator(self)

    def format_prompt(self, question: str) -> str:
        text = self.hparams.prompt_template.format(question=question)
        return as_user_turn(self.tokenizer, text, self.hparams.use_chat_template)

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_with_warmup(
            self.policy.parameters(),
            hp.lr,
            hp.weight_decay,
            hp.warmup_steps,
            optimizer=hp.get("optimizer", "adamw"),
        )

    # -------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> None:
        questions, answers = unpack_problems(batch)
        step = self.global_step  # optimizer steps before this one
        opt = self.optimizers()
        sched = self.lr_schedulers()
        stats, rollouts, rewards = rlvr_step(
            self.policy,
            self.tokenizer,
            self.reward,
            [self.format_prompt(q) for q in questions],
            answers,
            self.rl,
            optimizer=opt,
            ref_model=self.ref_model,
            generator=self.sampling_generator(),
            backward=self.manual_backward,
            clip=lambda norm: self.clip_gradients(
                opt, gradient_clip_val=norm, gradient_clip_algorithm="norm"
            ),
            after_step=sched.step,
        )
        if (reward_stats := pop_reward_stats(self.reward)) is not None:
            stats["verify_timeouts"] = float(reward_stats.get("timeouts", 0))
        self.zero_reward.update(not bool((rewards != 0).any()), rollouts.texts[0] if rollouts.texts else None)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=len(questions))
        self.log("train/lr", sched.get_last_lr()[0], batch_size=len(questions))
        self.log("reward", stats["reward"], prog_bar=True, logger=False, batch_size=len(questions))
        rows = functools.partial(self._sample_rows, questions, answers, rollouts.texts, rewards)
        write_samples(self, self.hparams.log_samples_every, step, "samples.jsonl", rows)  # + logger tables

    # ------------------------------------------------------------------------ validation
    def _eval_problems(self, batch) -> dict[str, float]:
        questions, answers = unpack_problems(batch)
        prompts = [self.format_prompt(q) for q in questions]
        budget = self.hparams.val_max_new_tokens or self.rl.max_new_tokens
        greedy = generate(self.policy, self.tokenizer, prompts, max_new_tokens=budget, temperature=0.0)
        _, greedy_correct = score_completions(self.reward, greedy.texts, answers)
        n = self.hparams.val_num_samples
        if n > 0:
            sampled = generate(
                self.policy,
                self.tokenizer,
                prompts,
                num_samples=n,
                max_new_tokens=budget,
                temperature=self.hparams.val_temperature,
                generator=self.sampling_generator(),
            )
            _, correct = score_completions(self.reward, sampled.texts, [a for a in answers for _ in range(n)])
            self.val_pass_at_k.update(n, correct.view(-1, n).sum(-1).to(self.device))
        return {"accuracy": float(greedy_correct.float().mean())}

    def validation_step(self, batch, batch_idx: int) -> None:
        questions, _ = unpack_problems(batch)
        out = self._eval_problems(batch)
        self.log("val/accuracy", out["accuracy"], prog_bar=True, batch_size=len(questions), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.hparams.val_num_samples > 0:
            self.log_dict({f"val/{k}": v for k, v in self.val_pass_at_k.compute().items()})
            self.val_pass_at_k.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        questions, _ = unpack_problems(batch)
        out = self._eval_problems(batch)
        self.log("test/accuracy", out["accuracy"], batch_size=len(questions), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        if self.hparams.val_num_samples > 0:
            self.log_dict({f"test/{k}": v for k, v in self.val_pass_at_k.compute().items()})
            self.val_pass_at_k.reset()

    # --------------------------------------------------------------------------- samples
    def _sample_rows(self, questions, answers, texts, rewards) -> list[dict]:
        """The first completion of each of the first ``num_log_samples`` questions."""
        g, k = self.rl.group_size, self.hparams.num_log_samples
        return [
            {
                "step": self.global_step,
                "question": questions[i // g],
                "answer": answers[i // g],
                "completion": texts[i],
                "reward": float(rewards[i]),
            }
            for i in range(0, min(len(texts), k * g), g)
        ]
