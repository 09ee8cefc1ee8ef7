"""Two-process CPU (gloo) FSDP2 sharding of a LoRA (peft) model, used by ``tests/test_lora_fsdp.py``.

Usage: ``python tests/_dist_lora_script.py MODEL_DIR OUT_DIR``. This process spawns the 2 ranks; each
loads the tiny model with LoRA adapters through ``load_trained_model(..., device_mesh=...)`` (as
``ModelParallelStrategy`` does), runs one forward / backward on the same batch and writes
``OUT_DIR/rank{r}.pt``: which modules FSDP2 wrapped, and the loss, adapter gradients and
reference logits next to those of the same model unsharded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def adapter_grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[name] = g.detach().clone()
    return out


def worker(rank: int, model_dir: str, out_dir: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from lit_selfimprove.modeling import AdapterDisabledReference, decoder_layers, load_trained_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ids = torch.randint(1, 40, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)  # the adapters' A init: the same on both ranks and for the unsharded copy
        plain, _ = load_trained_model(model_dir, lora=LORA)
        loss_of(plain, ids).backward()
        with torch.no_grad():
            ref_plain = AdapterDisabledReference(plain)(input_ids=ids).logits

        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
        torch.manual_seed(0)
        model, ref = load_trained_model(model_dir, lora=LORA, reference=True, device_mesh=mesh)
        layers = decoder_layers(model)
        loss = loss_of(model, ids)
        loss.backward()
        with torch.no_grad():
            ref_logits = ref(input_ids=ids).logits
        result = {
            "rank": rank,
            "layers": len(layers),
            "layers_sharded": sum(isinstance(m, FSDPModule) for m in layers),
            "fsdp_modules": [n for n, m in model.named_modules() if isinstance(m, FSDPModule)],
            "root_sharded": isinstance(model, FSDPModule),
            "loss": float(loss),
            "loss_plain": float(loss_of(plain, ids).detach()),
            "grads": adapter_grads(model),
            "grads_plain": adapter_grads(plain),
            "ref_logits_diff": float((ref_logits - ref_plain).abs().max()),
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        }
        torch.save(result, out_dir / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    torch.multiprocessing.spawn(worker, args=(model_dir, out_dir), nprocs=2, join=True)


if __name__ == "__main__":
    main()
