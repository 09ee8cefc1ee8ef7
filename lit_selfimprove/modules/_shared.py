"""Small pieces the LightningModules share (model placement, RNG, optimizer, prompts, samples)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from lightning import LightningModule

from lit_selfimprove.distributed import seeded_generator
from lit_selfimprove.generation import GenerationConfig
from lit_selfimprove.modeling import load_trained_model
from lit_selfimprove.prompts import as_user_turn

__all__ = [
    "ZeroRewardWatch",
    "adamw",
    "adamw_with_warmup",
    "as_user_turn",
    "check_at_least_one",
    "cosine_schedule",
    "data_parallel_rank",
    "estimated_total_steps",
    "generation_config",
    "linear_warmup",
    "on_device",
    "sampling_generator",
    "seeded_generator",
    "write_samples",
]


def on_device(model: torch.nn.Module | None, device: torch.device) -> torch.nn.Module | None:
    """Move a frozen model (kept out of the module tree, so Lightning does not) to ``device``."""
    if model is not None:
        param = next(model.parameters())
        if param.device != device and param.device.type != "meta":
            model.to(device)
    return model


def generation_config(value: GenerationConfig | dict | None) -> GenerationConfig:
    """A module's ``generation`` argument as a config (a dict: from hparams.yaml)."""
    return GenerationConfig(**value) if isinstance(value, dict) else value or GenerationConfig()


def load_policy(module: LightningModule, reference: bool) -> None:
    """Load ``module.policy`` from its hparams (``model``, ``dtype``, ``attn_implementation``,
    ``quantization``, ``lora``), and a frozen copy as ``module._frozen["ref"]`` when ``reference``;
    nothing when the policy is already loaded."""
    if module.policy is not None:
        return
    hp = module.hparams
    module.policy, ref = load_trained_model(
        hp.model,
        dtype=hp.dtype,
        attn_implementation=hp.attn_implementation,
        quantization=hp.quantization,
        lora=hp.lora,
        reference=reference,
        device_mesh=getattr(module, "device_mesh", None),
    )
    if ref is not None:
        module._frozen["ref"] = ref


def data_parallel_rank(module: LightningModule) -> int:
    """The module's data-parallel rank (tensor-parallel peers of a device mesh share one)."""
    rank, mesh = module.global_rank, getattr(module, "device_mesh", None)
    if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
        rank = mesh["data_parallel"].get_local_rank()
    return rank


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


def linear_warmup(warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup to the peak, then constant (a LambdaLR factor)."""
    warm = max(1, warmup_steps)
    return lambda step: min(1.0, (step + 1) / warm)


def cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """Linear warmup then cosine decay to ``min_ratio`` of the peak (a LambdaLR factor)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def estimated_total_steps(module: LightningModule, default: int = 10_000) -> int:
    """The run's optimizer steps as the trainer estimates them (``default`` when unknown or unbounded)."""
    trainer = getattr(module, "_trainer", None)
    total = trainer.estimated_stepping_batches if trainer is not None else default
    return int(total) if math.isfinite(total) else default


def adamw(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients."""
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, betas=betas
    )


def adamw_with_warmup(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    warmup_steps: int = 0,
    schedule: Callable[[int], float] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
):
    """Lightning's optimizer config, the one builder of the modules: :func:`adamw` with a per-step
    LambdaLR ``schedule`` (default: :func:`linear_warmup` over ``warmup_steps``, then constant;
    e.g. :func:`cosine_schedule` for a cosine decay)."""
    opt = adamw(params, lr, weight_decay, betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule or linear_warmup(warmup_steps))
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


def write_samples(module: LightningModule, every: int, step: int, file: str, rows: Callable[[], list[dict]]):
    """Append ``rows()`` as JSON lines to ``<log dir>/<file>`` on global rank 0, every ``every`` steps.

    The one "every N steps" rule of the modules' ``log_samples_every``: a training step writes when
    ``step``, the global step at its *start* (optimizer steps done before it), is a multiple of
    ``every`` (the first step, then every N-th; ``0`` never writes). Call it on every rank: the
    trainer's ``log_dir`` is a collective. ``rows`` is only called where something is written.
    Returns the rows written (``None`` elsewhere).
    """
    trainer = getattr(module, "_trainer", None)
    if not every or step % every or trainer is None:
        return None
    log_dir = trainer.log_dir
    if not trainer.is_global_zero or log_dir is None:
        return None
    written = rows()
    path = Path(log_dir) / file
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in written:
            f.write(json.dumps(row) + "\n")
    return written
