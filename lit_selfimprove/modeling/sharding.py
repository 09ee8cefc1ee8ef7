"""FSDP2 sharding (Lightning's ModelParallelStrategy): which modules are the units of sharding, and
``fully_shard`` over the device mesh with float32 shards computing in a half dtype.

Only trained models and their unquantized frozen copies are sharded; a quantized reference and a
LoRA model's adapters-disabled reference are not (see :func:`~lit_selfimprove.modeling.load_trained_model`).
"""

from __future__ import annotations

import torch

from lit_selfimprove.modeling.lora import is_peft


def shard_model(
    model: torch.nn.Module, device_mesh, param_dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (ModelParallelStrategy).

    ``param_dtype`` (e.g. ``torch.bfloat16``): compute in that dtype over float32 shards, with
    float32 gradient reduction (``MixedPrecisionPolicy``); ``None`` computes in the shards' dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = (
        device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    )
    kwargs = {}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    if not layers:
        import warnings

        warnings.warn(
            f"shard_model found no decoder layers in {type(model).__name__}: only the root is sharded, so "
            "every forward all-gathers the whole model (no memory saving from FSDP2)",
            UserWarning,
            stacklevel=2,
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a causal LM, each FSDP2's unit of sharding: ``model.model.layers`` of a
    transformers model, looked up under the base model of a peft (LoRA) model (whose ``.model`` is
    the ``*ForCausalLM``, one level above the layers); else the modules of the classes transformers
    lists in ``_no_split_modules`` (e.g. ``GPT2Block``)."""
    base = model.get_base_model() if is_peft(model) else model
    layers = getattr(getattr(base, "model", base), "layers", None)
    if layers is not None:
        return list(layers)
    classes = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in classes]
