"""SOAR's promotion rule (Algorithm 1, step 5), as plain numbers in and a decision out.

After every outer step, Rbar_t = mean_k R_k is appended to a history. When the history holds a
full window of ``window`` values and their mean exceeds ``tau``, the best dataset
k* = argmax_k R_k is promoted: its median-reward trained student becomes the baseline and its
pairs join PQ.

Two choices the paper leaves open (it reports at most 4 promotions in 200 outer steps):

* ``reset_after_promotion`` (default on): the history starts afresh after a promotion. The rewards
  before it were measured against the old, weaker baseline; kept in the window they promote again
  one or two steps later even when every new reward is <= 0 (a cascade).
* ``require_improvement`` (default on): a promotion only takes a student that beat the baseline,
  i.e. R_k* > 0. A moving average above ``tau`` can hold an earlier step's good rewards while this
  step's best dataset made the student worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromotionDecision:
    """One outer step's verdict: promote dataset ``dataset``? ``moving_avg`` is ``None`` until the
    window is full."""

    promote: bool
    dataset: int
    moving_avg: float | None


class PromotionRule:
    """The moving-average promotion rule with its history (checkpointable via ``state_dict``).

    Args:
        tau: threshold on the moving average of Rbar (SOAR: 0.01).
        window: m, outer steps in the moving average (SOAR: 3); a full window is needed.
        reset_after_promotion: clear the history after a promotion.
        require_improvement: promote only when the best dataset's R_k* > 0.
    """

    def __init__(
        self,
        tau: float = 0.01,
        window: int = 3,
        reset_after_promotion: bool = True,
        require_improvement: bool = True,
    ):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.tau, self.window = tau, window
        self.reset_after_promotion = reset_after_promotion
        self.require_improvement = require_improvement
        self.history: list[float] = []

    def moving_average(self) -> float | None:
        """Mean of the last ``window`` values of the history (``None`` while it is shorter)."""
        if len(self.history) < self.window:
            return None
        return sum(self.history[-self.window :]) / self.window

    def update(self, rewards: list[float]) -> PromotionDecision:
        """Record one outer step's rewards R_1..R_g and decide."""
        if not rewards:
            raise ValueError("update needs at least one dataset reward")
        self.history.append(sum(rewards) / len(rewards))
        avg = self.moving_average()
        k_star = max(range(len(rewards)), key=rewards.__getitem__)
        promote = avg is not None and avg > self.tau
        if self.require_improvement and rewards[k_star] <= 0:
            promote = False
        if promote and self.reset_after_promotion:
            self.history = []
        return PromotionDecision(promote, k_star, avg)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
