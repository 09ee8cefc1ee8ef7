"""The pieces the modules share: one process group helper, one seed mixing, Rollouts.select / cat,
one optimizer builder and one sample-writing rule (single process; two processes: test_distributed)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lit_selfimprove import distributed as dist_helpers
from lit_selfimprove.generation import Rollouts
from lit_selfimprove.modules._shared import adamw_with_warmup, cosine_schedule, write_samples


def test_one_process_is_a_world_of_one():
    t = torch.tensor([1.0, 2.0])
    assert dist_helpers.world() == (1, 0) and dist_helpers.gather_objects("x") == ["x"]
    assert dist_helpers.broadcast_object({"a": 1}, src=0) == {"a": 1}
    assert dist_helpers.all_reduce_sum(t) is t and dist_helpers.all_reduce_max(t) is t
    assert dist_helpers.any_rank(True, "cpu") and not dist_helpers.any_rank(False, "cpu")


def test_seed_mixings_are_pinned():
    """Seeded runs, their resumes and their comparisons across ranks depend on these exact seeds."""
    torch.manual_seed(5)
    assert dist_helpers.seeded_generator("cpu", 1, 2).initial_seed() == 5_000_032_000_054
    assert dist_helpers.seeded_generator("cpu", 1, 2, seed=5).initial_seed() == 5_000_032_000_054
    assert (
        dist_helpers.seeded_generator("cpu", 0, "train", 3, seed=7, hashed=True).initial_seed()
        == 4789219546043949738
    )
    torch.manual_seed(5)
    a = torch.rand(3, generator=dist_helpers.seeded_generator("cpu", 1, 2))
    assert torch.equal(a, torch.rand(3, generator=dist_helpers.seeded_generator("cpu", 1, 2, seed=5)))
    assert not torch.equal(a, torch.rand(3, generator=dist_helpers.seeded_generator("cpu", 2, 1, seed=5)))


def _rollouts(prompt_width: int, completion_width: int, texts: list[str]) -> Rollouts:
    n = len(texts)
    ids = torch.arange(n * prompt_width).view(n, prompt_width) + 1
    comp = torch.arange(n * completion_width).view(n, completion_width) + 100
    return Rollouts(
        ids, torch.ones_like(ids), comp, torch.ones_like(comp), texts, torch.ones(n, dtype=torch.bool)
    )


def test_rollouts_select_and_cat():
    a, b = _rollouts(2, 3, ["a0", "a1", "a2"]), _rollouts(3, 1, ["b0"])
    picked = a.select([2, 0])
    assert picked.texts == ["a2", "a0"] and torch.equal(picked.completion_ids, a.completion_ids[[2, 0]])
    assert Rollouts.cat([a], pad_id=0) is a
    both = Rollouts.cat([picked, b], pad_id=0)
    assert both.texts == ["a2", "a0", "b0"] and both.prompt_ids.shape == (3, 3)
    assert (
        both.prompt_mask[:2, 0].tolist() == [0, 0] and both.prompt_ids[2].tolist() == b.prompt_ids[0].tolist()
    )
    assert both.completion_mask[2].tolist() == [1, 0, 0] and both.completion_ids[2, 1:].tolist() == [0, 0]


def test_one_optimizer_builder_two_schedules():
    p = torch.nn.Parameter(torch.zeros(1))
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    [opt], [cfg] = adamw_with_warmup([p, frozen], lr=1.0, weight_decay=0.0, warmup_steps=4)
    assert opt.param_groups[0]["params"] == [p] and cfg["interval"] == "step"
    assert cfg["scheduler"].get_last_lr() == [0.25]
    [opt], [cfg] = adamw_with_warmup([p], 1.0, 0.0, schedule=cosine_schedule(0, 10, 0.1), betas=(0.9, 0.95))
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and cfg["scheduler"].get_last_lr() == [1.0]


@pytest.mark.parametrize("every, written", [(0, []), (1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3])])
def test_one_rule_for_writing_samples(tmp_path, every, written):
    trainer = SimpleNamespace(log_dir=str(tmp_path), is_global_zero=True)
    module = SimpleNamespace(_trainer=trainer)
    for step in range(5):
        write_samples(module, every, step, "s.jsonl", lambda step=step: [{"step": step}])
    path = tmp_path / "s.jsonl"
    got = [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []
    assert got == written
    trainer.is_global_zero = False  # other ranks write nothing
    assert write_samples(module, 1, 0, "other.jsonl", lambda: [{}]) is None
    assert not (tmp_path / "other.jsonl").exists()
