"""SOAR's typed pieces: one outer step's result and the bounded keeper of each dataset's median-reward
trained student (the settings groups are in :mod:`lit_selfimprove.modules.soar_settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lit_selfimprove.modules.median_students import save_student
from lit_selfimprove.rl.promotion import PromotionDecision


@dataclass
class OuterStep:
    """The result of one outer step (Algorithm 1), as :meth:`TeacherMetaRL.training_step` leaves it in
    ``last_outer``.

    ``rewards`` are R_k, ``per_repeat`` the r deltas per dataset, ``median_students[k]`` dataset k's
    median-reward trained student (CPU state dict) on the rank that trained it (``median_owner[k]``;
    ``None`` elsewhere, for intrinsic rewards or without ``keep_median_students``), ``promotion`` the
    promotion rule's decision (``None`` when the module does not promote) and ``promoted`` whether the
    median student of ``promotion.dataset`` is now the baseline (then ``promotion_index`` is its
    0-based index).
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
    """Per dataset, the CPU copies of trained students that a promotion can still need (a peft
    student: its adapters only, see :func:`~lit_selfimprove.modeling.adapter_state`).

    ``keep="all"``: a dataset's copies are kept until its r repeats are all measured (:meth:`settle`),
    then only the median's stays (on its owner rank): at most r + g copies on a rank at once.
    ``keep="best"``: besides, only the median of the best dataset so far is kept (a promotion installs
    the median student of k* = argmax_k R_k, the first of equals), and a student offered with its
    reward delta is not copied, or its copy dropped, as soon as it cannot be its dataset's median
    (its rank among the repeats measured here is already past the median's, counting the repeats not
    measured here as unknown); the copies stay bounded whatever g * r. ``offload_dir``: the copies are
    files there (``torch.save``; ``states`` maps jobs to their paths, deleted when dropped), no model
    copy stays in memory. ``peak`` counts the most copies alive at once."""

    def __init__(self, repeats: int, pick: int, keep: str = "all", offload_dir: str | None = None):
        if keep not in ("all", "best"):
            raise ValueError(f"keep must be 'all' or 'best', got {keep!r}")
        self.repeats, self.pick, self.keep, self.offload_dir = repeats, pick, keep, offload_dir
        self.states: dict[int, Any] = {}
        self.deltas: dict[int, float] = {}  # the deltas measured on this rank, by job
        self.best: tuple[float, int] | None = None  # (R_k, median job) of the best dataset so far
        self.peak = 0

    def _can_be_median(self, job: int) -> bool:
        """Whether ``job`` (measured) can still be its dataset's median: its position in the stable
        sort of the r deltas is known up to the repeats not measured here."""
        r = self.repeats
        first = job // r * r
        mine = self.deltas[job]
        measured = [j for j in range(first, first + r) if j in self.deltas]
        below = sum(1 for j in measured if self.deltas[j] < mine or (self.deltas[j] == mine and j < job))
        return below <= self.pick <= below + (r - len(measured))

    def offer(self, job: int, model: torch.nn.Module, delta: float | None = None) -> None:
        """A trained student (``delta``: its accuracy change, which lets ``keep="best"`` drop what
        cannot be the median early; ``None``: kept until :meth:`settle`)."""
        from lit_selfimprove.modeling import adapter_state

        if delta is not None and self.keep == "best":
            self.deltas[job] = delta
            first = job // self.repeats * self.repeats
            for j in [j for j in self.states if first <= j < first + self.repeats]:
                if not self._can_be_median(j):
                    self.drop(j)
            if not self._can_be_median(job):
                return
        state = adapter_state(model, "cpu")
        if self.offload_dir is not None:
            path = f"{self.offload_dir}/student_{job}.pt"
            save_student(state, path)  # a full disk: an error naming the path and the free space
            state = path
        self.states[job] = state
        self.peak = max(self.peak, len(self.states))

    def drop(self, job: int) -> None:
        """Forget job's copy (its file too)."""
        state = self.states.pop(job, None)
        if isinstance(state, str):
            import os

            os.remove(state)

    def settle(self, dataset: int, deltas: list[float]) -> int:
        """Keep dataset ``dataset``'s median-reward copy (if this rank has it), drop its others;
        returns the median's job index. ``keep="best"``: the median's copy stays only while its
        dataset's R (the mean of ``deltas``) is the best so far."""
        r = self.repeats
        median = dataset * r + sorted(range(r), key=deltas.__getitem__)[self.pick]
        for j in range(dataset * r, (dataset + 1) * r):
            self.deltas.pop(j, None)
            if j != median:
                self.drop(j)
        if self.keep == "best":
            reward = sum(deltas) / len(deltas)  # as grounded_rewards computes R_k
            if self.best is None or reward > self.best[0]:
                if self.best is not None:
                    self.drop(self.best[1])
                self.best = (reward, median)
            else:
                self.drop(median)
        return median
