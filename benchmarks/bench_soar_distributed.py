"""Wall time of SOAR's outer step with its inner trainings spread over two ranks vs one process.

    python benchmarks/bench_soar_distributed.py                      # the test's tiny model, 1 round
    python benchmarks/bench_soar_distributed.py --model PATH --rounds 3

Runs ``tests/_dist_soar_script.py`` (the setting of ``tests/test_soar_distributed.py``: 2 outer
steps, each with g*r = 8 inner trainings of 16 RLVR steps; by default on the test's random 2-layer
Llama as teacher and student) with the launcher of ``tests/_launch.py``, once as one process (all 8
trainings) and once as two DDP gloo ranks on CPU (4 each), one torch thread per process; each round
alternates which goes first. The time of an outer step is Lightning's
``on_train_batch_start`` -> ``on_train_batch_end``, for two ranks that of the slower one. ``ratio`` is
the two ranks' time over one process's, summed over the outer steps: at best a little over 0.5 (the
rest of an outer step is not spread), and closer to 1 when other jobs share the cores; the load
average before and after each run is recorded for that reason.

Writes ``benchmarks/results/soar_distributed.json`` and prints the ratio of each round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "_dist_soar_script.py"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "soar_distributed.json"
if str(REPO) not in sys.path:  # tests._launch, from a checkout
    sys.path.insert(0, str(REPO))


def build_test_model(out_dir: Path) -> str:
    """The random 2-layer Llama of ``tests/conftest.py::tiny_random_lm`` (untied embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_selfimprove.modeling import load_tokenizer

    tok = load_tokenizer("builtin:tiny-tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def run(mode: str, model: str, out: Path, timeout_s: float) -> dict:
    """One run of the script: the outer-step times (slowest rank) and the load around it."""
    from tests._launch import run_ranks

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    ranks = run_ranks(SCRIPT, [mode, model], out, timeout_s, ranks=1 if mode == "single" else 2)
    return {
        "step_times_s": [max(steps) for steps in zip(*(r["step_times"] for r in ranks))],
        "inner_trainings_per_rank": [len(r["jobs"]) for r in ranks],
        "process_wall_s": time.perf_counter() - t0,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="teacher and student (default: the test's tiny model)")
    p.add_argument("--rounds", type=int, default=1, help="single + ddp runs, alternating the order")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)

    import torch

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_test_model(Path(tmp) / "model")
        for i in range(args.rounds):
            result = {}
            for mode in ("single", "ddp") if i % 2 == 0 else ("ddp", "single"):
                out = Path(tmp) / f"{mode}_{i}"
                out.mkdir()
                result[mode] = run(mode, model, out, args.timeout)
            result["ratio"] = sum(result["ddp"]["step_times_s"]) / sum(result["single"]["step_times_s"])
            print(
                f"round {i}: 1 process {sum(result['single']['step_times_s']):.1f} s, 2 ranks "
                f"{sum(result['ddp']['step_times_s']):.1f} s for the outer steps: ratio {result['ratio']:.2f}"
            )
            rounds.append(result)
    report = {
        "what": "outer-step wall time, 2 DDP ranks / 1 process (tests/_dist_soar_script.py)",
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "rounds": rounds,
        "model": args.model or "tests/conftest.py::tiny_random_lm",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"ratio (median of {len(rounds)} rounds): {report['ratio_median']:.2f} -> {args.out}")
    return report


if __name__ == "__main__":
    main()
