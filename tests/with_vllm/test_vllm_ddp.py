"""The vLLM backend under DDP and FSDP2: one engine per rank, 2 gloo processes on CPU.

Run as a script, this file is the worker: each rank samples greedily with its own engine and with
the built-in sampler, takes a data-parallel optimizer step (gradients all-reduced over the trainer's
process group; FSDP2: sharded weights gathered for each reload), samples again, then shuts its engine down and all-reduces once more: vLLM joins the
trainer's process group and must leave it working.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (see tests/with_vllm/test_vllm_backend.py)")


def _worker(rank: int, world: int, port: int, mode: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from lit_selfimprove.generation import (
        BuiltinSampler,
        GenerationConfig,
        attach_backend,
        detach_backend,
        generate,
    )
    from lit_selfimprove.modeling import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm("builtin:tiny-student"), load_tokenizer("builtin:tiny-student")
    prompts = [f"Q: {12 + 11 * rank}+{34 + rank}\nA: ", "Q: 250+250\nA: "]
    report = {"rank": rank}

    def sample(m) -> list[str]:
        return generate(m, tok, prompts, num_samples=2, max_new_tokens=40, temperature=0.0).texts

    def builtin(m) -> list[str]:
        if mode == "ddp":
            return sample(copy.deepcopy(model))  # copies sample with the built-in sampler
        attach_backend(m, BuiltinSampler())  # FSDP2: the sharded model itself (replaces the engine)
        texts = sample(m)
        attach_backend(m, engine)
        return texts

    if mode == "fsdp2":  # every decoder layer and the root sharded over the 2 ranks
        from torch.distributed.device_mesh import init_device_mesh

        from lit_selfimprove.modeling import shard_model

        shard_model(model, init_device_mesh("cpu", (world,)))
    engine = attach_backend(model, GenerationConfig(backend="vllm"))
    report["vllm_before"] = sample(model)
    report["builtin_before"] = builtin(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tok([f"Q: {rank}+1\nA: \\boxed{{{rank + 1}}}"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    if mode == "ddp":  # (FSDP2 reduce-scatters the gradients itself)
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
    opt.step()
    syncs = engine.syncs
    report["vllm_after"] = sample(model)  # the engine reloads the stepped weights by itself
    report["reloaded_after_step"] = engine.syncs - syncs
    report["builtin_after"] = builtin(model)
    detach_backend(model)  # engine shut down: the trainer's process group must survive it
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    report["all_reduce_after_close"] = total.item()
    with open(f"rank{rank}.json", "w") as f:  # (stdout lines of the two ranks can interleave)
        json.dump(report, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_one_engine_per_rank(mode, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(port), mode], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)  # fmt: skip
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert proc.returncode == 0 and len(reports) == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
    for r in sorted(reports, key=lambda r: r["rank"]):
        assert r["vllm_before"] == r["builtin_before"], r
        assert r["vllm_after"] == r["builtin_after"], r  # each rank's engine has the stepped weights
        assert r["vllm_after"] != r["vllm_before"], r  # and the step changed what it writes
        assert r["reloaded_after_step"] == 1
        assert r["all_reduce_after_close"] == 3.0
    assert reports[0]["vllm_before"][0] != reports[1]["vllm_before"][0]  # ranks sampled their own prompts


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
