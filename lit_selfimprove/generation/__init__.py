"""Sampling into :class:`Rollouts` through one interface, :func:`generate`, with two backends:
the built-in KV-cached sampler (default) and vLLM (``GenerationConfig(backend="vllm")``)."""

from lit_selfimprove.generation.backend import (
    GenerationBackend,
    GenerationConfig,
    attach_backend,
    backend_of,
    detach_backend,
    make_backend,
)
from lit_selfimprove.generation.sampler import BuiltinSampler, Rollouts, generate

__all__ = [
    "BuiltinSampler",
    "GenerationBackend",
    "GenerationConfig",
    "Rollouts",
    "attach_backend",
    "backend_of",
    "detach_backend",
    "generate",
    "make_backend",
]
