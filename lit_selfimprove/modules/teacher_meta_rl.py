"""TeacherMetaRL: SOAR's outer loop, a teacher that learns to write stepping-stone problems.

One ``training_step`` is one outer step (manual optimization: ``global_step`` counts teacher
optimizer steps, i.e. outer steps; the inner student trainings use plain optimizers and do not
count). Its batch is Q_R, fresh questions of D_train: Q_R's size is the DataModule's
``batch_size`` (SOAR: 64, resampled every outer step, so use a shuffling DataModule).

1. the teacher samples completions in rounds of ``teacher_sampling.batch`` until ``g * n`` valid
   ``<question>..</question><answer>\\boxed{..}</answer>`` pairs exist (rejection sampling, at
   most ``teacher_sampling.max_rounds`` rounds); in sampling order they form g datasets X_1..X_g of n;
2. greedy accuracy of the baseline student (``self.student``) on Q_R;
3. a reward R_k per dataset:
   * ``grounded`` (SOAR): for each X_k, r times: restore the student in place from the baseline
     snapshot taken at the start of the step, train it with RLVR on X_k for ``inner.steps`` steps
     (fresh AdamW), measure its greedy accuracy on Q_R. R_k = mean over the repeats of
     (accuracy - baseline accuracy);
   * ``intrinsic`` (Intrinsic-T): learnability of X_k for the baseline student (no training);
4. teacher update: A_k = R_k - mean_{j != k} R_j (RLOO over datasets) on every rollout of X_k;
   policy-gradient loss over the whole teacher completions (token mean) + ``teacher_update.kl_coef``
   * k3 KL to the frozen initial teacher; linear warmup, gradient clipping, one AdamW step;
5. promotion (``promotion.promote``, grounded only): the module's ``PromotionRule`` decides; dataset k*'s
   median-reward trained student becomes the baseline in place on every rank. ``self.last_outer``
   (an :class:`~lit_selfimprove.modules.soar_outer.OuterStep`) holds the step's result, which the
   ``Promotion`` callback writes to disk (PQ file, promoted students).

Validation / test measure the baseline student's greedy accuracy on the DataModule's test set.

Distributed (DDP, or ModelParallelStrategy = FSDP2 sharding the teacher): every rank samples its
share (``g * n / world_size``) of the pairs, the pairs and the Q_R batches are all-gathered so that
every rank sees the same g datasets and the same Q_R (|Q_R| is then the global batch), and the
g * r inner trainings (g for ``intrinsic``) are spread over the ranks: rank i runs trainings
i, i + world, ...; their rewards are all-reduced, so every rank computes the same advantages, and
each rank back-propagates its own rollouts (DDP / FSDP average the teacher gradients). Students
stay unsharded per rank and out of DDP's gradient sync; each inner training draws from its own
RNG stream seeded by (seed, step, training index), whichever rank runs it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from lit_selfimprove.datamodules.prompt_length import check_datamodule_prompts
from lit_selfimprove.distributed import broadcast_object, gather_objects, seeded_generator, world
from lit_selfimprove.generation import GenerationConfig, Rollouts, attach_backend, generate
from lit_selfimprove.loops import soar as soar_loops
from lit_selfimprove.loops.policy_update import policy_gradient_update
from lit_selfimprove.loops.teacher_pairs import math_verify_parseable
from lit_selfimprove.metrics.vendi import HashingNgramEmbedding, vendi_score
from lit_selfimprove.modeling import (
    AdapterDisabledReference,
    adapter_state,
    frozen_copy,
    is_peft,
    load_tokenizer,
    load_trained_model,
    merge_adapters_into_base,
    quantized_copy,
    save_pretrained_merged,
    warn_if_half_trainable,
)
from lit_selfimprove.modules._shared import (
    ZeroRewardWatch,
    adamw_with_warmup,
    as_group,
    generation_config,
    on_device,
    root_device,
    sampling_generator,
    write_samples,
)
from lit_selfimprove.modules.median_students import StudentFolder, install_student
from lit_selfimprove.modules.soar_outer import MedianStudents, OuterStep
from lit_selfimprove.modules.soar_settings import (
    InnerConfig,
    MemoryConfig,
    PromotionConfig,
    TeacherSamplingConfig,
    TeacherUpdateConfig,
    check_soar_settings,
)
from lit_selfimprove.modules.student_rlvr import unpack_problems
from lit_selfimprove.prompts import SOAR_STUDENT_PROMPT, SOAR_TEACHER_PROMPT, as_user_turn
from lit_selfimprove.rewards.base import parseable_check, pop_reward_stats
from lit_selfimprove.rl.teacher_rewards import teacher_advantages

# the settings groups (one owner per setting), as init arguments, attributes and hparams keys
GROUPS = ("inner", "teacher_sampling", "teacher_update", "promotion", "memory")


class TeacherMetaRL(LightningModule):
    """SOAR: meta-RL of a teacher LM whose reward is the progress of a student trained on its problems.

    Paper names: g = ``num_datasets``, n = ``dataset_size``, r = ``num_repeats``, |Q_R| = the
    DataModule's ``batch_size``. Defaults are the paper's. The settings groups (a dict in YAML, each
    field documented in :mod:`~lit_selfimprove.modules.soar_settings`) are the only owners of their
    settings: ``inner`` (:class:`~lit_selfimprove.modules.soar_settings.InnerConfig`, the inner RLVR
    trainings), ``teacher_sampling`` (``TeacherSamplingConfig``: rounds, budget, temperature, answer
    check), ``teacher_update`` (``TeacherUpdateConfig``: optimizer, warmup, KL, clipping),
    ``promotion`` (``PromotionConfig``: the rule, the median students it needs) and ``memory``
    (``MemoryConfig``: dtype, attention kernel, quantized references, LoRA).

    Args:
        teacher: teacher model (hub id, local folder or ``builtin:tiny-teacher``).
        student: baseline student model (hub id, local folder or ``builtin:tiny-student``).
        teacher_tokenizer: defaults to ``teacher``.
        student_tokenizer: defaults to ``student``.
        reward: student reward ``reward(completions, answers) -> Tensor`` (with an optional
            ``score`` method for correctness); default ``MathVerifyReward(mode="shaped")``.
            Used for inner RLVR (against the teacher's answers) and for accuracy on Q_R.
        teacher_prompt: the teacher's prompt (no fields); SOAR's paraphrased by default.
        teacher_prefill: text that starts the teacher's answer (e.g. ``<question>``): put after the prompt
            (after the chat template's assistant header) and before each completion when it is parsed;
            a small model that never opens the tags by itself continues them (default: none).
        prompt_template: student prompt with a ``{question}`` field.
        use_chat_template: wrap both prompts as a user turn of their tokenizer's chat template.
        teacher_reward: ``grounded`` (SOAR) or ``intrinsic`` (learnability, Intrinsic-T).
        num_datasets: g, datasets per outer step (RLOO group over datasets, >= 2).
        dataset_size: n, (question, answer) pairs per dataset.
        num_repeats: r, inner trainings per dataset (grounded reward).
        eval_max_new_tokens: greedy budget for accuracy on Q_R and validation (default
            ``inner.max_new_tokens``).
        eval_batch_size: prompts per greedy generation call (``None``: all at once).
        intrinsic_samples: student samples per question for the intrinsic reward (paper: 32).
        generation: the sampling backend (``GenerationConfig``; YAML ``generation: {backend: vllm}``):
            the built-in sampler (default) or colocated vLLM engines (teacher, working student)
            refreshed from the trained weights before each generation that follows a change.
        log_samples_every: append the step's datasets and rewards to ``teacher_samples.jsonl`` in
            the log dir at the first outer step and every N-th after (0: never; see
            :func:`~lit_selfimprove.modules._shared.write_samples`).
        save_teacher: write the final teacher (and its tokenizer) as a Hugging Face folder to
            ``<log dir>/teacher`` when training ends (what ``sample-questions`` reads for Grounded-T).
        diversity_embedding: ``texts -> [n, d]`` embedding for the logged Vendi score of each
            step's questions (``teacher/vendi``); default: the cheap built-in
            ``HashingNgramEmbedding`` (use ``SentenceEmbedding`` for paper-comparable values).
        warn_zero_reward_steps: warn when the inner students' reward (grounded) or success rate
            (intrinsic) is 0 for every sample this many outer steps in a row (``None``: never).
    """

    def __init__(
        self,
        teacher: str,
        student: str,
        teacher_tokenizer: str | None = None,
        student_tokenizer: str | None = None,
        reward: Callable | None = None,
        teacher_prompt: str = SOAR_TEACHER_PROMPT,
        teacher_prefill: str = "",
        prompt_template: str = SOAR_STUDENT_PROMPT,
        use_chat_template: bool = False,
        teacher_reward: Literal["grounded", "intrinsic"] = "grounded",
        num_datasets: int = 4,
        dataset_size: int = 64,
        num_repeats: int = 4,
        eval_max_new_tokens: int | None = None,
        eval_batch_size: int | None = None,
        intrinsic_samples: int = 32,
        inner: InnerConfig | None = None,
        teacher_sampling: TeacherSamplingConfig | None = None,
        teacher_update: TeacherUpdateConfig | None = None,
        promotion: PromotionConfig | None = None,
        memory: MemoryConfig | None = None,
        generation: GenerationConfig | None = None,
        log_samples_every: int = 10,
        save_teacher: bool = True,
        diversity_embedding: Callable | None = None,
        warn_zero_reward_steps: int | None = 20,
    ):
        super().__init__()
        # the settings groups: a dict (YAML, hparams.yaml) becomes its dataclass, None its defaults
        self.inner = as_group(InnerConfig, inner, "inner")
        self.teacher_sampling = as_group(TeacherSamplingConfig, teacher_sampling, "teacher_sampling")
        self.teacher_update = as_group(TeacherUpdateConfig, teacher_update, "teacher_update")
        self.promotion = as_group(PromotionConfig, promotion, "promotion")
        self.memory = as_group(MemoryConfig, memory, "memory")
        self.generation = generation_config(generation)
        self.save_hyperparameters(ignore=["reward", "diversity_embedding"])
        check_soar_settings(self.hparams, self.inner, self.teacher_update, self.promotion, self.memory)
        for name in GROUPS:  # plain data in checkpoints (weights_only loads)
            self.hparams[name] = dataclasses.asdict(getattr(self, name))
        self.hparams["generation"] = dataclasses.asdict(self.generation)
        # the Vendi score of each step's questions (diversity; a collapsing teacher shows here)
        self.diversity_embedding = diversity_embedding or HashingNgramEmbedding()
        self.automatic_optimization = False
        self.promotion_rule = self.promotion.rule()  # its state is checkpointed with the module
        self.promotions: list[dict] = []  # step, dataset, reward, moving_avg of each promotion
        if reward is None:
            from lit_selfimprove.rewards import MathVerifyReward

            reward = MathVerifyReward(mode="shaped")
        self.reward = reward
        self.teacher_tokenizer = load_tokenizer(teacher_tokenizer or teacher)
        self.student_tokenizer = load_tokenizer(student_tokenizer or student)
        self.teacher: torch.nn.Module | None = None
        self.student: torch.nn.Module | None = None
        # frozen initial teacher (KL reference) and baseline-student reference: not in state_dict
        self._frozen: dict[str, torch.nn.Module] = {}
        self.last_outer: OuterStep | None = None
        self.median_keeper: MedianStudents | None = None  # the last grounded step's kept students
        self.zero_reward = ZeroRewardWatch("TeacherMetaRL (inner student reward)", warn_zero_reward_steps)

    # ----------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        if self.teacher is not None:
            return
        mem = self.memory
        kwargs = {"dtype": mem.dtype, "attn_implementation": mem.attn_implementation}
        # FSDP2 (ModelParallelStrategy) shards the teacher and its reference; students stay whole
        self.teacher, ref = load_trained_model(
            self.hparams.teacher,
            reference=self.teacher_update.kl_coef > 0,
            lora=mem.lora,  # with LoRA the KL reference is the teacher with its adapters disabled
            device_mesh=getattr(self, "device_mesh", None),
            ref_quantization=mem.ref_quantization,
            ref_device=root_device(self),
            **kwargs,
        )
        self.student, _ = load_trained_model(self.hparams.student, lora=mem.student_lora, **kwargs)
        if ref is not None:
            self._frozen["ref"] = ref
        # the teacher and the working student each get their own engine (vLLM): the student's is
        # refreshed after every inner optimizer step, restore of the baseline and promotion
        attach_backend(self.teacher, self.generation)
        attach_backend(self.student, self.generation)
        # DDP must not all-reduce the students' gradients: each rank trains different copies
        self._ddp_params_and_buffers_to_ignore = [
            f"student.{name}" for name, _ in self.student.named_parameters(remove_duplicate=False)
        ] + [f"student.{name}" for name, _ in self.student.named_buffers(remove_duplicate=False)]

    def on_fit_start(self) -> None:
        warn_if_half_trainable("TeacherMetaRL", self.teacher, self.student)
        budget = self.hparams.eval_max_new_tokens or self.inner.max_new_tokens  # greedy_accuracy's
        check_datamodule_prompts(
            self.trainer, self.student_tokenizer, self.format_student_prompt, self.student, budget
        )
        if self.promotion.keep_median_students == "disk" and self.hparams.teacher_reward == "grounded":
            folder = StudentFolder.of_run(self._trainer, self.promotion.median_students_dir)
            self._median_dir = folder.prepare()  # a folder that cannot be written fails now, not hours in
        writers = [cb for cb in self.trainer.callbacks if type(cb).__name__ == "Promotion"]
        if self.promotes and not writers:
            rank_zero_info(
                "TeacherMetaRL: promotions change the baseline student, but without the Promotion "
                "callback no PQ file (promotion_questions.jsonl) or promoted-student folder is written"
            )

    def _frozen_model(self, key: str) -> torch.nn.Module | None:
        return on_device(self._frozen.get(key), self.device)

    @property
    def ref_teacher(self) -> torch.nn.Module | None:
        """The frozen initial teacher (``None`` when ``teacher_update.kl_coef`` is 0)."""
        return self._frozen_model("ref")

    def sampling_generator(self) -> torch.Generator:
        return sampling_generator(self)

    def job_generator(self, job: int) -> torch.Generator:
        """The RNG of inner training / intrinsic evaluation ``job`` of this outer step, the same
        whichever rank runs it."""
        return seeded_generator(self.device, 1_000_000 + job, self.global_step)

    # ------------------------------------------------------------------------- distributed
    def median_student(self, k: int) -> dict | str | None:
        """Dataset k's median-reward trained student as the rank that trained it
        (``last_outer.median_owner[k]``) keeps it: a CPU state dict, or its file with
        ``keep_median_students: disk``; ``None`` on other ranks and when it was not kept."""
        return self.last_outer.median_students[k]

    def configure_optimizers(self):
        cfg = self.teacher_update
        return adamw_with_warmup(
            self.teacher.parameters(), cfg.lr, cfg.weight_decay, cfg.warmup_steps, optimizer=cfg.optimizer
        )

    # ---------------------------------------------------------------------------- prompts
    def teacher_prompt_text(self) -> str:
        hp = self.hparams
        return (
            as_user_turn(self.teacher_tokenizer, hp.teacher_prompt, hp.use_chat_template) + hp.teacher_prefill
        )

    def format_student_prompt(self, question: str) -> str:
        text = self.hparams.prompt_template.format(question=question)
        return as_user_turn(self.student_tokenizer, text, self.hparams.use_chat_template)

    @property
    def student_side(self) -> soar_loops.Student:
        """The student as SOAR's loops use it: model, tokenizer, reward, prompt and greedy evaluation."""
        return soar_loops.Student(
            self.student,
            self.student_tokenizer,
            self.reward,
            self.format_student_prompt,
            self.hparams.eval_batch_size,
            self.hparams.eval_max_new_tokens or self.inner.max_new_tokens,
        )

    # ------------------------------------------------------------- 1. teacher sampling
    def answers_ok(self) -> Callable[[list[str]], list[bool]] | None:
        """The parseability check of boxed answers chosen by ``teacher_sampling.answer_check`` (``None``:
        structure only)."""
        mode = self.teacher_sampling.answer_check
        if mode == "light":
            return None
        if mode == "auto" and (check := parseable_check(self.reward)) is not None:
            return check
        return functools.partial(math_verify_parseable, timeout=2)

    def sample_teacher_round(self, num_samples: int) -> Rollouts:
        """One round of ``num_samples`` teacher completions (override for another sampling backend)."""
        cfg = self.teacher_sampling
        ro = generate(
            self.teacher,
            self.teacher_tokenizer,
            [self.teacher_prompt_text()],
            num_samples=num_samples,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            generator=self.sampling_generator(),
        )
        prefill = self.hparams.teacher_prefill  # part of the prompt; the parser reads it with the text
        return dataclasses.replace(ro, texts=[prefill + t for t in ro.texts]) if prefill else ro

    def sample_valid_pairs(self) -> tuple[list[tuple[str, str]], Rollouts, dict[str, float]]:
        """Rejection sampling: ``(pairs, rollouts, stats)`` with exactly ``g * n`` valid pairs, and
        the teacher rollouts they came from (row i wrote pair i). Raises ``RuntimeError`` (naming the
        validity rate) when ``teacher_sampling.max_rounds`` rounds do not give enough valid pairs."""
        hp = self.hparams
        return soar_loops.sample_valid_pairs(
            self.sample_teacher_round,
            hp.num_datasets * hp.dataset_size,
            self.teacher_sampling,
            self.answers_ok(),
            self.teacher_tokenizer.pad_token_id,
            self.device,
        )

    # ------------------------------------------------------------------ 2. student accuracy
    def greedy_accuracy(self, questions: list[str], answers: list[str]) -> float:
        """Greedy accuracy of ``self.student`` (in its current weights) on the given problems."""
        return self.student_side.greedy_accuracy(questions, answers)

    # ------------------------------------------------------------------ 3. teacher rewards
    def grounded_rewards(self, datasets, questions: list[str], answers: list[str], base_acc: float) -> dict:
        """SOAR's reward: R_k = mean over r inner trainings on X_k of (accuracy on Q_R - baseline);
        the trainings, their settings (``inner``) and the kept median students are
        :func:`~lit_selfimprove.loops.soar.grounded_rewards`'."""
        snapshot = adapter_state(self.student)  # with LoRA: the adapters only
        r, keep = self.hparams.num_repeats, self.promotion.keep_median_students
        offload = None
        if keep == "disk":  # the last outer step's files are removed
            if getattr(self, "_median_dir", None) is None:  # not prepared by on_fit_start
                self._median_dir = StudentFolder.of_run(
                    self._trainer, self.promotion.median_students_dir
                ).prepare()
            self._median_dir.clear()
            offload = str(self._median_dir)
        pick = self.promotion.median_pick(r)
        self.median_keeper = MedianStudents(r, pick, "all" if keep == "all" else "best", offload)
        return soar_loops.grounded_rewards(
            self.student_side,
            self.inner,
            datasets,
            (questions, answers),
            base_acc,
            snapshot=snapshot,
            ref_model=self.inner_reference(snapshot),
            keeper=self.median_keeper,
            keep_students=bool(keep),
            job_generator=self.job_generator,
            device=self.device,
        )

    def inner_reference(self, snapshot: dict) -> torch.nn.Module | None:
        """The inner trainings' KL reference, the baseline student (``None`` when ``inner.kl_coef`` is
        0): with student LoRA the student with its adapters disabled, with ``memory.ref_quantization``
        a quantized copy, else a frozen copy in ``memory.dtype`` loaded with ``snapshot``."""
        if self.inner.kl_coef <= 0:
            return None
        if is_peft(self.student):  # the baseline: merged, adapters off
            return self._frozen.setdefault("student_ref", AdapterDisabledReference(self.student))
        if self.memory.ref_quantization:
            return self._quantized_student_ref(snapshot)
        if "student_ref" not in self._frozen:
            self._frozen["student_ref"] = frozen_copy(self.student, self.memory.dtype)
        ref = self._frozen_model("student_ref")
        ref.load_state_dict(snapshot)
        return ref

    def _quantized_student_ref(self, snapshot: dict) -> torch.nn.Module:
        """The baseline student quantized (``memory.ref_quantization``) as the inner KL reference.

        bitsandbytes quantizes weights as they load, so the baseline goes through a temporary folder
        (:func:`~lit_selfimprove.modeling.quantized_copy`); that is redone only when the baseline
        changed: after a promotion, or a checkpoint load."""
        key = len(self.promotions)
        if "student_ref" not in self._frozen or getattr(self, "_student_ref_key", None) != key:
            self._frozen.pop("student_ref", None)
            mem = self.memory
            self._frozen["student_ref"] = quantized_copy(
                self.student, mem.ref_quantization, mem.dtype, self.device, state_dict=snapshot
            )
            self._student_ref_key = key
        return self._frozen_model("student_ref")

    def intrinsic_rewards(self, datasets) -> dict:
        """Intrinsic-T: per question of X_k, success rate s of ``intrinsic_samples`` baseline-student
        samples against the teacher's answer; r = 0 if s == 0 else 1 - s; R_k = mean over X_k."""
        return soar_loops.intrinsic_rewards(
            self.student_side, self.inner, datasets, self.hparams.intrinsic_samples, self.job_generator
        )

    # ------------------------------------------------------------------ 4. teacher update
    def update_teacher(self, rollouts: Rollouts, advantages: torch.Tensor) -> dict[str, float]:
        """One teacher step: RLOO policy gradient with per-rollout ``advantages`` + KL to the initial teacher.

        Token-mean aggregation over all completion tokens of all rollouts of all ranks (DDP / FSDP
        average the ranks' gradients, so each rank weighs its tokens by world_size / tokens on all
        ranks); micro-batches are weighted by their share of the tokens, so the gradient does not
        depend on their size.
        """
        opt, sched = self.optimizers(), self.lr_schedulers()
        update = policy_gradient_update(
            self.teacher,
            rollouts,
            advantages,
            opt,
            self.teacher_update.update_config(),
            ref_model=self.ref_teacher if self.teacher_update.kl_coef > 0 else None,
            backward=self.manual_backward,
            clip=lambda norm: self.clip_gradients(
                opt, gradient_clip_val=norm, gradient_clip_algorithm="norm"
            ),
            after_step=sched.step,
        )
        return {k: update[k] for k in ("loss", "kl", "logp")}

    # -------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> None:
        """One outer step: Algorithm 1's steps 1-5."""
        hp = self.hparams
        g, n, rank, step = hp.num_datasets, hp.dataset_size, world()[1], self.global_step
        questions, answers = self._global_q_r(batch)
        # 1. g*n valid pairs from the teacher (each rank samples its share) -> g datasets of n
        local_pairs, rollouts, sampling = self.sample_valid_pairs()
        pairs = [p for part in gather_objects(local_pairs) for p in part]
        datasets = [pairs[k * n : (k + 1) * n] for k in range(g)]
        # 2. the baseline student's greedy accuracy on Q_R
        base_acc = self.greedy_accuracy(questions, answers)
        # 3. a reward R_k per dataset
        if hp.teacher_reward == "grounded":
            out = self.grounded_rewards(datasets, questions, answers, base_acc)
        else:
            out = self.intrinsic_rewards(datasets)
        # 4. teacher update: RLOO over datasets, every rollout of X_k gets A_k (this rank's rows)
        adv = teacher_advantages(torch.tensor(out["rewards"], dtype=torch.float32))
        mine = slice(rank * len(local_pairs), (rank + 1) * len(local_pairs))
        update = self.update_teacher(rollouts, adv.repeat_interleave(n)[mine])
        self.last_outer = OuterStep.from_rewards(step, datasets, out, base_acc, adv.tolist())
        # 5. promotion: the best dataset's median student may become the baseline
        self.promote(self.last_outer)
        self._log_outer(self.last_outer, out["inner_stats"], sampling, update, pairs, len(questions))

    def _global_q_r(self, batch) -> tuple[list[str], list[str]]:
        """Q_R: this rank's batch, or under torch.distributed every rank's (the same on all ranks)."""
        questions, answers = unpack_problems(batch)
        if world()[0] > 1:
            parts = gather_objects((questions, answers))
            questions = [q for qs, _ in parts for q in qs]
            answers = [a for _, ans in parts for a in ans]
        return questions, answers

    # ------------------------------------------------------------------------ 5. promotion
    @property
    def promotes(self) -> bool:
        """Whether outer steps run the promotion (grounded rewards train students; intrinsic do not)."""
        return self.promotion.promote and self.hparams.teacher_reward == "grounded"

    def promote(self, outer: OuterStep) -> None:
        """Algorithm 1, step 5: the promotion rule on R_1..R_g; when it fires, dataset k*'s median
        student is installed in place as the baseline on every rank (broadcast tensor by tensor from
        the rank that trained it) and the promotion is recorded in ``promotions`` (and in ``outer``)."""
        if not self.promotes:
            return
        decision = self.promotion_rule.update([float(r) for r in outer.rewards])
        if world()[0] > 1:  # rank 0's decision for everyone
            decision = broadcast_object(decision, src=0)
        outer.promotion = decision
        if decision.promote:  # in place, tensor by tensor from the rank that trained it (LoRA: adapters)
            owner = outer.median_owner[decision.dataset]
            if not install_student(self.student, self.median_student(decision.dataset), owner):
                raise RuntimeError(
                    "Promotion needs the trained students: use teacher_reward='grounded' and "
                    "promotion.keep_median_students=True (or promotion.promote=False)"
                )
            if is_peft(self.student) and self.memory.merge_promoted_adapter:
                merge_adapters_into_base(self.student)  # base := promoted student; adapters start at 0
            outer.promoted, outer.promotion_index = True, len(self.promotions)
            self.promotions.append(
                {
                    "step": outer.step,
                    "dataset": decision.dataset,
                    "reward": float(outer.rewards[decision.dataset]),
                    "moving_avg": decision.moving_avg,
                }
            )
            rank_zero_info(
                f"Promotion {outer.promotion_index} at outer step {outer.step}: dataset {decision.dataset} "
                f"(R={outer.rewards[decision.dataset]:.4f}, moving avg {decision.moving_avg:.4f} > tau "
                f"{self.promotion_rule.tau}) is the new baseline"
            )
        logs = {"promotion/count": float(len(self.promotions)), "promotion/event": float(decision.promote)}
        if decision.moving_avg is not None:
            logs["promotion/moving_avg"] = decision.moving_avg
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["promotion"] = {**self.promotion_rule.state_dict(), "promotions": self.promotions}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._student_ref_key = None  # a quantized inner reference: rebuilt from the loaded baseline
        state = checkpoint.get("promotion")
        if state is not None:
            self.promotion_rule.load_state_dict(state)
            self.promotions = [dict(p) for p in state["promotions"]]

    def _log_outer(self, outer: OuterStep, inner_stats: dict, sampling: dict, update: dict, pairs, size: int):
        """The step's metrics (teacher, baseline, inner / intrinsic) and samples."""
        hp = self.hparams
        lr = self.lr_schedulers().get_last_lr()[0]
        vendi = float(vendi_score(self.diversity_embedding([q for q, _ in pairs])))
        logs = outer.teacher_logs(sampling, update, lr, vendi)
        prefix = "inner" if hp.teacher_reward == "grounded" else "intrinsic"
        stats = dict(inner_stats)
        self.zero_reward.update(stats.get("reward", stats.get("success_rate", 1.0)) == 0)
        if "reward" in stats:
            stats["mean_reward"] = stats.pop("reward")
        logs.update({f"{prefix}/{k}": v for k, v in stats.items()})
        if (reward_stats := pop_reward_stats(self.reward)) is not None:
            logs["inner/verify_timeouts"] = float(reward_stats.get("timeouts", 0))
        self.log_dict(logs, batch_size=size)
        self.log("R", logs["teacher/reward_mean"], prog_bar=True, logger=False, batch_size=size)
        self.log("valid", sampling["validity"], prog_bar=True, logger=False, batch_size=size)
        write_samples(
            self, hp.log_samples_every, outer.step, "teacher_samples.jsonl", self.last_outer.sample_rows
        )

    def on_train_end(self) -> None:
        if getattr(self, "_median_dir", None) is not None:  # keep_median_students="disk": the files
            self._median_dir.remove()
            self._median_dir = None
        if not self.hparams.save_teacher or self.trainer is None:
            return
        log_dir = self.trainer.log_dir  # a collective: every rank asks
        folder = Path(log_dir or self.trainer.default_root_dir) / "teacher"
        if world()[0] > 1:  # gather the full (maybe sharded) weights on every rank
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(
                self.teacher, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            state = None
        if self.trainer.is_global_zero:
            save_pretrained_merged(self.teacher, folder, state_dict=state)  # LoRA: merged, plain HF
            self.teacher_tokenizer.save_pretrained(folder)
            rank_zero_info(f"TeacherMetaRL: final teacher written to {folder}")

    # ------------------------------------------------------------------------ validation
    def validation_step(self, batch, batch_idx: int) -> None:
        questions, answers = unpack_problems(batch)
        acc = self.greedy_accuracy(questions, answers)
        self.log("val/accuracy", acc, prog_bar=True, batch_size=len(questions), sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        questions, answers = unpack_problems(batch)
        acc = self.greedy_accuracy(questions, answers)
        self.log("test/accuracy", acc, batch_size=len(questions), sync_dist=True)
