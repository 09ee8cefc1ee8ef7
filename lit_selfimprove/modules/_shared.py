"""Small pieces the LightningModules share (model placement, RNG, optimizer, prompts, samples)."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning import LightningModule

from lit_selfimprove.distributed import broadcast_object, seeded_generator
from lit_selfimprove.generation import GenerationConfig
from lit_selfimprove.loggers import log_table
from lit_selfimprove.modeling import load_trained_model
from lit_selfimprove.prompts import as_user_turn

__all__ = [
    "ZeroRewardWatch",
    "OPTIMIZERS",
    "adamw",
    "adamw_with_warmup",
    "as_user_turn",
    "check_at_least_one",
    "check_from_scratch",
    "check_optimizer",
    "cosine_schedule",
    "data_parallel_rank",
    "estimated_total_steps",
    "generation_config",
    "linear_warmup",
    "on_device",
    "restore_scratch_seed",
    "sampling_generator",
    "scratch_model",
    "scratch_seed",
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
    ``quantization``, ``lora``; ``from_scratch``: random weights in ``model``'s architecture, see
    :func:`scratch_model`), and a frozen copy as ``module._frozen["ref"]`` when ``reference``;
    nothing when the policy is already loaded."""
    if module.policy is not None:
        return
    hp = module.hparams
    load = load_trained_model
    if hp.get("from_scratch"):  # random weights in model's architecture, from a seed kept for resumes
        load = functools.partial(scratch_model, seed=scratch_seed(module))
    module.policy, ref = load(
        hp.model,
        dtype=hp.dtype,
        attn_implementation=hp.attn_implementation,
        quantization=hp.quantization,
        lora=hp.lora,
        reference=reference,
        device_mesh=getattr(module, "device_mesh", None),
        ref_quantization=hp.get("ref_quantization"),
        ref_device=root_device(module),
    )
    if ref is not None:
        module._frozen["ref"] = ref


def scratch_seed(module: LightningModule) -> int:
    """The seed of a from-scratch policy's random initial weights (and so of its DPO reference, which
    the checkpoint does not hold): fixed at the first setup to rank 0's ``torch.initial_seed()``, the
    same on every rank (per-rank seeds would give each rank another network), and kept as
    ``module._scratch_seed``, which :func:`restore_scratch_seed` gets back from a checkpoint."""
    if getattr(module, "_scratch_seed", None) is None:
        module._scratch_seed = int(broadcast_object(torch.initial_seed(), src=0))
    return module._scratch_seed


def restore_scratch_seed(module: LightningModule, checkpoint: dict) -> None:
    """On resume (``on_load_checkpoint``): the from-scratch seed the checkpoint's run drew its initial
    policy from. The policy's weights come from the checkpoint, but its DPO reference, the random
    initial policy, is not in it: it is rebuilt from that seed when this process drew another one
    (a resume reseeds torch, ``seed_everything: true`` picks a new seed)."""
    if not module.hparams.get("from_scratch"):
        return
    saved = checkpoint.get("scratch_seed")
    if saved is None:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            "from_scratch: the checkpoint does not record the seed of the random initial policy (written "
            "by an older version): the DPO reference is drawn from this run's seed and may differ from "
            "the one the checkpoint was trained against"
        )
        return
    if saved == getattr(module, "_scratch_seed", None):
        return
    module._scratch_seed = int(saved)
    if "ref" in module._frozen:
        hp = module.hparams
        _, module._frozen["ref"] = scratch_model(
            hp.model,
            dtype=hp.dtype,
            attn_implementation=hp.attn_implementation,
            reference=True,
            device_mesh=getattr(module, "device_mesh", None),
            seed=module._scratch_seed,
        )


def check_from_scratch(from_scratch: bool, quantization=None, lora=None, ref_quantization=None) -> None:
    """Fail at start-up for what a policy with random weights cannot have: quantized weights, LoRA
    adapters on a random base, or a reference loaded again from the (pretrained) checkpoint."""
    if not from_scratch:
        return
    given = [
        n
        for n, v in (("quantization", quantization), ("lora", lora), ("ref_quantization", ref_quantization))
        if v
    ]
    if given:
        raise ValueError(f"from_scratch=True trains every weight from random: {given} cannot be used with it")


def scratch_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = "float32",
    attn_implementation: str | None = None,
    quantization=None,
    lora=None,
    reference: bool = False,
    device_mesh=None,
    ref_quantization=None,
    ref_device=None,
    seed: int | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """:func:`~lit_selfimprove.modeling.load_trained_model` for the from-scratch setting: a new model
    with random weights built from ``name_or_path``'s config (only the config is read), float32
    master weights, its frozen copy as the reference when ``reference``, FSDP2-sharded with a
    ``device_mesh``. The weights are drawn from ``seed`` (default: torch's initial seed, which
    ``seed_everything`` makes the same on every rank) without touching the global RNG."""
    check_from_scratch(True, quantization, lora, ref_quantization)
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_selfimprove.assets import resolve_model
    from lit_selfimprove.modeling import frozen_copy, is_half, parse_dtype, shard_model

    config = AutoConfig.from_pretrained(resolve_model(name_or_path))
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() if seed is None else seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    model.train()
    ref = frozen_copy(model, dtype) if reference else None
    if device_mesh is not None:  # ModelParallelStrategy: FSDP2, as load_trained_model does
        shard_model(model, device_mesh, param_dtype=parse_dtype(dtype) if is_half(dtype) else None)
        if ref is not None:
            shard_model(ref, device_mesh)
    return model, ref


def root_device(module: LightningModule) -> torch.device:
    """The device the module will run on: its trainer's root device (known in ``configure_model``,
    before Lightning moves the module), else the module's own device."""
    trainer = getattr(module, "_trainer", None)
    return trainer.strategy.root_device if trainer is not None else module.device


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


# the ``optimizer`` choices of the modules: torch's AdamW, bitsandbytes' 8-bit AdamW (optimizer
# states in 8 bits: ~2 bytes per parameter instead of 8) and its paged variant (CUDA unified memory)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
_BNB_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}


def check_optimizer(name: str) -> None:
    """Fail at construction for an optimizer that cannot run here: an unknown name (``ValueError``
    naming the valid ones), bitsandbytes missing (``ImportError``), a paged optimizer without a CUDA
    GPU (``ValueError``: bitsandbytes would silently fall back to a non-paged one)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "adamw":
        return
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"optimizer={name!r} needs bitsandbytes: pip install 'lit-selfimprove[gpu]' "
            "(or use optimizer: adamw)"
        )
    if name.startswith("paged_") and not torch.cuda.is_available():
        raise ValueError(
            f"optimizer={name!r} pages its states through CUDA unified memory and needs a CUDA GPU; "
            "use 'adamw8bit' on this machine"
        )


def adamw(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    optimizer: str = "adamw",
) -> torch.optim.Optimizer:
    """AdamW over the parameters that require gradients: ``optimizer`` is one of :data:`OPTIMIZERS`
    (``adamw``: ``torch.optim.AdamW``; ``adamw8bit`` / ``paged_adamw8bit``: bitsandbytes'
    ``AdamW8bit`` / ``PagedAdamW8bit``, same hyper-parameters, 8-bit states; bitsandbytes keeps
    32-bit states for tensors under 4,096 elements)."""
    check_optimizer(optimizer)
    params = [p for p in params if p.requires_grad]
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    import bitsandbytes as bnb

    return getattr(bnb.optim, _BNB_OPTIMIZERS[optimizer])(
        params, lr=lr, weight_decay=weight_decay, betas=betas
    )


def adamw_with_warmup(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    warmup_steps: int = 0,
    schedule: Callable[[int], float] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    optimizer: str = "adamw",
):
    """Lightning's optimizer config, the one builder of the modules: :func:`adamw` (``optimizer``:
    one of :data:`OPTIMIZERS`) with a per-step LambdaLR ``schedule`` (default: :func:`linear_warmup`
    over ``warmup_steps``, then constant; e.g. :func:`cosine_schedule` for a cosine decay)."""
    opt = adamw(params, lr, weight_decay, betas, optimizer)
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
    """Append ``rows()`` as JSON lines to ``<log dir>/<file>`` on global rank 0, every ``every`` steps,
    and log them as the table ``<file stem>`` through every logger with a table API
    (:func:`~lit_selfimprove.loggers.log_table`: WandB, Neptune, TensorBoard; CSV has none).

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
    log_table(getattr(trainer, "loggers", ()), Path(file).stem, written, step)
    return written


G = TypeVar("G")


def as_group(cls: type[G], value: G | Mapping[str, Any] | None, name: str) -> G:
    """The settings group ``name`` from what the constructor got: the dataclass, a mapping of its fields
    (YAML, ``hparams.yaml``) or ``None`` (the defaults). An unknown key is a ``ValueError`` naming the
    group's fields (a flat argument that moved into a group reaches here only from Python)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"{name}: unknown setting(s) {unknown}; {name} has {known}")
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__}, a mapping or None, got {type(value).__name__}")
