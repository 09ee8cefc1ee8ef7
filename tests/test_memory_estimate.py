"""The per-GPU memory estimate: its arithmetic against numbers worked out by hand."""

from __future__ import annotations

import pytest

from lit_selfimprove.memory_estimate import KNOWN_ARCHITECTURES, estimate, main, resolve_architecture
from tests.helpers import REPO

GIB = 2**30
LLAMA_3B = "meta-llama/Llama-3.2-3B-Instruct"
N_3B = 3_212_749_824  # Llama-3.2-3B's parameter count (hub model card / safetensors index)


def test_parameter_counts_and_kv_bytes():
    # 3B: tied embeddings 128256 x 3072 + 28 x (q 3072^2 + k, v 2 x 3072 x 1024 + o 3072^2 + MLP 3 x 3072 x 8192
    # + 2 norms of 3072) + the final norm
    assert 128256 * 3072 + 28 * (2 * 3072**2 + 2 * 3072 * 1024 + 3 * 3072 * 8192 + 2 * 3072) + 3072 == N_3B
    assert KNOWN_ARCHITECTURES[LLAMA_3B].num_params == N_3B
    assert KNOWN_ARCHITECTURES["meta-llama/Llama-3.1-8B-Instruct"].num_params == 8_030_261_248
    # keys + values x 28 layers x 8 KV heads x 128 x 2 bytes (bfloat16)
    assert KNOWN_ARCHITECTURES[LLAMA_3B].kv_bytes_per_token(2) == 114_688


def test_a_local_config_json_is_read(tmp_path):
    """``builtin:`` and local folders: the architecture comes from their config.json."""
    from lit_selfimprove.generation.sampler import kv_bytes_per_token
    from lit_selfimprove.modeling import load_causal_lm

    arch = resolve_architecture("builtin:tiny-student", {})
    model = load_causal_lm("builtin:tiny-student")
    assert arch.num_params == sum(p.numel() for p in model.parameters())
    assert arch.kv_bytes_per_token(4) == kv_bytes_per_token(model, lean=True)  # the sampler's own sizing
    assert resolve_architecture("builtin:tiny-student", {"layers": 8}).layers == 8  # overrides win
    with pytest.raises(SystemExit, match="--layers --hidden --heads --intermediate --vocab"):
        resolve_architecture("someone/unknown-model", {})


def _rlvr_config(**rl) -> dict:
    return {
        "trainer": {"devices": 8, "precision": "bf16-mixed",
                    "strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}},
        "model": {"class_path": "lit_selfimprove.modules.StudentRLVR",
                  "init_args": {"model": LLAMA_3B, "dtype": "bfloat16",
                                "rl": {"group_size": 32, "max_new_tokens": 1024, "kl_coef": 0.001, **rl}}},
        "data": {"init_args": {"batch_size": 8}},
    }  # fmt: skip


def test_rlvr_arithmetic_by_hand():
    out = estimate(_rlvr_config(), prompt_tokens=256)
    gib = {item.what: item.gib for item in out["items"]}
    # FSDP over 8 ranks: float32 weights and gradients 4 bytes, AdamW 8, the bf16 reference 2, each / 8
    assert gib[f"policy ({LLAMA_3B}): weights"] == pytest.approx(N_3B * 4 / 8 / GIB)
    assert gib[f"policy ({LLAMA_3B}): weights"] == pytest.approx(1.49605, abs=1e-5)
    assert gib["policy: gradients"] == pytest.approx(1.49605, abs=1e-5)
    assert gib["policy: AdamW states"] == pytest.approx(2.99210, abs=1e-5)
    assert gib[f"KL reference ({LLAMA_3B}): weights"] == pytest.approx(0.74803, abs=1e-5)
    assert len(gib) == 4
    (rollouts,) = out["generations"]
    # 8 x 32 = 256 rows of 256 + 1024 positions at 114,688 bytes: 146,800,640 bytes a row; 4 GiB
    # holds 29 of them: ceil(256 / 29) = 9 micro-batches of ceil(256 / 9) = 29 rows
    assert (rollouts["call"].rows, rollouts["micro_batches"], rollouts["micro_batch_rows"]) == (256, 9, 29)
    assert rollouts["kv_gib"] == pytest.approx(29 * 146_800_640 / GIB) == pytest.approx(3.96484, abs=1e-5)
    assert rollouts["one_batch_kv_gib"] == pytest.approx(35.0)  # what one batch would have taken
    assert rollouts["logits_gib"] == pytest.approx(29 * 128256 * (2 + 4) / GIB)  # bf16 logits + fp32 softmax
    states = 1.49605 + 2.99210 + 0.74803
    assert out["phases"]["generation"] == pytest.approx(states + 3.96484 + 0.02078, abs=1e-4)
    assert out["phases"]["update"] == pytest.approx(states + 1.49605, abs=1e-4)
    # the sampler's settings change the micro-batches
    small = estimate(_rlvr_config(), prompt_tokens=256, max_batch_rows=64)["generations"][0]
    assert (small["micro_batches"], small["micro_batch_rows"]) == (4, 64)
    half = estimate(_rlvr_config(), prompt_tokens=256, max_batch_kv_gb=2.0)["generations"][0]
    assert (half["micro_batches"], half["micro_batch_rows"]) == (19, 14)  # 14 fit: ceil(256 / 14) = 19


def test_soar_math_by_hand(capsys):
    import yaml

    config = yaml.safe_load((REPO / "configs/paper/soar_math.yaml").read_text())
    out = estimate(config)
    whole = N_3B / GIB
    # teacher sharded over 8 (weights 4, AdamW 8, bf16 KL reference 2); the student whole on every GPU
    # (weights 4, AdamW 8) and its float32 snapshot (4)
    resident = whole * (4 + 8 + 2) / 8 + whole * (4 + 8) + whole * 4
    assert resident == pytest.approx(53.11, abs=0.01)
    student_grads = whole * 4
    assert (
        out["phases"]["update"] == pytest.approx(resident + student_grads) == pytest.approx(65.08, abs=0.01)
    )
    inner = next(g for g in out["generations"] if g["call"].what == "inner RLVR rollouts")
    assert inner["micro_batch_rows"] == 29 and inner["micro_batches"] == 9
    peak_gen = max(g["kv_gib"] + g["logits_gib"] for g in out["generations"])
    assert out["phases"]["generation"] == pytest.approx(resident + peak_gen)
    assert main([str(REPO / "configs/paper/soar_math.yaml"), "--gpus", "40,80,141"]) == 0
    printed = capsys.readouterr().out
    assert "40 GB does NOT fit, 80 GB fits, 141 GB fits" in printed  # 65.1 GiB <= 90% of 80 GB (67.1 GiB)
    assert "9 micro-batch(es) of <= 29 rows: KV cache 3.96 GiB (one batch: 35.00)" in printed


def test_every_paper_config_is_estimated(capsys):
    paths = sorted(str(p) for p in (REPO / "configs/paper").glob("*.yaml"))
    assert main(paths) == 0
    printed = capsys.readouterr().out
    assert printed.count("peak: ") == len(paths) and "AdamW states" in printed
    assert printed.count("peak: generation") == len(paths) - 1  # NextTokenLM samples nothing
