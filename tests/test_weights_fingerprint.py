"""The vLLM backend's change detection: the engine reloads only when ``weights_fingerprint`` moves,
so any write it misses leaves the engine serving stale weights, silently and for good.

No vLLM needed: the fingerprint, the ranks' common decision and the engine's dtype are plain torch.
Run as a script, this file is one rank of the FSDP2 test (2 gloo processes on CPU).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from lit_selfimprove.generation.vllm_backend import compute_dtype, weights_fingerprint


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """One weight over bitsandbytes' 4,096-element threshold (8-bit states), the rest under (32-bit)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))


def one_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    device = next(model.parameters()).device
    model(torch.randn(8, 64, device=device)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def assert_step_seen(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    stamp = weights_fingerprint(model)
    before = [p.detach().clone() for p in model.parameters()]
    one_step(model, opt)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))  # it wrote
    stepped = weights_fingerprint(model)
    assert stepped != stamp
    assert weights_fingerprint(model) == stepped  # stable while nothing is written


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "paged_adamw8bit"])
def test_sees_a_step_of_every_optimizer_of_the_builder(optimizer):
    """bitsandbytes' optimizers write through raw pointers and never bump ``_version``."""
    from lit_selfimprove.modules._shared import OPTIMIZERS, adamw

    assert optimizer in OPTIMIZERS
    if optimizer != "adamw":
        pytest.importorskip("bitsandbytes")
    device = "cpu"
    if optimizer.startswith("paged_"):
        if not torch.cuda.is_available():
            pytest.skip("paged_adamw8bit needs CUDA: the builder refuses it on CPU (check_optimizer)")
        device = "cuda"
    model = tiny_model().to(device)
    assert_step_seen(model, adamw(model.parameters(), lr=1e-3, weight_decay=0.01, optimizer=optimizer))


@pytest.mark.parametrize("kind", ["torch_fused", "bnb_32bit"])
def test_sees_a_step_of_fused_and_32bit_adamw(kind):
    model = tiny_model()
    if kind == "torch_fused":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    else:
        bnb = pytest.importorskip("bitsandbytes")
        opt = bnb.optim.AdamW(model.parameters(), lr=1e-3, optim_bits=32)
    assert_step_seen(model, opt)


def _data_add(p):
    p.data.add_(1e-3)


def _data_copy(p):
    p.data.copy_(p.data * 0.999)


def _numpy_one_ulp(p):  # the smallest write there is: one element, one ulp
    value = p.detach()[0, 0]
    p.detach().numpy()[0, 0] = torch.nextafter(value, torch.tensor(float("inf"))).item()


def _swap_rows(p):  # every sum of the elements stays the same
    p.data.copy_(p.data.flip(0))


def _cancelling_ulps(p):  # +1 and -1 in the bits: the plain sum of the bits stays the same
    bits = p.data.view(torch.int32)
    bits[0, 0] += 1
    bits[1, 1] -= 1


@pytest.mark.parametrize("write", [_data_add, _data_copy, _numpy_one_ulp, _swap_rows, _cancelling_ulps])
def test_sees_writes_that_bypass_the_version_counter(write):
    model = tiny_model()
    stamp = weights_fingerprint(model)
    write(model[0].weight)
    assert weights_fingerprint(model) != stamp


def test_sees_cancelling_one_ulp_writes_to_a_bfloat16_buffer():
    """A typical bfloat16 step: a few elements move by one ulp, up or down in their bits."""
    model = tiny_model()
    model.register_buffer("scale", torch.ones(300, dtype=torch.bfloat16))
    stamp = weights_fingerprint(model)
    bits = model.scale.data.view(torch.int16)
    bits[7] += 1
    bits[200] -= 1
    assert weights_fingerprint(model) != stamp


def test_unchanged_when_nothing_is_written():
    model = tiny_model()
    stamp = weights_fingerprint(model)
    model(torch.randn(8, 64)).sum().backward()  # gradients are not weights
    with torch.no_grad():
        model(torch.randn(2, 64))
    model.zero_grad()
    assert weights_fingerprint(model) == stamp
    assert weights_fingerprint(tiny_model()) != stamp  # other tensors: another fingerprint


def test_engine_dtype_auto_is_the_compute_dtype():
    """``dtype: auto`` follows the compute dtype (autocast under ``bf16-mixed``), not the float32
    master weights (FSDP2's mixed-precision policy: see the sharded test)."""
    model = tiny_model()
    assert compute_dtype(model) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(model) == torch.bfloat16
    assert compute_dtype(model.to(torch.float16)) == torch.float16


# ---------------------------------------------------------------------- FSDP2: 2 ranks on CPU
def _worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lit_selfimprove.generation.vllm_backend import _changed_on_any_rank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = fully_shard(tiny_model(), mesh=init_device_mesh("cpu", (world,)))
    report = {"rank": rank, "dtype_fp32": str(compute_dtype(model))}
    stamp = weights_fingerprint(model)
    report["quiet"] = _changed_on_any_rank(weights_fingerprint(model) != stamp, model)
    if rank == 0:  # a raw write to rank 0's shard only
        model[0].weight.to_local().detach().numpy()[0, 0] += 1.0
    local = weights_fingerprint(model) != stamp
    report.update(local=local, agreed=_changed_on_any_rank(local, model))
    bf16 = fully_shard(tiny_model(), mesh=init_device_mesh("cpu", (world,)),
                       mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))  # fmt: skip
    report["dtype_mp_policy"] = str(compute_dtype(bf16))
    with open(f"rank{rank}.json", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def test_sharded_ranks_agree_on_a_write_to_one_shard(tmp_path):
    """Each rank checksums its own shard; the reload gathers on all ranks, so all must reload."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, __file__, str(port), str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path) for rank in (0, 1)]  # fmt: skip
    logs = [rank.communicate(timeout=300)[0] for rank in ranks]
    reports = sorted(
        (json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"]
    )
    assert [r.returncode for r in ranks] == [0, 0] and len(reports) == 2, "\n".join(
        log[-4000:] for log in logs
    )
    assert [r["quiet"] for r in reports] == [False, False]
    assert [r["local"] for r in reports] == [True, False]  # rank 1's shard was not written...
    assert [r["agreed"] for r in reports] == [True, True]  # ...and it reloads with rank 0
    assert {r["dtype_fp32"] for r in reports} == {"torch.float32"}
    assert {r["dtype_mp_policy"] for r in reports} == {"torch.bfloat16"}


if __name__ == "__main__":  # one rank: python tests/test_weights_fingerprint.py PORT RANK
    _worker(int(sys.argv[2]), 2, int(sys.argv[1]))
