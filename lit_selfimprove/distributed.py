"""The one place that asks "am I distributed?", gathers, reduces and seeds per-rank RNG streams.

Pure torch (``torch.distributed`` only, no Lightning). Every helper is a no-op on one process, and
without a process group (``world()`` is then ``(1, 0)``).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_max",
    "all_reduce_sum",
    "any_rank",
    "broadcast_object",
    "gather_objects",
    "initialized",
    "seeded_generator",
    "world",
    "world_size",
]


def initialized() -> bool:
    """Whether a default process group exists (whatever its size)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Size of the default process group, 1 without one."""
    return dist.get_world_size() if initialized() else 1


def world() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` on one process)."""
    size = world_size()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself on one process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _all_reduce(values: torch.Tensor, op: str, device: torch.device | str | None) -> torch.Tensor:
    if world_size() == 1:
        return values
    # the collective runs on ``device`` (NCCL wants CUDA tensors); a tensor already there is
    # reduced in place
    out = values if device is None else values.to(device)
    dist.all_reduce(out, op=getattr(dist.ReduceOp, op))
    return out.to(values.device)


def all_reduce_sum(values: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """The sum of ``values`` over ranks, on ``values``' device (``device``: where to reduce)."""
    return _all_reduce(values, "SUM", device)


def all_reduce_max(values: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """The elementwise maximum of ``values`` over ranks, on ``values``' device."""
    return _all_reduce(values, "MAX", device)


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """Whether ``flag`` holds on at least one rank (a collective: every rank must ask)."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_max(torch.tensor([1.0 if flag else 0.0], device=device)).item() > 0)


def seeded_generator(
    device: torch.device | str, *parts, seed: int | None = None, hashed: bool = False
) -> torch.Generator:
    """A generator on ``device`` seeded from ``seed`` (default: the global seed,
    ``torch.initial_seed()``) mixed with ``parts`` (rank, step, job, stream name, ...): one
    independent stream per combination, unlike ``seed + rank``.

    Two mixings, each kept because seeded runs (and their resumes, and their comparisons across
    ranks) depend on the exact numbers:

    * default: ``s = seed mod 2**61``, then ``s = (s * 1_000_003 + part + 1) mod 2**61`` per
      integer part (StudentRLVR, SOAR);
    * ``hashed=True``: blake2b of ``"seed/part/part/..."`` (parts may be strings) mod ``2**63``
      (SuffixPolicyDPO).
    """
    base = torch.initial_seed() if seed is None else seed
    if hashed:
        text = "/".join(map(str, (base, *parts)))
        value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % 2**63
    else:
        value = base % 2**61
        for part in parts:
            value = (value * 1_000_003 + int(part) + 1) % 2**61
    gen = torch.Generator(device=device)
    gen.manual_seed(value)
    return gen
