"""FSDP2 over a LoRA (peft) model on 2 gloo ranks (CPU): every decoder layer is its own FSDP unit.

Under a peft model the decoder layers sit one level deeper (``PeftModel.base_model.model.model.layers``);
a lookup that misses them shards only the root, and every forward then all-gathers the whole model.
``tests/_dist_lora_script.py`` runs in a subprocess (this pytest process never initialises
torch.distributed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._launch import run_ranks

pytest.importorskip("peft", reason="LoRA needs peft: pip install 'lit-selfimprove[gpu]'")

SCRIPT = Path(__file__).with_name("_dist_lora_script.py")
TIMEOUT_S = 240  # ~10 s alone; a hang fails instead of blocking CI


def test_fsdp2_shards_every_decoder_layer_of_a_lora_model(tiny_random_lm, tmp_path):
    import torch

    ranks = run_ranks(SCRIPT, [tiny_random_lm], tmp_path, TIMEOUT_S)
    for r, res in enumerate(ranks):
        assert res["rank"] == r
        assert res["layers"] == 2  # the tiny model's decoder layers, found under the peft wrapper
        assert res["layers_sharded"] == 2 and res["root_sharded"]
        assert len(res["fsdp_modules"]) == 3, res["fsdp_modules"]  # 2 layers + the root
        # forward / backward work sharded and match the unsharded model
        assert res["loss"] == pytest.approx(res["loss_plain"], abs=1e-5)
        assert res["trainable"] and all("lora_" in n for n in res["trainable"])
        grads, plain = res["grads"], res["grads_plain"]
        assert set(grads) == set(plain) == set(res["trainable"])
        assert any(g.abs().max() > 0 for g in grads.values())
        assert all(torch.allclose(grads[n], plain[n], atol=1e-5) for n in grads)
        assert res["ref_logits_diff"] < 1e-5  # the adapters-disabled reference runs sharded too
