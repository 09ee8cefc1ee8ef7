"""Unbiased pass@k (Chen et al., 2021) as a function and a DDP-safe torchmetrics ``Metric``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["PassAtK", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate for one problem: ``1 - C(n - c, k) / C(n, k)``.

    ``n`` samples were drawn, ``c`` of them correct. Computed stably as
    ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``; returns 1.0 when ``n - c < k`` (every size-k subset
    contains a correct sample). Raises ``ValueError`` for ``n < 1``, ``k < 1``, ``c < 0``, ``c > n`` or
    ``k > n``.
    """
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got n={n}")
    if k < 1:
        raise ValueError(f"pass_at_k: k must be >= 1, got k={k}")
    if c < 0:
        raise ValueError(f"pass_at_k: c must be >= 0, got c={c}")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} correct exceeds n={n} samples")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} exceeds n={n} samples")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


class PassAtK(Metric):
    """Mean unbiased pass@k over problems, for several ``k`` at once.

    ``update(num_samples, num_correct)``: ``num_correct`` is a 1-D tensor of per-problem correct counts;
    ``num_samples`` is an int (same ``n`` for every problem) or a per-problem tensor of the same shape.

    ``compute()`` returns ``{"pass@k": mean over problems}`` for every configured ``k`` such that
    ``k <= n`` for *all* problems seen since the last reset. If any problem had fewer than ``k`` samples,
    that ``k`` is omitted entirely (rather than averaged over a subset of problems, which would bias it).
    Returns an empty dict if no problem has been seen.

    States (all ``dist_reduce_fx="sum"``, so DDP-safe): per-k sums of pass@k, per-k counts of problems
    with ``n < k``, and the number of problems.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    pass_sums: Tensor
    num_too_few: Tensor
    num_problems: Tensor

    def __init__(self, ks: Sequence[int] = (1, 4, 8, 16, 32), **kwargs) -> None:
        super().__init__(**kwargs)
        ks = [int(k) for k in ks]
        if not ks:
            raise ValueError("PassAtK: ks must not be empty")
        if any(k < 1 for k in ks):
            raise ValueError(f"PassAtK: every k must be >= 1, got {ks}")
        self.ks: tuple[int, ...] = tuple(sorted(set(ks)))
        self.add_state(
            "pass_sums", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "num_too_few", default=torch.zeros(len(self.ks), dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state("num_problems", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, num_samples: Tensor | int, num_correct: Tensor) -> None:
        correct = torch.as_tensor(num_correct)
        if correct.ndim != 1:
            raise ValueError(f"PassAtK: num_correct must be 1-D, got shape {tuple(correct.shape)}")
        correct_list = [int(c) for c in correct.tolist()]
        if isinstance(num_samples, Tensor) and num_samples.ndim > 0:
            if num_samples.shape != correct.shape:
                raise ValueError(
                    f"PassAtK: num_samples shape {tuple(num_samples.shape)} must match num_correct {tuple(correct.shape)}"
                )
            samples_list = [int(n) for n in num_samples.tolist()]
        else:
            samples_list = [int(num_samples)] * len(correct_list)

        sums = [0.0] * len(self.ks)
        too_few = [0] * len(self.ks)
        for n, c in zip(samples_list, correct_list):
            pass_at_k(n, c, 1)  # validates n and c even when every k is too large
            for j, k in enumerate(self.ks):
                if k > n:
                    too_few[j] += 1
                else:
                    sums[j] += pass_at_k(n, c, k)
        self.pass_sums += torch.tensor(sums, dtype=self.pass_sums.dtype, device=self.pass_sums.device)
        self.num_too_few += torch.tensor(
            too_few, dtype=self.num_too_few.dtype, device=self.num_too_few.device
        )
        self.num_problems += len(correct_list)

    def compute(self) -> dict[str, Tensor]:
        count = int(self.num_problems)
        if count == 0:
            return {}
        result: dict[str, Tensor] = {}
        means = (self.pass_sums / count).float()
        for j, k in enumerate(self.ks):
            if int(self.num_too_few[j]) == 0:
                result[f"pass@{k}"] = means[j]
        return result
