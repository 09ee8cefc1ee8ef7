"""SOAR's typed pieces: the inner-training settings group, one outer step's result, the bounded
keeper of each dataset's median-reward trained student, and the check of TeacherMetaRL's arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lit_selfimprove.modules._shared import check_at_least_one
from lit_selfimprove.rl.losses import kl_penalty
from lit_selfimprove.rl.promotion import PromotionDecision
from lit_selfimprove.rl.rlvr_step import RLVRConfig

TEACHER_REWARDS = ("grounded", "intrinsic")
ANSWER_CHECKS = ("auto", "math_verify", "light")


@dataclass
class InnerConfig(RLVRConfig):
    """The inner trainings' settings (``inner:`` in YAML): the RL fields of
    :class:`~lit_selfimprove.rl.rlvr_step.RLVRConfig` plus ``steps`` (RLVR steps per inner training),
    ``batch`` (questions of X_k per step), ``lr`` and ``weight_decay`` (a fresh AdamW each time).

    Defaults are SOAR's; ``kl_coef`` defaults to 0 here: the paper mentions a small KL for its student
    RLOO, but inner trainings are 10 steps from the baseline and thrown away, so a reference copy buys
    nothing. ``sync_ranks`` is off: the students are unsharded and each rank trains different ones."""

    kl_coef: float = 0.0
    sync_ranks: bool | None = False
    steps: int = 10
    batch: int = 8
    lr: float = 1e-5
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"inner.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class OuterStep:
    """The result of one outer step (Algorithm 1), as :meth:`TeacherMetaRL.training_step` leaves it in
    ``last_outer``.

    ``rewards`` are R_k, ``per_repeat`` the r deltas per dataset, ``median_students[k]`` dataset k's
    median-reward trained student (CPU state dict) on the rank that trained it (``median_owner[k]``;
    ``None`` elsewhere, for intrinsic rewards or without ``keep_median_students``), ``promotion`` the
    promotion rule's decision (``None`` when the module does not promote) and ``promoted`` whether the
    median student of ``promotion.dataset`` is now the baseline (then ``promotion_index`` is its
    0-based index). Item access (``outer["rewards"]``) is kept for code written against the old dict.
    """

    step: int
    datasets: list[list[dict[str, str]]]
    rewards: list[float]
    per_repeat: list[list[float]]
    median_students: list[dict | None]
    median_owner: list[int]
    baseline_accuracy: float
    advantages: list[float]
    success_rates: list[list[float]] | None = None
    promotion: PromotionDecision | None = None
    promoted: bool = False
    promotion_index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    @classmethod
    def from_rewards(
        cls, step: int, datasets, out: dict, base_acc: float, advantages: list[float]
    ) -> OuterStep:
        """The step's result from its (question, answer) datasets and a reward computation's ``out``."""
        return cls(
            step=step,
            datasets=[[{"question": q, "answer": a} for q, a in data] for data in datasets],
            rewards=out["rewards"],
            per_repeat=out["per_repeat"],
            median_students=out["median_students"],
            median_owner=out.get("median_owner", [0] * len(datasets)),
            baseline_accuracy=base_acc,
            advantages=advantages,
            success_rates=out.get("success_rates"),
        )

    def teacher_logs(self, sampling: dict, update: dict, lr: float, vendi: float) -> dict[str, float]:
        """The step's teacher / baseline metrics: rewards, sampling stats, the update's loss, kl, logp."""
        rewards = torch.tensor(self.rewards, dtype=torch.float32)
        return {
            "teacher/reward_mean": float(rewards.mean()),
            "teacher/reward_std": float(rewards.std()),
            **{f"teacher/reward_{k}": float(r) for k, r in enumerate(self.rewards)},
            **{f"teacher/{k}": v for k, v in sampling.items()},
            "teacher/loss": update["loss"],
            "teacher/kl": update["kl"],
            "teacher/logp": update["logp"],
            "teacher/lr": lr,
            "baseline/accuracy": self.baseline_accuracy,
            "teacher/vendi": vendi,
        }

    def sample_rows(self) -> list[dict]:
        """The step's datasets, one row per pair, with their dataset's reward."""
        return [
            {"step": self.step, "dataset": k, "reward": self.rewards[k], **pair}
            for k, data in enumerate(self.datasets)
            for pair in data
        ]


class MedianStudents:
    """Per dataset, the CPU copies of trained students that can still be its median.

    A dataset's copies are kept only until its r repeats are all measured (:meth:`settle`); then the
    median's copy stays (on its owner rank) and the rest are dropped, so at most r + g copies are alive
    on a rank at once instead of g * r. ``peak`` counts the most copies alive at once."""

    def __init__(self, repeats: int, pick: int):
        self.repeats, self.pick = repeats, pick
        self.states: dict[int, dict] = {}
        self.peak = 0

    def offer(self, job: int, model: torch.nn.Module) -> None:
        self.states[job] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.peak = max(self.peak, len(self.states))

    def settle(self, dataset: int, deltas: list[float]) -> int:
        """Keep dataset ``dataset``'s median-reward copy (if this rank has it), drop its others;
        returns the median's job index."""
        r = self.repeats
        median = dataset * r + sorted(range(r), key=deltas.__getitem__)[self.pick]
        for j in range(dataset * r, (dataset + 1) * r):
            if j != median:
                self.states.pop(j, None)
        return median


def check_soar_hparams(hp, inner: InnerConfig) -> None:
    """``ValueError`` for TeacherMetaRL's invalid arguments (``hp``: its hyper-parameters)."""
    if "{question}" not in hp.prompt_template:
        raise ValueError("prompt_template must contain a '{question}' field")
    if hp.teacher_reward not in TEACHER_REWARDS:
        raise ValueError(f"teacher_reward must be one of {TEACHER_REWARDS}, got {hp.teacher_reward!r}")
    if hp.answer_check not in ANSWER_CHECKS:
        raise ValueError(f"answer_check must be one of {ANSWER_CHECKS}, got {hp.answer_check!r}")
    if hp.num_datasets < 2:
        raise ValueError(f"num_datasets must be >= 2 for RLOO over datasets, got {hp.num_datasets}")
    check_at_least_one(
        dataset_size=hp.dataset_size,
        num_repeats=hp.num_repeats,
        max_sampling_rounds=hp.max_sampling_rounds,
        intrinsic_samples=hp.intrinsic_samples,
        teacher_max_new_tokens=hp.teacher_max_new_tokens,
        eval_max_new_tokens=hp.eval_max_new_tokens,
        eval_batch_size=hp.eval_batch_size,
        inner_micro_batch_size=inner.micro_batch_size,
        teacher_micro_batch_size=hp.teacher_micro_batch_size,
    )
    if hp.teacher_batch is not None and hp.teacher_batch < 1:
        raise ValueError(f"teacher_batch must be >= 1 or None, got {hp.teacher_batch}")
    if hp.median not in ("lower", "upper"):
        raise ValueError(f"median must be 'lower' or 'upper', got {hp.median!r}")
    if hp.kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {hp.kl_coef}")
    kl_penalty(torch.zeros(1), torch.zeros(1), hp.kl_estimator)  # validates the name
