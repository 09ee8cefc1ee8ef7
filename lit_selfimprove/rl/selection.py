"""SIP's preference selection (tensors only): per prefix, the chosen (best) and rejected (worst)
of its scored candidates, ties broken at random."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Selection", "select_pairs"]


@dataclass
class Selection:
    """Chosen / rejected candidate per prefix (``-1`` where the prefix is skipped, and the
    rejected one where there is none: RF-NLL on a prefix whose scores are all equal)."""

    chosen: Tensor  # [B] long
    rejected: Tensor  # [B] long
    valid: Tensor  # [B] bool: the prefix is trained (a chosen, and for DPO a rejected candidate)
    tie_best: Tensor  # [B] bool: several candidates shared the best score
    tie_worst: Tensor  # [B] bool: several candidates shared the worst score


def _pick(indices: Tensor, generator: torch.Generator | None) -> int:
    # draw only on a tie, so that untied steps leave the generator (and the run) unchanged
    if len(indices) == 1:
        return int(indices[0])
    return int(indices[torch.randint(len(indices), (1,), generator=generator)])


def select_pairs(
    total: Tensor, generator: torch.Generator | None = None, atol: float = 1e-6, need_rejected: bool = True
) -> Selection:
    """Per row of ``total`` ``[B, C]``: chosen = argmax, rejected = argmin, ``nan`` excluded.

    ``need_rejected`` (DPO): a row with fewer than two scored candidates, or whose scores are
    all equal (within ``atol``: win rates computed in floating point), carries no preference and
    is skipped. ``need_rejected=False`` (RF-NLL, which trains on the best candidate only): only
    a row without any score is skipped; where all scores are equal, every candidate is a best
    one and no rejected one is named (``-1``). Several candidates sharing the best (worst) score
    are a tie, broken uniformly at random with ``generator`` (a fixed order would favour, e.g.,
    rollout 0 or the suffix).
    """
    if total.ndim != 2:
        raise ValueError(f"total must be [B, C], got {tuple(total.shape)}")
    total = total.detach().float().cpu()
    rows = total.shape[0]
    chosen = torch.full((rows,), -1, dtype=torch.long)
    rejected = chosen.clone()
    tie_best = torch.zeros(rows, dtype=torch.bool)
    tie_worst = tie_best.clone()
    for b in range(rows):
        row = total[b]
        scored = ~torch.isnan(row)
        if not scored.any():
            continue
        hi, lo = float(row[scored].max()), float(row[scored].min())
        spread = hi - lo > atol
        if need_rejected and not spread:
            continue
        best = (scored & (row >= hi - atol)).nonzero().flatten()
        chosen[b], tie_best[b] = _pick(best, generator), len(best) > 1
        if spread:
            worst = (scored & (row <= lo + atol)).nonzero().flatten()
            rejected[b], tie_worst[b] = _pick(worst, generator), len(worst) > 1
    return Selection(chosen, rejected, chosen >= 0, tie_best, tie_worst)
