"""One or two CPU processes of ``TeacherMetaRL`` (SOAR's outer loop), for ``tests/test_soar_distributed.py``.

Usage: ``python tests/_dist_soar_script.py {single|ddp|fsdp2|broadcast} MODEL_DIR OUT_DIR``
(``broadcast``: :func:`~lit_selfimprove.distributed.broadcast_state` alone, two spawned gloo
ranks). Lightning's launcher re-runs this file for rank 1. The same 8 teacher texts are used in every mode (with two
ranks, rank r writes texts 4r..4r+3), and Q_R is always all 8 problems of a fixed set, so the g
datasets, Q_R and the per-training RNG streams are the same whatever the number of ranks. Each
rank saves ``OUT_DIR/rank{r}.pt``: full teacher and student weights, the rewards of each outer
step, the inner trainings it ran (outer step, training index, wall-clock start and end) and the
wall time of each outer step (``benchmarks/bench_soar_distributed.py`` compares those).
"""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path

import torch
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from lit_selfimprove.callbacks import Promotion
from lit_selfimprove.datamodules.arithmetic import (
    TINY_TEACHER_PROMPT,
    ArithmeticProblemDataModule,
    teacher_text,
)
from lit_selfimprove.loops import soar as soar_loops
from lit_selfimprove.modules.soar_settings import InnerConfig
from lit_selfimprove.modules.teacher_meta_rl import TeacherMetaRL
from tests._launch import full_weights
from tests.helpers import rollouts_from_texts

STEPS, G, N, R = 2, 2, 4, 4
# dataset 0 teaches the digit 1, dataset 1 the digit 7: they help on different Q_R problems
TEXTS = [
    teacher_text(f"{a}+{b}", str(a + b))
    for a, b in [(5, 6), (10, 1), (4, 7), (2, 9), (70, 7), (33, 44), (7, 70), (50, 27)]
]


class AnswerDigitReward:
    """Share of a completion's characters that are digits of the answer, minus 0.3 (correct: > 0).
    Cheap, and what the student learns depends on the dataset it trains on."""

    def __call__(self, completions, answers, prompts=None):
        return torch.tensor(
            [sum(c in a for c in t) / max(1, len(t)) - 0.3 for t, a in zip(completions, answers)]
        )


class StepTimer(Callback):
    def __init__(self):
        self.times: list[float] = []
        self.rewards: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)
        self.rewards.append(list(pl_module.last_outer.rewards))


def record_object_broadcasts() -> list[int]:
    """The pickled size of every object this rank broadcasts (``broadcast_object_list`` from it)."""
    sizes: list[int] = []
    original = torch.distributed.broadcast_object_list

    def recording(object_list, src=0, *args, **kwargs):
        if torch.distributed.get_rank() == src:
            sizes.append(sum(len(pickle.dumps(o)) for o in object_list))
        return original(object_list, src, *args, **kwargs)

    torch.distributed.broadcast_object_list = recording
    return sizes


def broadcast_state_ranks(out_dir: Path) -> None:
    """``broadcast``: ``broadcast_state`` alone on two gloo ranks (spawned here), rank 1 the source."""
    torch.multiprocessing.spawn(_broadcast_state_rank, args=(out_dir,), nprocs=2, join=True)


def _broadcast_state_rank(rank: int, out_dir: Path) -> None:
    from lit_selfimprove.distributed import broadcast_state

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    sizes = record_object_broadcasts()
    model = torch.nn.Linear(300, 200)  # 60,200 float32 values: 240 KB
    before = {k: t.data_ptr() for k, t in model.state_dict().items()}
    state = None
    if rank == 1:  # bfloat16 weight: goes through a buffer; float32 bias: straight into the parameter
        state = {"weight": torch.full((200, 300), 1.5, dtype=torch.bfloat16), "bias": torch.arange(200.0)}
    version = model.bias._version
    installed = broadcast_state(state, 1, model.state_dict())
    errors = []
    for bad in ({"weight": torch.zeros(200, 300)}, {"weight": torch.zeros(2, 3), "bias": torch.zeros(200)}):
        try:  # a mismatch raises on every rank, not only on the source
            broadcast_state(bad if rank == 1 else None, 1, model.state_dict())
        except (KeyError, ValueError) as err:
            errors.append(type(err).__name__)
    result = {
        "installed": installed,
        "nothing": broadcast_state(None, 0, model.state_dict()),  # the source has no state: False
        "weight": model.weight.detach().clone(),
        "bias": model.bias.detach().clone(),
        "in_place": before == {k: t.data_ptr() for k, t in model.state_dict().items()},
        "bias_version_bumped": model.bias._version > version,
        "errors": errors,
        "object_bytes": sizes,
    }
    torch.save(result, out_dir / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main() -> None:
    which, model_dir, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    if which == "broadcast":
        return broadcast_state_ranks(out_dir)
    devices, strategy = 2, "ddp"
    if which == "single":
        devices, strategy = 1, "auto"
    elif which == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    elif which != "ddp":
        raise SystemExit(f"unknown mode {which!r}")
    seed_everything(0, verbose=False)
    module = TeacherMetaRL(
        teacher=model_dir,
        student=model_dir,
        reward=AnswerDigitReward(),
        teacher_prompt=TINY_TEACHER_PROMPT,
        prompt_template="Q: {question}\nA: ",
        num_datasets=G,
        dataset_size=N,
        num_repeats=R,
        inner=InnerConfig(steps=16, batch=2, group_size=8, max_new_tokens=16, lr=1e-2),
        teacher_update={"lr": 1e-2, "warmup_steps": 0},
        teacher_sampling={"answer_check": "light"},
        promotion={"tau": -1.0, "window": 1},  # promote every step: exercises the broadcast
        log_samples_every=0,
    )
    timer = StepTimer()
    jobs: list[dict] = []  # the inner trainings this rank ran
    job_generator, inner = module.job_generator, soar_loops.train_inner

    def tracked_generator(j):  # called with training j's index just before it runs
        jobs.append({"step": len(timer.times), "j": j})
        return job_generator(j)

    def timed_inner(*args, **kwargs):
        jobs[-1]["start"] = time.time()  # wall clock: comparable across the ranks' processes
        out = inner(*args, **kwargs)
        jobs[-1]["end"] = time.time()
        return out

    module.job_generator, soar_loops.train_inner = tracked_generator, timed_inner
    rank_of = {"single": lambda: 0}.get(which, lambda: torch.distributed.get_rank())
    module.sample_teacher_round = lambda num: rollouts_from_texts(
        module.teacher_tokenizer,
        module.teacher_prompt_text(),
        TEXTS if which == "single" else TEXTS[4 * rank_of() : 4 * rank_of() + 4],
    )
    per_rank = 8 if which == "single" else 4
    data = ArithmeticProblemDataModule(levels=[2], num_train=8, num_test=2, batch_size=per_rank)
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=CSVLogger(out_dir, name="run"),
        default_root_dir=out_dir,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, Promotion()],
    )
    sizes = record_object_broadcasts() if which != "single" else []
    trainer.fit(module, datamodule=data)
    result = {
        "object_bytes": sizes,  # what this rank pickled and broadcast (a promotion: never a student)
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "teacher": full_weights(module.teacher),
        "student": full_weights(module.student),
        "rewards": timer.rewards,
        "step_times": timer.times,
        "jobs": jobs,
        "teacher_dtensor": any(type(p).__name__ == "DTensor" for p in module.teacher.parameters()),
        "student_dtensor": any(type(p).__name__ == "DTensor" for p in module.student.parameters()),
    }
    torch.save(result, out_dir / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
