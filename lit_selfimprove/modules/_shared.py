"""Small pieces the RL modules share (model placement, RNG, optimizer, prompts)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning import LightningModule


def on_device(model: torch.nn.Module | None, device: torch.device) -> torch.nn.Module | None:
    """Move a frozen model (kept out of the module tree, so Lightning does not) to ``device``."""
    if model is not None:
        param = next(model.parameters())
        if param.device != device and param.device.type != "meta":
            model.to(device)
    return model


def data_parallel_rank(module: LightningModule) -> int:
    """The module's data-parallel rank (tensor-parallel peers of a device mesh share one)."""
    rank, mesh = module.global_rank, getattr(module, "device_mesh", None)
    if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
        rank = mesh["data_parallel"].get_local_rank()
    return rank


def seeded_generator(device: torch.device, *parts: int) -> torch.Generator:
    """A generator seeded by mixing the global seed with ``parts`` (rank, step, job, ...)."""
    seed = torch.initial_seed() % 2**61
    for part in parts:
        seed = (seed * 1_000_003 + int(part) + 1) % 2**61
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def sampling_generator(module: LightningModule) -> torch.Generator:
    """The module's RNG for all sampling: one stream per data-parallel rank and global step.

    ``seed_everything`` gives every rank the same global RNG state, so ranks sampling from the
    global RNG would draw the same random numbers (identical or correlated completions). The
    stream is reseeded from (global seed, rank, ``global_step``) when the step changes, so a run
    resumed from a checkpoint draws exactly what the uninterrupted run would have drawn.
    """
    key = (module.global_step, str(module.device))
    gen = getattr(module, "_sampling_gen", None)
    if gen is None or getattr(module, "_sampling_key", None) != key:
        gen = seeded_generator(module.device, data_parallel_rank(module), module.global_step)
        module._sampling_gen, module._sampling_key = gen, key
    return gen


def adamw_with_warmup(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, warmup_steps: int
):
    """AdamW over the trainable parameters with a linear warmup (Lightning's optimizer config)."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay)
    warm = max(1, warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return [opt], [{"scheduler": sched, "interval": "step"}]


def check_at_least_one(**values: int | None) -> None:
    """``ValueError`` at construction for a count (token budget, batch size...) below 1 (``None`` passes)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


class ZeroRewardWatch:
    """Warns once when a reward was 0 for every sample for ``steps`` steps in a row.

    A reward that never pays is what a wrong answer format, prompt or chat template produces (or a
    hard set with no learning signal, the very case SOAR is for): RL then trains nothing.
    """

    def __init__(self, what: str, steps: int | None):
        self.what, self.steps, self.streak, self.warned = what, steps, 0, False

    def update(self, all_zero: bool, sample: str | None = None) -> bool:
        """Record one step; returns whether it warned now."""
        self.streak = self.streak + 1 if all_zero else 0
        if not self.steps or self.warned or self.streak < self.steps:
            return False
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"{self.what}: the reward was 0 for every sample in the last {self.streak} steps, so there is "
            "no learning signal. Check the reward against the answer format, the prompt template and "
            "the chat template" + (f"; a recent completion: {sample[:300]!r}" if sample else "") + "."
        )
        self.warned = True
        return True


def as_user_turn(tokenizer, text: str, use_chat_template: bool) -> str:
    """``text`` as is, or as the user turn of the tokenizer's chat template (ready to generate)."""
    if not use_chat_template:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
