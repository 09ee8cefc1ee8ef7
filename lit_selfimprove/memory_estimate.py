"""How much GPU memory a config needs per GPU, before launching it.

    python -m lit_selfimprove.memory_estimate configs/paper/soar_math.yaml
    python -m lit_selfimprove.memory_estimate my.yaml --layers 28 --hidden 3072 --heads 24 --kv-heads 8 \\
        --intermediate 8192 --vocab 128256 --tie-embeddings

The arithmetic, per GPU (GiB = 2**30 bytes):

- a trained model under ``bf16-mixed`` keeps float32 master weights (4 bytes a parameter), float32
  gradients (4, freed by ``zero_grad(set_to_none=True)`` before the next generation) and AdamW's two
  float32 states (8); FSDP (``ModelParallelStrategy`` / ``FSDPStrategy``) divides the three by the
  number of ranks (Lightning's autocast runs with ``cache_enabled=False``: no cached bf16 weight copies);
- frozen models (KL / DPO references) take the ``dtype`` setting's bytes a parameter, sharded like the
  trained model they belong to (SOAR's inner KL reference is whole, as its students are);
- SOAR restores its student from a float32 snapshot of its weights after each inner training (4);
- generation (the built-in sampler): a micro-batch of ``rows`` rows keeps, per row and position
  (prompt + new tokens), keys and values of every layer in the compute dtype,
  ``2 * layers * kv_heads * head_dim * bytes``, and the next-token logits of the last position only
  (``rows * vocab`` in the compute dtype, plus their float32 softmax). Its rows are those that fit the
  sampler's KV budget (``generation.max_batch_rows`` / ``max_batch_kv_gb``), as the sampler sizes them.

Two phases peak: generation (weights, optimizer states, copies and the largest micro-batch's cache)
and an update (weights, optimizer states, copies and the gradients of the model being updated;
activations are not estimated). A GPU
"fits" when the larger phase takes at most ``--usable`` (default 90%) of it: the rest is for
activations, the CUDA context and fragmentation. Hub models cannot be downloaded here: their
architectures come from ``KNOWN_ARCHITECTURES`` (copied from their config.json files), a local folder's
config.json, or the command-line overrides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, replace

import yaml

from lit_selfimprove.generation.backend import DEFAULT_MAX_BATCH_KV_GB

__all__ = ["Architecture", "KNOWN_ARCHITECTURES", "estimate", "main"]

GIB = 2**30
GPU_SIZES_GB = (24, 40, 80, 141)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2, None: 2}
DEFAULT_PROMPT_TOKENS = 256  # a chat-templated math question


@dataclass(frozen=True)
class Architecture:
    """A Llama-like decoder's sizes (what the estimate needs of a config.json)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    params: int | None = None  # counted from the sizes when not given

    @classmethod
    def of(cls, layers, hidden, heads, intermediate, vocab, kv_heads=None, head_dim=None,
           tie_embeddings=False, params=None) -> Architecture:  # fmt: skip
        """An architecture whose unset ``kv_heads`` / ``head_dim`` take the usual defaults
        (multi-head attention, ``hidden // heads``), as transformers' configs do."""
        return cls(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads or heads,
                   head_dim=head_dim or hidden // heads, intermediate=intermediate, vocab=vocab,
                   tie_embeddings=bool(tie_embeddings), params=params)  # fmt: skip

    @property
    def num_params(self) -> int:
        """Parameters of a Llama-architecture model: embeddings (+ an untied head), per layer the
        q/k/v/o projections, the gated MLP and two norms, and the final norm."""
        if self.params is not None:
            return self.params
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return embeddings + self.layers * layer + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of every layer for one row and position."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# From the models' config.json on the Hugging Face hub (not downloaded here: copied by hand).
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    "meta-llama/Llama-3.2-1B-Instruct": Architecture(16, 2048, 32, 8, 64, 8192, 128256, True),
    "meta-llama/Llama-3.2-3B-Instruct": Architecture(28, 3072, 24, 8, 128, 8192, 128256, True),
    "meta-llama/Llama-3.1-8B-Instruct": Architecture(32, 4096, 32, 8, 128, 14336, 128256, False),
    "princeton-nlp/Sheared-LLaMA-1.3B": Architecture(24, 2048, 16, 16, 128, 5504, 32000, False),
}
for _name in list(KNOWN_ARCHITECTURES):  # the base models share their instruct versions' sizes
    KNOWN_ARCHITECTURES.setdefault(_name.removesuffix("-Instruct"), KNOWN_ARCHITECTURES[_name])


def architecture_from_config_json(path: str) -> Architecture:
    """An :class:`Architecture` from a transformers config.json (a file or its folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    return Architecture.of(
        layers=cfg["num_hidden_layers"],
        hidden=cfg["hidden_size"],
        heads=cfg["num_attention_heads"],
        intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"],
        kv_heads=cfg.get("num_key_value_heads"),
        head_dim=cfg.get("head_dim"),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
    )


def resolve_architecture(model: str, overrides: dict) -> Architecture:
    """The architecture of ``model`` (hub id, local folder, ``builtin:NAME``) with ``overrides``."""
    arch = None
    if model.startswith("builtin:"):
        from lit_selfimprove.assets import resolve

        model = resolve(model)
    if os.path.exists(os.path.join(model, "config.json")):
        arch = architecture_from_config_json(model)
    elif model in KNOWN_ARCHITECTURES:
        arch = KNOWN_ARCHITECTURES[model]
    if arch is None:
        fields = ("layers", "hidden", "heads", "intermediate", "vocab")
        missing = [f"--{f.replace('_', '-')}" for f in fields if overrides.get(f) is None]
        if missing:
            raise SystemExit(
                f"unknown architecture {model!r}: not a folder with a config.json nor one of "
                f"{sorted(KNOWN_ARCHITECTURES)}; give its sizes: {' '.join(missing)} (and --kv-heads, "
                "--head-dim, --tie-embeddings where they differ from the defaults)"
            )
        names = (*fields, "kv_heads", "head_dim", "tie_embeddings", "params")
        arch = Architecture.of(**{f: overrides.get(f) for f in names})
    return replace(arch, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Item:
    """One line of the estimate: ``count`` parameters (or rows) at ``bytes_each``, in a phase."""

    what: str
    gib: float
    phases: tuple[str, ...] = ("generation", "update")


@dataclass
class Generation:
    """One sampling call: ``rows`` (prompts x samples) of ``prompt`` + ``new`` tokens."""

    what: str
    model: str
    rows: int
    prompt: int
    new: int


def _world(trainer: dict) -> tuple[int, bool]:
    """``(ranks, sharded)``: how many ranks, and whether the trained model is FSDP-sharded over them."""
    devices = trainer.get("devices", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    ranks = devices * (trainer.get("num_nodes") or 1)
    strategy = trainer.get("strategy")
    name = strategy if isinstance(strategy, str) else (strategy or {}).get("class_path", "")
    return ranks, any(s in str(name).lower() for s in ("modelparallel", "fsdp"))


def micro_batch_rows(rows: int, length: int, per_token: int, max_rows: int | None, budget_gb: float) -> int:
    """The rows of the sampler's largest micro-batch (``BuiltinSampler.rows_per_batch`` and ``_split``)."""
    per_batch = (
        min(rows, max_rows) if max_rows else max(1, min(rows, int(budget_gb * GIB // (per_token * length))))
    )
    count = math.ceil(rows / per_batch)
    return math.ceil(rows / count)


def _plan(config: dict, prompt_tokens: int | None) -> tuple[list[tuple[str, str, str]], list[Generation]]:
    """The models of a config's module (``(role, hub id, how held)``, how held being ``trained`` or
    ``frozen`` (both FSDP-sharded under FSDP), ``trained-whole`` / ``frozen-whole`` (never sharded: SOAR's
    students) or ``snapshot``) and its sampling calls."""
    model = config.get("model", {})
    cls = model.get("class_path", "").rsplit(".", 1)[-1]
    a = model.get("init_args", {})
    data = (config.get("data") or {}).get("init_args", {})
    p = prompt_tokens or DEFAULT_PROMPT_TOKENS
    if cls == "TeacherMetaRL":
        inner = a.get("inner", {})
        models = [("teacher", a["teacher"], "trained"), ("student", a["student"], "trained-whole"),
                  ("student snapshot", a["student"], "snapshot")]  # fmt: skip
        if inner.get("kl_coef", 0.0) > 0:
            models.append(("student KL reference", a["student"], "frozen-whole"))
        if (a.get("teacher_update") or {}).get("kl_coef", 0.0) > 0:
            models.append(("teacher KL reference", a["teacher"], "frozen"))
        calls = [
            Generation("teacher questions", "teacher", a.get("num_datasets", 4) * a.get("dataset_size", 64), p,
                       (a.get("teacher_sampling") or {}).get("max_new_tokens", 512)),
            Generation("inner RLVR rollouts", "student", inner.get("batch", 8) * inner.get("group_size", 32), p,
                       inner.get("max_new_tokens", 1024)),
            Generation("Q_R greedy evaluation", "student", a.get("eval_batch_size") or data.get("batch_size", 64), p,
                       inner.get("max_new_tokens", 1024)),
        ]  # fmt: skip
        return models, calls
    if cls == "StudentRLVR":
        rl = a.get("rl", {})
        models = [("policy", a["model"], "trained")]
        if rl.get("kl_coef", 0.001) > 0:
            models.append(("KL reference", a["model"], "frozen"))
        new = rl.get("max_new_tokens", 256)
        calls = [
            Generation("RLVR rollouts", "policy", data.get("batch_size", 1) * rl.get("group_size", 8), p, new)
        ]
        if a.get("val_num_samples"):
            rows = data.get("val_batch_size", data.get("batch_size", 1)) * a["val_num_samples"]
            calls.append(Generation("validation samples", "policy", rows, p, new))
        return models, calls
    if cls == "SuffixPolicyDPO":
        models = [("policy", a["model"], "trained")]
        if (a.get("objective") or {}).get("loss", "dpo") == "dpo":
            models.append(("DPO reference", a["model"], "frozen"))
        suffix = data.get("suffix_tokens", 128)
        prefix = prompt_tokens or data.get("context_length", 2048) - suffix
        rows = data.get("batch_size", 1) * (a.get("candidates") or {}).get("num_rollouts", 1)
        return models, [Generation("suffix rollouts", "policy", rows, prefix, suffix)]
    if "model" in a:  # NextTokenLM and the like: one trained model, no sampling
        return [("model", a["model"], "trained")], []
    raise SystemExit(f"{cls or 'this config'}: no model to estimate (model.init_args has no 'model')")


def estimate(config: dict, overrides: dict | None = None, prompt_tokens: int | None = None,
             max_batch_rows: int | None = None, max_batch_kv_gb: float | None = None) -> dict:  # fmt: skip
    """The per-GPU estimate of a parsed config: ``{"items": [Item], "generations": [...], "phases":
    {"generation": GiB, "update": GiB}, "ranks": int, "sharded": bool}``."""
    overrides = overrides or {}
    trainer = config.get("trainer", {}) or {}
    init = config.get("model", {}).get("init_args", {})
    ranks, sharded = _world(trainer)
    mixed = "mixed" in str(trainer.get("precision", "32"))
    compute = 2 if mixed or str(trainer.get("precision", "")).startswith(("bf16", "16")) else 4
    dtype = init.get("dtype") or (init.get("memory") or {}).get("dtype")  # TeacherMetaRL: memory.dtype
    frozen_bytes = DTYPE_BYTES.get(dtype, 2) if mixed else compute
    generation = init.get("generation") or {}
    max_rows = max_batch_rows if max_batch_rows is not None else generation.get("max_batch_rows")
    budget = max_batch_kv_gb or generation.get("max_batch_kv_gb") or DEFAULT_MAX_BATCH_KV_GB
    models, calls = _plan(config, prompt_tokens)
    arch = {role: resolve_architecture(name, overrides) for role, name, _ in models}
    items: list[Item] = []
    for role, name, held in models:
        n = arch[role].num_params
        shards = ranks if sharded and not held.endswith("-whole") else 1
        if held.startswith("trained"):
            master = 4 if mixed else compute
            items.append(Item(f"{role} ({name}): weights", n * master / shards / GIB))
            items.append(Item(f"{role}: gradients", n * master / shards / GIB, ("update",)))
            items.append(Item(f"{role}: AdamW states", n * 8 / shards / GIB))
        elif held == "snapshot":
            items.append(Item(f"{role}: float32 copy", n * 4 / GIB))
        else:
            items.append(Item(f"{role} ({name}): weights", n * frozen_bytes / shards / GIB))
    gens = []
    for call in calls:
        a = arch[call.model]
        per_token = a.kv_bytes_per_token(compute)
        length = call.prompt + call.new
        rows = micro_batch_rows(call.rows, length, per_token, max_rows, budget)
        gens.append(
            {
                "call": call,
                "micro_batch_rows": rows,
                "micro_batches": math.ceil(call.rows / rows) if rows else 0,
                "kv_gib": rows * length * per_token / GIB,
                "logits_gib": rows * a.vocab * (compute + 4) / GIB,
                "one_batch_kv_gib": call.rows * length * per_token / GIB,
            }
        )
    peak_gen = max((g["kv_gib"] + g["logits_gib"] for g in gens), default=0.0)
    # gradients exist during one model's update (zero_grad(set_to_none=True) frees them after it)
    grads = [i.gib for i in items if i.phases == ("update",)]
    phases = {
        "generation": sum(i.gib for i in items if "generation" in i.phases) + peak_gen,
        "update": sum(i.gib for i in items if i.phases != ("update",)) + max(grads, default=0.0),
    }
    return {"items": items, "generations": gens, "phases": phases, "ranks": ranks, "sharded": sharded}


def fits(total_gib: float, gpu_gb: float, usable: float) -> bool:
    """Whether ``total_gib`` fits in ``usable`` of a ``gpu_gb`` GB card (GB as vendors count them)."""
    return total_gib <= gpu_gb * 1e9 / GIB * usable


def format_estimate(path: str, result: dict, gpus: tuple[float, ...], usable: float) -> str:
    lines = [
        f"{path}: per GPU ({result['ranks']} ranks{', trained models FSDP-sharded' if result['sharded'] else ''})"
    ]
    for item in result["items"]:
        phase = "" if len(item.phases) == 2 else f"  [{item.phases[0]} only]"
        lines.append(f"  {item.gib:8.2f} GiB  {item.what}{phase}")
    for g in result["generations"]:
        c = g["call"]
        lines.append(
            f"  generation: {c.what} ({c.model}): {c.rows} rows x ({c.prompt} prompt + {c.new} new tokens) in "
            f"{g['micro_batches']} micro-batch(es) of <= {g['micro_batch_rows']} rows: KV cache {g['kv_gib']:.2f} GiB"
            f" (one batch: {g['one_batch_kv_gib']:.2f}), last-position logits {g['logits_gib']:.2f} GiB"
        )
    gen, upd = result["phases"]["generation"], result["phases"]["update"]
    sampling = f"generation {gen:.2f} GiB, " if result["generations"] else ""
    lines.append(f"  peak: {sampling}update {upd:.2f} GiB (+ activations, not estimated)")
    peak = max(gen, upd)
    verdict = ", ".join(f"{gb:g} GB {'fits' if fits(peak, gb, usable) else 'does NOT fit'}" for gb in gpus)
    lines.append(f"  {verdict} (at most {usable:.0%} of the card)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lit_selfimprove.memory_estimate",
        description="Per-GPU memory a config needs: weights, gradients, AdamW states, copies, KV cache "
        "and logits of the built-in sampler's micro-batches, and which GPUs it fits.",
    )
    p.add_argument("configs", nargs="+", help="config YAML files (e.g. configs/paper/*.yaml)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help=f"prompt length of the sampling calls (default {DEFAULT_PROMPT_TOKENS}; SIP: "
                        "context_length - suffix_tokens)")  # fmt: skip
    p.add_argument("--max-batch-rows", type=int, default=None, help="generation.max_batch_rows to assume")
    p.add_argument("--max-batch-kv-gb", type=float, default=None, help="generation.max_batch_kv_gb to assume")
    p.add_argument(
        "--gpus", default=",".join(map(str, GPU_SIZES_GB)), help="GPU sizes in GB, comma-separated"
    )
    p.add_argument("--usable", type=float, default=0.9, help="share of a GPU the estimate may fill")
    for name in ("params", "layers", "hidden", "heads", "kv-heads", "head-dim", "intermediate", "vocab"):
        p.add_argument(
            f"--{name}", type=int, default=None, help="architecture override (every model of the config)"
        )
    p.add_argument("--tie-embeddings", action="store_true", default=None, help="architecture override")
    args = p.parse_args(argv)
    keys = (
        "params",
        "layers",
        "hidden",
        "heads",
        "kv_heads",
        "head_dim",
        "intermediate",
        "vocab",
        "tie_embeddings",
    )
    overrides = {k: getattr(args, k) for k in keys}
    gpus = tuple(float(x) for x in args.gpus.split(","))
    out = []
    for path in args.configs:
        with open(path) as f:
            config = yaml.safe_load(f)
        result = estimate(config, overrides, args.prompt_tokens, args.max_batch_rows, args.max_batch_kv_gb)
        out.append(format_estimate(path, result, gpus, args.usable))
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
