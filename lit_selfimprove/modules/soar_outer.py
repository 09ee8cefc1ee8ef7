"""SOAR's typed pieces: the inner-training settings group, one outer step's result, and the
bounded keeper of each dataset's median-reward trained student."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lit_selfimprove.rl.promotion import PromotionDecision
from lit_selfimprove.rl.rlvr_step import RLVRConfig


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
