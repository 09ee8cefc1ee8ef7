"""What a reward is: a callable ``reward(completions, answers) -> Tensor`` of per-completion rewards.

A reward may also offer (each optional, discovered by the helpers below instead of at call sites):

* ``score(completions, answers) -> (rewards, correct)``: correctness next to a shaped reward
  (:class:`ScoringReward`; without it a completion is correct when its reward is ``> 0``);
* ``parseable(answers) -> [bool]``: whether reference answers can be checked at all
  (:class:`ParseableReward`; SOAR's teacher uses it to reject unverifiable answers);
* ``pop_stats() -> dict``: counters since the last call, e.g. ``timeouts`` (:class:`StatsReward`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "ParseableReward",
    "Reward",
    "ScoringReward",
    "StatsReward",
    "parseable_check",
    "pop_reward_stats",
    "score_completions",
]


@runtime_checkable
class Reward(Protocol):
    def __call__(self, completions: list[str], answers: list[str]) -> Tensor: ...


@runtime_checkable
class ScoringReward(Protocol):
    def score(self, completions: list[str], answers: list[str]) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class ParseableReward(Protocol):
    def parseable(self, answers: Sequence[str]) -> Sequence[bool]: ...


@runtime_checkable
class StatsReward(Protocol):
    def pop_stats(self) -> dict[str, float]: ...


def score_completions(reward: Reward, completions: list[str], answers: list[str], prompts=None):
    """``(rewards, correct)``: rewards from the reward; correctness from its ``score`` method
    when it has one (shaped rewards), else ``rewards > 0`` (binary rewards)."""
    if isinstance(reward, ScoringReward):
        rewards, correct = reward.score(completions, answers)
    else:
        rewards = reward(completions, answers)
        correct = rewards > 0
    return torch.as_tensor(rewards, dtype=torch.float32), torch.as_tensor(correct).bool()


def parseable_check(reward: Reward) -> Callable[[Sequence[str]], Sequence[bool]] | None:
    """The reward's ``parseable`` method when it has a callable one, else ``None``."""
    return reward.parseable if isinstance(reward, ParseableReward) and callable(reward.parseable) else None


def pop_reward_stats(reward: Reward) -> dict[str, float] | None:
    """The reward's ``pop_stats()`` when it keeps stats, else ``None``."""
    return reward.pop_stats() if isinstance(reward, StatsReward) else None
