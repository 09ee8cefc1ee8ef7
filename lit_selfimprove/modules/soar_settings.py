"""TeacherMetaRL's settings groups, one owner each (``inner:``, ``teacher_sampling:``, ``teacher_update:``,
``promotion:``, ``memory:`` in YAML), and the checks that span groups.

Each group is a dataclass with its fields documented where they are declared and checked in
``__post_init__``, so a bad value fails when the config is parsed, naming ``group.field``. A dict (from
YAML, ``hparams.yaml`` or a checkpoint's hyper-parameters) becomes the dataclass (:func:`as_group`);
the module stores ``dataclasses.asdict`` of each group in its hyper-parameters (checkpoints load with
``weights_only``). Defaults are SOAR's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from lit_selfimprove.modules._shared import adamw, check_at_least_one, check_optimizer
from lit_selfimprove.prompts import check_student_prompt
from lit_selfimprove.rl.losses import kl_penalty
from lit_selfimprove.rl.micro_batch import UpdateConfig
from lit_selfimprove.rl.promotion import PromotionRule
from lit_selfimprove.rl.rlvr_config import RLVRConfig

__all__ = [
    "InnerConfig",
    "MemoryConfig",
    "PromotionConfig",
    "TeacherSamplingConfig",
    "TeacherUpdateConfig",
    "check_soar_settings",
]

TEACHER_REWARDS = ("grounded", "intrinsic")
ANSWER_CHECKS = ("auto", "math_verify", "light")
KEEP_MEDIAN_STUDENTS = (True, False, "all", "disk")


@dataclass
class InnerConfig(RLVRConfig):
    """The inner trainings (``inner:``): each trains the baseline student with RLVR on one dataset X_k.

    The RL fields are :class:`~lit_selfimprove.rl.rlvr_config.RLVRConfig`'s (``group_size``,
    ``max_new_tokens``, ``temperature`` (also the intrinsic reward's), ``advantage``, ``max_grad_norm``,
    ``micro_batch_size``, ...). ``kl_coef`` defaults to 0 here: the paper mentions a small KL for its
    student RLOO, but inner trainings are 10 steps from the baseline and thrown away, so a reference copy
    buys nothing."""

    # KL to the baseline student (its frozen copy, or with student LoRA the student with adapters off)
    kl_coef: float = 0.0
    # the students are unsharded and each rank trains different ones: no lockstep generation
    sync_ranks: bool | None = False
    # RLVR steps per inner training
    steps: int = 10
    # questions of X_k per step, walking through a fresh shuffle of X_k (reshuffled when used up)
    batch: int = 8
    # learning rate of the fresh optimizer of each inner training
    lr: float = 1e-5
    # its weight decay
    weight_decay: float = 0.0
    # ``adamw`` (torch), ``adamw8bit`` or ``paged_adamw8bit`` (bitsandbytes; paged: CUDA only), see
    # :func:`~lit_selfimprove.modules._shared.adamw`
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optimizer(self.optimizer)
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"inner.{name} must be >= 1, got {getattr(self, name)}")
        check_at_least_one(inner_micro_batch_size=self.micro_batch_size)

    def new_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The fresh optimizer of one inner training, over the ``params`` that require gradients (with
        student LoRA: the adapters)."""
        return adamw(params, self.lr, self.weight_decay, optimizer=self.optimizer)


@dataclass
class TeacherSamplingConfig:
    """How the teacher's (question, answer) pairs are sampled (``teacher_sampling:``, Algorithm 1 step 1):
    rounds of ``batch`` completions until ``g * n`` valid pairs exist (rejection sampling)."""

    # completions sampled per rejection-sampling round (``None``: g * n)
    batch: int | None = None
    # rounds before giving up with a ``RuntimeError`` naming the validity rate (the paper is silent)
    max_rounds: int = 16
    # the teacher's generation budget per completion
    max_new_tokens: int = 512
    # sampling temperature
    temperature: float = 1.0
    # nucleus threshold
    top_p: float = 1.0
    # when a boxed answer counts as parseable: ``auto`` (the reward's ``parseable(answers) -> [bool]``
    # if it has one, else ``math_verify``), ``math_verify`` (``math_verify.parse`` yields an expression;
    # length-capped, timeout-guarded, see :func:`~lit_selfimprove.loops.teacher_pairs.math_verify_parseable`)
    # or ``light`` (structure only: non-empty, balanced braces)
    answer_check: Literal["auto", "math_verify", "light"] = "auto"
    # longer boxed answers make the pair invalid
    max_answer_chars: int = 200

    def __post_init__(self) -> None:
        if self.answer_check not in ANSWER_CHECKS:
            raise ValueError(
                f"teacher_sampling.answer_check must be one of {ANSWER_CHECKS}, got {self.answer_check!r}"
            )
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"teacher_sampling.batch must be >= 1 or None, got {self.batch}")
        for name in ("max_rounds", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"teacher_sampling.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TeacherUpdateConfig:
    """The teacher's update (``teacher_update:``, Algorithm 1 step 4): RLOO policy gradient over the whole
    teacher completions (token mean), plus ``kl_coef`` times a KL to the frozen initial teacher, one
    optimizer step per outer step after a linear warmup."""

    # learning rate
    lr: float = 1e-5
    # weight decay
    weight_decay: float = 0.0
    # linear warmup of the learning rate, in outer steps
    warmup_steps: int = 20
    # ``adamw`` (torch), ``adamw8bit`` (bitsandbytes' 8-bit states; CPU or GPU) or ``paged_adamw8bit``
    # (CUDA only), see :func:`~lit_selfimprove.modules._shared.adamw`
    optimizer: str = "adamw"
    # coefficient of the KL to the frozen initial teacher (0: no copy is kept)
    kl_coef: float = 0.001
    # the KL estimator
    kl_estimator: Literal["k3", "k1", "k2"] = "k3"
    # gradient clipping (``None`` disables)
    max_grad_norm: float | None = 1.0
    # teacher rollouts per forward/backward (``None``: all at once)
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        if self.kl_coef < 0:
            raise ValueError(f"teacher_update.kl_coef must be >= 0, got {self.kl_coef}")
        kl_penalty(torch.zeros(1), torch.zeros(1), self.kl_estimator)  # validates the name
        check_at_least_one(teacher_micro_batch_size=self.micro_batch_size)

    def update_config(self) -> UpdateConfig:
        """The policy-gradient update's settings: token-mean aggregation over every rank's rollouts."""
        return UpdateConfig(
            loss_aggregation="token",
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            micro_batch_size=self.micro_batch_size,
            max_grad_norm=self.max_grad_norm,
            all_ranks=True,
        )


@dataclass
class PromotionConfig:
    """SOAR's promotion (``promotion:``, Algorithm 1 step 5) and the trained students it needs. The
    module owns the rule (:class:`~lit_selfimprove.rl.promotion.PromotionRule`) and its checkpointed
    state; the ``Promotion`` callback only writes the PQ file and the promoted students."""

    # run the promotion at the end of every outer step (grounded reward only: intrinsic trains no students)
    promote: bool = True
    # threshold on the moving average of Rbar = mean_k R_k (SOAR: 0.01)
    tau: float = 0.01
    # outer steps in the moving average (SOAR: 3); a full window is needed
    window: int = 3
    # clear the reward history after a promotion (else the old baseline's rewards promote again)
    reset_after_promotion: bool = True
    # promote only a student whose dataset beat the baseline (R_k* > 0)
    require_improvement: bool = True
    # which repeat is "the median-reward student" when r is even: ``lower`` or ``upper`` (with r = 2:
    # the worse or the better of the two)
    median: Literal["lower", "upper"] = "lower"
    # what a promotion can need (CPU state dicts; LoRA students: adapters only): ``true`` one copy, the
    # median student of the best dataset so far (a copy is dropped once it cannot be its dataset's
    # median, so copies do not grow with g * r; other ``last_outer.median_students`` entries are
    # ``None``); ``"all"`` every dataset's median (at most r + g copies per rank); ``"disk"`` what
    # ``true`` keeps, as files in ``median_students_dir`` (``last_outer.median_students`` holds their
    # paths, valid until the next outer step); ``false`` none (only without promotions)
    keep_median_students: bool | Literal["all", "disk"] = True
    # the folder of ``keep_median_students: disk``, one ``rank_<r>`` subfolder per rank (default
    # ``<log dir>/median_students``); checked writable when fit starts, where a crashed run's files are
    # removed; removed when training ends
    median_students_dir: str | None = None

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"promotion.window must be >= 1, got {self.window}")
        if self.median not in ("lower", "upper"):
            raise ValueError(f"promotion.median must be 'lower' or 'upper', got {self.median!r}")
        if self.keep_median_students not in KEEP_MEDIAN_STUDENTS:
            raise ValueError(
                "promotion.keep_median_students must be true, false, 'all' or 'disk', "
                f"got {self.keep_median_students!r}"
            )

    def rule(self) -> PromotionRule:
        """A fresh promotion rule with these settings (its history empty)."""
        return PromotionRule(self.tau, self.window, self.reset_after_promotion, self.require_improvement)

    def median_pick(self, repeats: int) -> int:
        """The median repeat's rank among ``repeats`` sorted deltas (lower and upper coincide when odd)."""
        return (repeats - 1) // 2 if self.median == "lower" else repeats // 2


@dataclass
class MemoryConfig:
    """Precision, quantized references and LoRA of both models (``memory:``)."""

    # compute dtype of both models (``bfloat16`` on GPUs: FSDP2's MixedPrecisionPolicy for the teacher,
    # the Trainer's ``precision: bf16-mixed`` for everything) and storage dtype of the frozen references.
    # Trained weights stay float32 masters: an AdamW step of 1e-5 mostly rounds away on bfloat16 weights
    dtype: str = "float32"
    # e.g. ``sdpa`` or ``flash_attention_2`` (``None``: transformers' default)
    attn_implementation: str | None = None
    # load the frozen references in ``4bit`` or ``8bit`` (or ``BitsAndBytesConfig`` kwargs; bitsandbytes,
    # CPU or GPU): the initial teacher (KL, loaded from ``teacher`` again) and the inner trainings'
    # baseline student (``inner.kl_coef > 0``: written to a temporary folder and loaded back quantized,
    # again after each promotion). ``None``: unquantized copies in ``dtype``
    ref_quantization: str | dict | None = None
    # ``peft.LoraConfig`` kwargs (e.g. ``{r: 8, lora_alpha: 16, target_modules: all-linear}``) for the
    # teacher: only its adapters train, its KL reference is the teacher with adapters disabled (no copy)
    lora: dict | None = None
    # ``peft.LoraConfig`` kwargs for the student: inner trainings train, snapshot and restore only its
    # adapters (a fresh optimizer over them each time), the kept median students are adapters, and the
    # inner KL reference is the student with its adapters disabled
    student_lora: dict | None = None
    # with ``student_lora``, a promotion folds the promoted adapters into the baseline's base weights and
    # zeroes them; ``false`` keeps them as the baseline's adapters (the base stays the initial student).
    # The ``Promotion`` callback writes the promoted student merged (a plain Hugging Face folder) either way
    merge_promoted_adapter: bool = True

    def __post_init__(self) -> None:
        from lit_selfimprove.modeling import check_attn_implementation, check_quantization

        check_attn_implementation(self.attn_implementation)  # at start-up, not when the model loads
        check_quantization(self.ref_quantization)


def check_soar_settings(
    hp, inner: InnerConfig, update: TeacherUpdateConfig, promotion: PromotionConfig, memory: MemoryConfig
) -> None:
    """``ValueError`` for TeacherMetaRL's invalid arguments that no single group can check (``hp``: its
    hyper-parameters)."""
    from lit_selfimprove.modeling import check_lora

    check_student_prompt(hp.prompt_template)  # '{question}' and no single braces (\\boxed{})
    if hp.teacher_reward not in TEACHER_REWARDS:
        raise ValueError(f"teacher_reward must be one of {TEACHER_REWARDS}, got {hp.teacher_reward!r}")
    if hp.num_datasets < 2:
        raise ValueError(f"num_datasets must be >= 2 for RLOO over datasets, got {hp.num_datasets}")
    check_at_least_one(
        dataset_size=hp.dataset_size,
        num_repeats=hp.num_repeats,
        intrinsic_samples=hp.intrinsic_samples,
        eval_max_new_tokens=hp.eval_max_new_tokens,
        eval_batch_size=hp.eval_batch_size,
    )
    if promotion.promote and hp.teacher_reward == "grounded" and promotion.keep_median_students is False:
        raise ValueError(
            "promotion.promote=True installs a kept trained student as the new baseline, but "
            "promotion.keep_median_students=False keeps none: the first promotion would fail. Set "
            "keep_median_students to true, 'all' or 'disk', or promote to false"
        )
    teacher_ref = memory.ref_quantization if update.kl_coef > 0 else None
    check_lora(memory.lora, teacher_ref, "memory.lora", model=hp.teacher)
    student_ref = memory.ref_quantization if inner.kl_coef > 0 else None
    check_lora(memory.student_lora, student_ref, "memory.student_lora", hp.student)
    if memory.student_lora and inner.kl_coef > 0 and not memory.merge_promoted_adapter:
        raise ValueError(
            "inner.kl_coef > 0 with memory.student_lora needs memory.merge_promoted_adapter=True: the inner "
            "KL reference is the student with its adapters disabled, the baseline only when promoted "
            "adapters are merged into the base"
        )
