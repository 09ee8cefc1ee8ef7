"""The one place that asks "am I distributed?", gathers, reduces and seeds per-rank RNG streams.

Pure torch (``torch.distributed`` only, no Lightning). Every helper is a no-op on one process, and
without a process group (``world()`` is then ``(1, 0)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.autograd.graph import increment_version

__all__ = [
    "all_reduce_max",
    "all_reduce_sum",
    "any_rank",
    "broadcast_object",
    "broadcast_state",
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


def broadcast_state(
    state: Mapping[str, torch.Tensor] | None, src: int, into: Mapping[str, torch.Tensor]
) -> bool:
    """Copy rank ``src``'s ``state`` (name -> tensor, e.g. a CPU state dict) in place into the tensors
    ``into`` (name -> destination, e.g. a model's ``state_dict()``, whose tensors share the
    parameters' storage) on every rank; ``state`` is only read on ``src``.

    Unlike :func:`broadcast_object`, which pickles the whole state into one byte tensor on every rank
    (a 3B float32 model: ~12 GB more on each GPU), only the names, shapes and dtypes go as an object;
    then each tensor goes with ``dist.broadcast`` straight into its destination (or through one
    buffer of its size when dtype or layout differ), so the extra memory is at most one tensor. The
    collective runs on the destinations' device (CPU with gloo, CUDA with NCCL).

    Returns ``False`` on every rank, changing nothing, when ``src`` has no state (``None``). Raises
    ``KeyError`` / ``ValueError`` on every rank when the names or shapes do not match ``into``."""
    size, rank = world()
    meta = None
    if rank == src and state is not None:
        meta = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    if size > 1:
        meta = broadcast_object(meta, src=src)
    if meta is None:
        return False
    _check_state_layout(meta, into)
    with torch.no_grad():
        for name, _, dtype in meta:
            dst = into[name].detach()
            direct = dst.dtype == dtype and dst.is_contiguous()
            buf = dst if direct else torch.empty(dst.shape, dtype=dtype, device=dst.device)
            if rank == src:
                buf.copy_(state[name])
            if size > 1:
                dist.broadcast(buf, src=src)
            if not direct:
                dst.copy_(buf)
            elif rank != src:
                # a collective's write bumps no version counter, copy_'s does: a vLLM engine reloads
                # the weights when their versions changed
                increment_version(dst)
    return True


def _check_state_layout(meta: list[tuple[str, tuple, torch.dtype]], into: Mapping[str, torch.Tensor]) -> None:
    """The broadcast state's names and shapes must be those of the destinations (as ``load_state_dict``)."""
    names = {name for name, _, _ in meta}
    missing, unexpected = sorted(set(into) - names), sorted(names - set(into))
    if missing or unexpected:
        raise KeyError(
            f"the broadcast state does not match the destination: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    wrong = [(n, s, tuple(into[n].shape)) for n, s, _ in meta if tuple(into[n].shape) != s]
    if wrong:
        raise ValueError(
            f"the broadcast state's shapes differ from the destination's (name, sent, here): {wrong[:3]}"
        )


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
