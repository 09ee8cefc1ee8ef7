"""TeacherMetaRL: SOAR's outer loop, a teacher that learns to write stepping-stone problems.

One ``training_step`` is one outer step (manual optimization: ``global_step`` counts teacher
optimizer steps, i.e. outer steps; the inner student trainings use plain optimizers and do not
count). Its batch is Q_R, fresh questions of D_train: Q_R's size is the DataModule's
``batch_size`` (SOAR: 64, resampled every outer step, so use a shuffling DataModule).

1. the teacher samples completions in rounds of ``teacher_batch`` until ``g * n`` valid
   ``<question>..</question><answer>\\boxed{..}</answer>`` pairs exist (rejection sampling, at
   most ``max_sampling_rounds`` rounds); in sampling order they form g datasets X_1..X_g of n;
2. greedy accuracy of the baseline student (``self.student``) on Q_R;
3. a reward R_k per dataset:
   * ``grounded`` (SOAR): for each X_k, r times: restore the student in place from the baseline
     snapshot taken at the start of the step, train it with RLVR on X_k for ``inner.steps`` steps
     (fresh AdamW), measure its greedy accuracy on Q_R. R_k = mean over the repeats of
     (accuracy - baseline accuracy);
   * ``intrinsic`` (Intrinsic-T): learnability of X_k for the baseline student (no training);
4. teacher update: A_k = R_k - mean_{j != k} R_j (RLOO over datasets) on every rollout of X_k;
   policy-gradient loss over the whole teacher completions (token mean) + ``kl_coef`` * k3 KL to
   the frozen initial teacher; linear warmup, gradient clipping, one AdamW step;
5. promotion (``promote``, grounded only): the module's ``PromotionRule`` decides; dataset k*'s
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
    check_attn_implementation,
    check_lora,
    check_quantization,
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
    adamw,
    adamw_with_warmup,
    check_optimizer,
    generation_config,
    on_device,
    root_device,
    sampling_generator,
    write_samples,
)
from lit_selfimprove.modules.median_students import StudentFolder, install_student
from lit_selfimprove.modules.soar_outer import InnerConfig, MedianStudents, OuterStep, check_soar_hparams
from lit_selfimprove.modules.student_rlvr import unpack_problems
from lit_selfimprove.prompts import SOAR_STUDENT_PROMPT, SOAR_TEACHER_PROMPT, as_user_turn
from lit_selfimprove.rewards.base import parseable_check, pop_reward_stats
from lit_selfimprove.rl.micro_batch import UpdateConfig
from lit_selfimprove.rl.promotion import PromotionRule
from lit_selfimprove.rl.teacher_rewards import teacher_advantages


class TeacherMetaRL(LightningModule):
    """SOAR: meta-RL of a teacher LM whose reward is the progress of a student trained on its problems.

    Paper names: g = ``num_datasets``, n = ``dataset_size``, r = ``num_repeats``, |Q_R| = the
    DataModule's ``batch_size``. Defaults are the paper's.

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
        teacher_batch: completions sampled per rejection-sampling round (default ``g * n``).
        max_sampling_rounds: rounds before giving up with a ``RuntimeError`` (the paper is silent).
        teacher_max_new_tokens: teacher generation budget.
        teacher_temperature: teacher sampling temperature.
        teacher_top_p: teacher nucleus threshold.
        answer_check: when a boxed answer counts as parseable: ``auto`` (the reward's
            ``parseable(answers) -> [bool]`` if it has one, else ``math_verify``), ``math_verify``
            (``math_verify.parse`` yields a symbolic expression, in this process, length-capped and
            guarded by a timeout, see :func:`lit_selfimprove.loops.teacher_pairs.math_verify_parseable`) or
            ``light`` (structure only: non-empty, balanced braces).
        max_answer_chars: longer boxed answers are invalid.
        inner: the inner trainings' settings group (``inner:`` in YAML,
            :class:`~lit_selfimprove.modules.soar_outer.InnerConfig`): ``steps``, ``batch`` (questions
            of X_k per step, cycling through a fresh shuffle of X_k), ``lr``, ``weight_decay``,
            ``optimizer`` (a fresh one every time: ``adamw``, ``adamw8bit``, ``paged_adamw8bit``) and
            the RL fields of ``RLVRConfig`` (``group_size``, ``max_new_tokens``,
            ``temperature`` (also the intrinsic reward's), ``advantage``, ``kl_coef`` (to the baseline
            student, default 0), ``max_grad_norm``, ``micro_batch_size``, ...).
        eval_max_new_tokens: greedy budget for accuracy on Q_R and validation (default
            ``inner.max_new_tokens``).
        eval_batch_size: prompts per greedy generation call (``None``: all at once).
        intrinsic_samples: student samples per question for the intrinsic reward (paper: 32).
        lr: teacher AdamW learning rate.
        weight_decay: teacher AdamW weight decay.
        warmup_steps: linear warmup of the teacher lr (outer steps).
        optimizer: the teacher's optimizer: ``adamw`` (torch), ``adamw8bit`` (bitsandbytes' 8-bit
            AdamW: optimizer states in 8 bits; CPU or GPU) or ``paged_adamw8bit`` (CUDA only); see
            :func:`~lit_selfimprove.modules._shared.adamw` (the inner students' is ``inner.optimizer``).
        kl_coef: coefficient of the KL to the frozen initial teacher (0: no copy is kept).
        kl_estimator: ``k3`` | ``k1`` | ``k2``.
        max_grad_norm: teacher gradient clipping (``None`` disables).
        teacher_micro_batch_size: teacher rollouts per forward/backward (``None``: all).
        keep_median_students: keep what a promotion can need (CPU state dicts; LoRA students: their
            adapters only): ``true`` keeps one copy, the median-reward student of the best dataset so
            far (the only one a promotion can install), and drops a trained student's copy as soon as
            it cannot be its dataset's median, so the copies do not grow with g * r (the other
            entries of ``last_outer.median_students`` are ``None``); ``"all"`` keeps every dataset's
            median (at most r + g copies per rank); ``"disk"`` keeps what ``true`` keeps as files in
            ``median_students_dir`` (no copy in memory; ``last_outer.median_students`` holds their
            paths, valid until the next outer step); ``false`` none (only with ``promote=False``).
        median_students_dir: the folder of ``keep_median_students: disk`` (one ``rank_<r>`` subfolder
            per rank; default ``<log dir>/median_students``). Checked writable when fit starts, where
            the files a crashed run left are removed; removed when training ends.
        promote: run SOAR's promotion (Algorithm 1, step 5) at the end of every outer step (grounded
            reward only: intrinsic rewards train no students). The rule
            (:class:`~lit_selfimprove.rl.promotion.PromotionRule`) and its state live in the module
            and its checkpoint; the ``Promotion`` callback only writes the PQ file and the students.
        promotion_tau: threshold on the moving average of Rbar = mean_k R_k (SOAR: 0.01).
        promotion_window: outer steps in the moving average (SOAR: 3; a full window is needed).
        reset_after_promotion: clear the reward history after a promotion.
        require_improvement: promote only a student whose dataset beat the baseline (R_k* > 0).
        median: which repeat is "the median-reward student" when r is even: ``lower`` or ``upper``
            (with r = 2: the worse or the better of the two).
        generation: the sampling backend (``GenerationConfig``; YAML ``generation: {backend: vllm}``):
            the built-in sampler (default) or colocated vLLM engines (teacher, working student)
            refreshed from the trained weights before each generation that follows a change.
        dtype: compute dtype of both models (``bfloat16`` on GPUs: FSDP2's MixedPrecisionPolicy for
            the teacher, the Trainer's ``precision: bf16-mixed`` for everything) and storage dtype of
            the frozen references. Teacher and students always keep float32 master weights: an
            AdamW step of 1e-5 mostly rounds away on bfloat16 weights.
        attn_implementation: e.g. ``sdpa`` or ``flash_attention_2``.
        ref_quantization: load the frozen references in ``4bit`` or ``8bit`` (or
            ``BitsAndBytesConfig`` kwargs; bitsandbytes, CPU or GPU): the initial teacher (KL, loaded
            from ``teacher`` again) and the inner trainings' baseline student (``inner.kl_coef > 0``:
            the baseline written to a temporary folder and loaded back quantized, again after each
            promotion). ``None``: unquantized copies in ``dtype``.
        lora: ``peft.LoraConfig`` kwargs (e.g. ``{r: 8, lora_alpha: 16, target_modules: all-linear}``)
            for the teacher: only its adapters train, and its KL reference is the teacher with its
            adapters disabled (no second copy; not with ``ref_quantization``).
        student_lora: ``peft.LoraConfig`` kwargs for the student: the inner trainings train, snapshot
            and restore only its adapters (a fresh optimizer over them each time), the kept median
            students are adapters, and the inner KL reference (``inner.kl_coef > 0``) is the student
            with its adapters disabled.
        merge_promoted_adapter: with ``student_lora``, a promotion folds the promoted adapters into
            the baseline's base weights and zeroes them (the next inner trainings start new adapters
            from the promoted student); ``false`` keeps the promoted adapters as the baseline's
            (the base stays the initial student). The ``Promotion`` callback writes the promoted
            student merged, as a plain Hugging Face folder, either way.
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
        teacher_batch: int | None = None,
        max_sampling_rounds: int = 16,
        teacher_max_new_tokens: int = 512,
        teacher_temperature: float = 1.0,
        teacher_top_p: float = 1.0,
        answer_check: Literal["auto", "math_verify", "light"] = "auto",
        max_answer_chars: int = 200,
        inner: InnerConfig | None = None,
        eval_max_new_tokens: int | None = None,
        eval_batch_size: int | None = None,
        intrinsic_samples: int = 32,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        optimizer: str = "adamw",
        kl_coef: float = 0.001,
        kl_estimator: Literal["k3", "k1", "k2"] = "k3",
        max_grad_norm: float | None = 1.0,
        teacher_micro_batch_size: int | None = None,
        keep_median_students: bool | Literal["all", "disk"] = True,
        median_students_dir: str | None = None,
        median: Literal["lower", "upper"] = "lower",
        promote: bool = True,
        promotion_tau: float = 0.01,
        promotion_window: int = 3,
        reset_after_promotion: bool = True,
        require_improvement: bool = True,
        generation: GenerationConfig | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        ref_quantization: str | dict | None = None,
        lora: dict | None = None,
        student_lora: dict | None = None,
        merge_promoted_adapter: bool = True,
        log_samples_every: int = 10,
        save_teacher: bool = True,
        diversity_embedding: Callable | None = None,
        warn_zero_reward_steps: int | None = 20,
    ):
        super().__init__()
        check_attn_implementation(attn_implementation)  # at start-up, not when the model loads
        check_optimizer(optimizer)
        check_quantization(ref_quantization)
        # a dict: from hparams.yaml
        inner = InnerConfig(**inner) if isinstance(inner, dict) else inner or InnerConfig()
        check_lora(lora, ref_quantization if kl_coef > 0 else None, "lora", model=teacher)
        check_lora(student_lora, ref_quantization if inner.kl_coef > 0 else None, "student_lora", student)
        if student_lora and inner.kl_coef > 0 and not merge_promoted_adapter:
            raise ValueError(
                "inner.kl_coef > 0 with student_lora needs merge_promoted_adapter=True: the inner KL "
                "reference is the student with its adapters disabled, the baseline only when promoted "
                "adapters are merged into the base"
            )
        self.generation = generation_config(generation)
        self.save_hyperparameters(ignore=["reward", "diversity_embedding"])
        check_soar_hparams(self.hparams, inner)
        self.hparams["inner"] = dataclasses.asdict(inner)  # plain data in checkpoints (weights_only loads)
        self.hparams["generation"] = dataclasses.asdict(self.generation)
        # the Vendi score of each step's questions (diversity; a collapsing teacher shows here)
        self.diversity_embedding = diversity_embedding or HashingNgramEmbedding()
        self.automatic_optimization = False
        self.inner_rl = inner
        self.promotion_rule = PromotionRule(
            promotion_tau, promotion_window, reset_after_promotion, require_improvement
        )
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
        self.zero_reward = ZeroRewardWatch("TeacherMetaRL (inner student reward)", warn_zero_reward_steps)

    # ----------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        if self.teacher is not None:
            return
        hp = self.hparams
        kwargs = {"dtype": hp.dtype, "attn_implementation": hp.attn_implementation}
        # FSDP2 (ModelParallelStrategy) shards the teacher and its reference; students stay whole
        self.teacher, ref = load_trained_model(
            hp.teacher,
            reference=hp.kl_coef > 0,
            lora=hp.get("lora"),  # with LoRA the KL reference is the teacher with its adapters disabled
            device_mesh=getattr(self, "device_mesh", None),
            ref_quantization=hp.get("ref_quantization"),
            ref_device=root_device(self),
            **kwargs,
        )
        self.student, _ = load_trained_model(hp.student, lora=hp.get("student_lora"), **kwargs)
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
        budget = self.hparams.eval_max_new_tokens or self.inner_rl.max_new_tokens  # greedy_accuracy's
        check_datamodule_prompts(
            self.trainer, self.student_tokenizer, self.format_student_prompt, self.student, budget
        )
        if self.hparams.keep_median_students == "disk" and self.hparams.teacher_reward == "grounded":
            folder = StudentFolder.of_run(self._trainer, self.hparams.get("median_students_dir"))
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
        """The frozen initial teacher (``None`` when ``kl_coef`` is 0)."""
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
        hp = self.hparams
        return adamw_with_warmup(
            self.teacher.parameters(),
            hp.lr,
            hp.weight_decay,
            hp.warmup_steps,
            optimizer=hp.get("optimizer", "adamw"),
        )

    # ---------------------------------------------------------------------------- prompts
    def teacher_prompt_text(self) -> str:
        prefill = self.hparams.get("teacher_prefill", "")
        return (
            as_user_turn(self.teacher_tokenizer, self.hparams.teacher_prompt, self.hparams.use_chat_template)
            + prefill
        )

    def format_student_prompt(self, question: str) -> str:
        text = self.hparams.prompt_template.format(question=question)
        return as_user_turn(self.student_tokenizer, text, self.hparams.use_chat_template)

    # ------------------------------------------------------------- 1. teacher sampling
    def answers_ok(self) -> Callable[[list[str]], list[bool]] | None:
        """The parseability check of boxed answers chosen by ``answer_check`` (``None``: structure only)."""
        mode = self.hparams.answer_check
        if mode == "light":
            return None
        if mode == "auto" and (check := parseable_check(self.reward)) is not None:
            return check
        return functools.partial(math_verify_parseable, timeout=2)

    def sample_teacher_round(self, num_samples: int) -> Rollouts:
        """One round of ``num_samples`` teacher completions (override for another sampling backend)."""
        hp = self.hparams
        ro = generate(
            self.teacher,
            self.teacher_tokenizer,
            [self.teacher_prompt_text()],
            num_samples=num_samples,
            max_new_tokens=hp.teacher_max_new_tokens,
            temperature=hp.teacher_temperature,
            top_p=hp.teacher_top_p,
            generator=self.sampling_generator(),
        )
        prefill = hp.get("teacher_prefill", "")  # part of the prompt; the parser reads it with the text
        return dataclasses.replace(ro, texts=[prefill + t for t in ro.texts]) if prefill else ro

    def sample_valid_pairs(self) -> tuple[list[tuple[str, str]], Rollouts, dict[str, float]]:
        """Rejection sampling: ``(pairs, rollouts, stats)`` with exactly ``g * n`` valid pairs, and
        the teacher rollouts they came from (row i wrote pair i). Raises ``RuntimeError`` (naming the
        validity rate) when ``max_sampling_rounds`` rounds do not give enough valid pairs."""
        hp = self.hparams
        return soar_loops.sample_valid_pairs(
            self.sample_teacher_round,
            hp.num_datasets * hp.dataset_size,
            hp.teacher_batch,
            hp.max_sampling_rounds,
            self.answers_ok(),
            hp.max_answer_chars,
            self.teacher_tokenizer.pad_token_id,
            self.device,
        )

    # ------------------------------------------------------------------ 2. student accuracy
    def greedy_accuracy(self, questions: list[str], answers: list[str]) -> float:
        """Greedy accuracy of ``self.student`` (in its current weights) on the given problems."""
        hp = self.hparams
        return soar_loops.greedy_accuracy(
            self.student,
            self.student_tokenizer,
            self.reward,
            [self.format_student_prompt(q) for q in questions],
            answers,
            hp.eval_batch_size,
            hp.eval_max_new_tokens or self.inner_rl.max_new_tokens,
        )

    # ------------------------------------------------------------------ 3. teacher rewards
    def train_inner_student(
        self,
        questions: list[str],
        answers: list[str],
        ref_model: torch.nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """RLVR of ``self.student`` in place on one dataset: ``inner.steps`` steps, a fresh AdamW.

        Batches of ``inner.batch`` questions walk through a shuffle of the dataset, reshuffled when
        it is used up. Returns the mean of ``rlvr_step``'s stats.
        """
        cfg = self.inner_rl
        return soar_loops.train_inner(
            self.student,
            self.student_tokenizer,
            self.reward,
            [self.format_student_prompt(q) for q in questions],
            answers,
            cfg,
            cfg.steps,
            cfg.batch,
            adamw(self.student.parameters(), cfg.lr, cfg.weight_decay, optimizer=cfg.optimizer),
            ref_model,
            generator or self.sampling_generator(),
        )

    def grounded_rewards(self, datasets, questions: list[str], answers: list[str], base_acc: float) -> dict:
        """SOAR's reward: R_k = mean over r inner trainings on X_k of (accuracy on Q_R - baseline)."""
        hp = self.hparams
        snapshot = adapter_state(self.student)  # with LoRA: the adapters only
        ref = None
        if self.inner_rl.kl_coef > 0 and is_peft(self.student):  # the baseline: merged, adapters off
            ref = self._frozen.setdefault("student_ref", AdapterDisabledReference(self.student))
        elif self.inner_rl.kl_coef > 0 and hp.get("ref_quantization"):
            ref = self._quantized_student_ref(snapshot)
        elif self.inner_rl.kl_coef > 0:  # the baseline student as the inner KL reference
            if "student_ref" not in self._frozen:
                self._frozen["student_ref"] = frozen_copy(self.student, hp.dtype)
            ref = self._frozen_model("student_ref")
            ref.load_state_dict(snapshot)
        r = hp.num_repeats
        pick = (r - 1) // 2 if hp.median == "lower" else r // 2  # the two coincide when r is odd
        keep = "all" if hp.keep_median_students == "all" else "best"
        offload = None
        if hp.keep_median_students == "disk":  # the last outer step's files are removed
            if getattr(self, "_median_dir", None) is None:  # not prepared by on_fit_start
                self._median_dir = StudentFolder.of_run(
                    self._trainer, hp.get("median_students_dir")
                ).prepare()
            self._median_dir.clear()
            offload = str(self._median_dir)
        self.median_keeper = MedianStudents(r, pick, keep, offload)
        return soar_loops.grounded_rewards(
            self.student,
            snapshot,
            datasets,
            r,
            lambda data, j: self.train_inner_student(
                [q for q, _ in data], [a for _, a in data], ref, self.job_generator(j)
            ),
            lambda: self.greedy_accuracy(questions, answers),
            base_acc,
            self.median_keeper,
            hp.keep_median_students,
            self.device,
        )

    def _quantized_student_ref(self, snapshot: dict) -> torch.nn.Module:
        """The baseline student quantized (``ref_quantization``) as the inner KL reference.

        bitsandbytes quantizes weights as they load, so the baseline goes through a temporary folder
        (:func:`~lit_selfimprove.modeling.quantized_copy`); that is redone only when the baseline
        changed: after a promotion, or a checkpoint load."""
        key = len(self.promotions)
        if "student_ref" not in self._frozen or getattr(self, "_student_ref_key", None) != key:
            self._frozen.pop("student_ref", None)
            hp = self.hparams
            self._frozen["student_ref"] = quantized_copy(
                self.student, hp.ref_quantization, hp.dtype, self.device, state_dict=snapshot
            )
            self._student_ref_key = key
        return self._frozen_model("student_ref")

    def intrinsic_rewards(self, datasets) -> dict:
        """Intrinsic-T: per question of X_k, success rate s of ``intrinsic_samples`` baseline-student
        samples against the teacher's answer; r = 0 if s == 0 else 1 - s; R_k = mean over X_k."""
        cfg = self.inner_rl
        return soar_loops.intrinsic_rewards(
            self.student,
            self.student_tokenizer,
            self.reward,
            self.format_student_prompt,
            datasets,
            self.hparams.intrinsic_samples,
            cfg.batch,
            cfg.max_new_tokens,
            cfg.temperature,
            self.job_generator,
        )

    # ------------------------------------------------------------------ 4. teacher update
    def teacher_update(self, rollouts: Rollouts, advantages: torch.Tensor) -> dict[str, float]:
        """One teacher step: RLOO policy gradient with per-rollout ``advantages`` + KL to the initial teacher.

        Token-mean aggregation over all completion tokens of all rollouts of all ranks (DDP / FSDP
        average the ranks' gradients, so each rank weighs its tokens by world_size / tokens on all
        ranks); micro-batches are weighted by their share of the tokens, so the gradient does not
        depend on their size.
        """
        hp = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()
        cfg = UpdateConfig(
            loss_aggregation="token",
            kl_coef=hp.kl_coef,
            kl_estimator=hp.kl_estimator,
            micro_batch_size=hp.teacher_micro_batch_size,
            max_grad_norm=hp.max_grad_norm,
            all_ranks=True,
        )
        update = policy_gradient_update(
            self.teacher,
            rollouts,
            advantages,
            opt,
            cfg,
            ref_model=self.ref_teacher if hp.kl_coef > 0 else None,
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
        update = self.teacher_update(rollouts, adv.repeat_interleave(n)[mine])
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
        return self.hparams.promote and self.hparams.teacher_reward == "grounded"

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
                    "keep_median_students=True (or promote=False)"
                )
            if is_peft(self.student) and self.hparams.get("merge_promoted_adapter", True):
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
