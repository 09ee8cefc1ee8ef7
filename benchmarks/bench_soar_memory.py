"""Model copies, peak memory and time of one SOAR outer step (``configs/tiny/soar.yaml``): full
fine-tuning vs LoRA (``lora`` for the teacher, ``student_lora`` for the students)::

    python benchmarks/bench_soar_memory.py               # full, full-disk and lora, one outer step each
    python benchmarks/bench_soar_memory.py --modes full --src /path/to/older/checkout --label before

Modes: ``full`` (full fine-tuning, the config as it is), ``full-disk`` (``promotion:
keep_median_students: disk``: the kept median students are files) and ``lora`` (``memory:`` ``lora`` and
``student_lora``
``{r: 8, lora_alpha: 16, target_modules: all-linear}``). Results are merged into the JSON by label
(default: the mode's name).

Each mode runs in its own process through the package's CLI (``SelfImproveCLI(run=False)``) on the
config with one outer step, no checkpoint and only the ``Promotion`` callback. During the step the
distinct parameter storages held by the module are counted after every inner training (and at the
step's start and end), each attributed to the first role that holds it: the teacher, the working
student, the frozen references (``_frozen``: the teacher's KL reference, the inner KL reference),
the baseline snapshot of the inner trainings and the kept median-student copies. ``copies`` divides
a role's bytes by its model's (teacher or student) full size: a LoRA adapter is a small fraction.
``peak_rss_mb`` is the process's peak resident memory (``getrusage``: Python, torch and the
tokenizers included, so it moves little on the tiny models) and ``step_rss_growth_mb`` how much it
rose during the step. ``step_s`` is the wall time of the outer step (machine load matters).
Writes ``benchmarks/results/soar_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "soar.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "soar_memory.json"
LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
MODES = ["full", "full-disk", "lora"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def derived_config(mode: str, workdir: str, steps: int) -> str:
    cfg = yaml.safe_load(CONFIG.read_text())
    trainer = cfg["trainer"]
    trainer.update(max_steps=steps, val_check_interval=1000, enable_checkpointing=False)
    trainer["enable_progress_bar"] = False
    trainer["logger"]["init_args"]["save_dir"] = workdir
    trainer["callbacks"] = [cb for cb in trainer["callbacks"] if cb["class_path"].endswith("Promotion")]
    if mode == "lora":
        cfg["model"]["init_args"].setdefault("memory", {}).update(lora=dict(LORA), student_lora=dict(LORA))
    if mode == "full-disk":
        cfg["model"]["init_args"].setdefault("promotion", {})["keep_median_students"] = "disk"
    path = Path(workdir) / f"soar_{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def worker(mode: str, src: str, steps: int, threads: int) -> dict:
    sys.path.insert(0, src)
    import torch
    from lightning import Callback

    import lit_selfimprove
    import lit_selfimprove.loops.soar as soar_loops
    from lit_selfimprove.cli import SelfImproveCLI
    from lit_selfimprove.modules import soar_outer

    assert lit_selfimprove.__file__.startswith(src), lit_selfimprove.__file__
    torch.set_num_threads(threads)
    state: dict = {"module": None, "snapshot": None, "samples": []}

    def model_bytes(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def sample() -> None:
        module = state["module"]
        if module is None or module.teacher is None:
            return
        keeper = getattr(module, "median_keeper", None)
        roles = [
            ("teacher", list(module.teacher.parameters())),
            ("working student", list(module.student.parameters())),
        ]
        roles += [(f"frozen {k}", list(ref.parameters())) for k, ref in module._frozen.items()]
        roles.append(("baseline snapshot", list((state["snapshot"] or {}).values())))
        kept = [s for s in (keeper.states.values() if keeper else []) if isinstance(s, dict)]  # not files
        roles.append(("median copies", [t for s in kept for t in s.values()]))
        seen: set[int] = set()
        row = {}
        for role, tensors in roles:
            total = 0
            for t in tensors:
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            row[role] = total
        state["samples"].append(row)

    grounded = soar_loops.grounded_rewards

    def probed_grounded(*args, **kwargs):
        state["snapshot"] = kwargs["snapshot"]  # the module passes it by name
        try:
            return grounded(*args, **kwargs)
        finally:
            sample()
            state["snapshot"] = None

    soar_loops.grounded_rewards = probed_grounded
    offer = soar_outer.MedianStudents.offer

    def probed_offer(self, *args, **kwargs):
        out = offer(self, *args, **kwargs)
        sample()
        return out

    soar_outer.MedianStudents.offer = probed_offer
    times: list[float] = []
    rss: dict = {}

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state["module"] = pl_module
            rss.setdefault("before_step_mb", rss_mb())
            sample()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.t0)
            sample()

    workdir = tempfile.mkdtemp(prefix="bench-soar-memory-")
    cli = SelfImproveCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        run=False,
        args=[f"--config={derived_config(mode, workdir, steps)}", f"--trainer.default_root_dir={workdir}"],
    )
    cli.trainer.callbacks.insert(0, Probe())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    module = cli.model
    sizes = {"teacher": model_bytes(module.teacher), "student": model_bytes(module.student)}
    if hasattr(module.teacher, "get_base_model"):  # LoRA: the full size is the base model's
        sizes = {k: model_bytes(getattr(module, k).get_base_model()) for k in sizes}
    roles = sorted({r for row in state["samples"] for r in row}, key=list(state["samples"][0]).index)
    peak = {r: max(row.get(r, 0) for row in state["samples"]) for r in roles}
    copies = {
        r: peak[r] / sizes["teacher" if "teacher" in r or r == "frozen ref" else "student"] for r in roles
    }
    total = max(sum(row.values()) for row in state["samples"])
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    return {
        "mode": mode,
        "src": src,
        "model_mb": {k: v / 2**20 for k, v in sizes.items()},
        "peak_mb_by_role": {r: peak[r] / 2**20 for r in roles},
        "copies_by_role": copies,
        "full_copies": sum(c for c in copies.values() if c >= 0.5),
        "peak_params_mb": total / 2**20,
        "peak_rss_mb": maxrss,
        "step_rss_growth_mb": maxrss - rss["before_step_mb"],
        "step_s": times,
        "keeper_peak": getattr(getattr(module, "median_keeper", None), "peak", None),
        "metrics": metrics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--label", help="the results' name in the JSON (one mode; default: the mode)")
    parser.add_argument("--src", default=str(REPO), help="the source tree to import lit_selfimprove from")
    parser.add_argument("--steps", type=int, default=1, help="outer steps per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.src, args.steps, args.threads)))
        return
    results = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--worker", mode, "--src", args.src, "--steps", str(args.steps),
               "--threads", str(args.threads)]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        r = results[-1]
        r["label"] = args.label or mode
        print(
            f"{r['label']:9s} full copies {r['full_copies']:.2f}  params peak {r['peak_params_mb']:.1f} MB  "
            f"peak RSS {r['peak_rss_mb']:.0f} MB (+{r['step_rss_growth_mb']:.0f} in the step)  "
            f"step {r['step_s'][0]:.1f} s  roles {json.dumps({k: round(v, 3) for k, v in r['copies_by_role'].items()})}"
        )
    out = Path(args.out)
    if out.exists():  # merge: keep the other labels' results
        labels = {r["label"] for r in results}
        results = [
            r for r in json.loads(out.read_text())["results"] if r.get("label") not in labels
        ] + results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"config": str(CONFIG.relative_to(REPO)), "lora": LORA, "results": results}, indent=2)
    )
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
