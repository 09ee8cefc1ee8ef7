"""DataModules of the embedded tiny world (:mod:`lit_selfimprove.worlds.arithmetic`): pre-training
streams for the student and teacher bases and the problem sets for RLVR / SOAR."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from lit_selfimprove.prompts import TINY_STUDENT_PROMPT, TINY_TEACHER_PROMPT
from lit_selfimprove.worlds.arithmetic import (
    generate_problems,
    make_problem,
    sample_levels,
    student_solution,
    teacher_example,
    teacher_text,
)

__all__ = [  # the world's pure parts and the tiny prompts stay importable from here
    "TINY_STUDENT_PROMPT",
    "TINY_TEACHER_PROMPT",
    "ArithmeticPretrainDataModule",
    "ArithmeticProblemDataModule",
    "generate_problems",
    "make_problem",
    "pad_collate",
    "sample_levels",
    "student_solution",
    "teacher_example",
    "teacher_text",
]


class _PretrainStream(IterableDataset):
    """Endless stream of tokenized pre-training examples (loss only on the generated part)."""

    def __init__(
        self,
        role: str,
        level_weights: Sequence[float],
        tokenizer,
        seed: int,
        max_length: int,
        sloppy_levels: Sequence[int] = (),
        carry_drop: float = 0.0,
        teacher_scratchpad: bool = False,
    ):
        self.role, self.level_weights, self.tokenizer = role, list(level_weights), tokenizer
        self.seed, self.max_length = seed, max_length
        self.sloppy_levels, self.carry_drop = set(sloppy_levels), carry_drop
        self.teacher_scratchpad = teacher_scratchpad

    def example(self, rng: random.Random) -> tuple[str, str]:
        level = sample_levels(self.level_weights, 1, rng)[0]
        p = make_problem(level, rng)
        drop = self.carry_drop if level in self.sloppy_levels else 0.0
        if self.role == "student":
            return TINY_STUDENT_PROMPT.format(question=p["question"]), student_solution(
                p["question"], drop, rng
            )
        if self.teacher_scratchpad:
            return TINY_TEACHER_PROMPT, teacher_example(p["question"], drop, rng)
        return TINY_TEACHER_PROMPT, teacher_text(p["question"], p["answer"])

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        eos = self.tokenizer.eos_token_id
        while True:
            prompt, target = self.example(rng)
            p_ids = self.tokenizer(prompt)["input_ids"]
            t_ids = self.tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
            ids = (p_ids + t_ids)[: self.max_length]
            labels = ([-100] * len(p_ids) + t_ids)[: self.max_length]
            yield {"input_ids": ids, "labels": labels}


def pad_collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad token lists into ``input_ids`` / ``attention_mask`` / ``labels`` tensors."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ArithmeticPretrainDataModule(LightningDataModule):
    """Pre-training stream for the tiny bases.

    Args:
        role: ``student`` (scratchpad solutions, loss on the answer) or ``teacher``
            (``<question>..</question><answer>..</answer>`` problems, loss after the prompt).
        level_weights: sampling weight of levels 1, 2, ... (the list length is the top level).
        tokenizer: tokenizer path or ``builtin:tiny-tokenizer``.
        batch_size: sequences per step.
        seed: stream seed (the validation stream uses ``seed + 1``).
        max_length: truncation length in tokens.
        val_batches: number of validation batches.
        sloppy_levels: levels whose solutions are sloppy (imperfect data).
        carry_drop: probability that a sloppy solution forgets each carry.
        teacher_scratchpad: the teacher works its answer out with the scratchpad between
            ``</question>`` and ``<answer>`` (sloppy on ``sloppy_levels`` too) instead of
            writing the true sum directly.
    """

    def __init__(
        self,
        role: str = "student",
        level_weights: list[float] = (0.3, 0.45, 0.25),
        tokenizer: str = "builtin:tiny-tokenizer",
        batch_size: int = 64,
        seed: int = 0,
        max_length: int = 128,
        val_batches: int = 4,
        sloppy_levels: list[int] = (),
        carry_drop: float = 0.0,
        teacher_scratchpad: bool = False,
    ):
        super().__init__()
        if not 0.0 <= carry_drop <= 1.0:
            raise ValueError(f"carry_drop must be in [0, 1], got {carry_drop}")
        if role not in ("student", "teacher"):
            raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
        if not level_weights or any(w < 0 for w in level_weights) or sum(level_weights) <= 0:
            raise ValueError(f"level_weights must be non-negative with a positive sum, got {level_weights}")
        self.role, self.level_weights = role, list(level_weights)
        self.tokenizer_name, self.batch_size, self.seed = tokenizer, batch_size, seed
        self.max_length, self.val_batches = max_length, val_batches
        self.sloppy_levels, self.carry_drop = list(sloppy_levels), carry_drop
        self.teacher_scratchpad = teacher_scratchpad
        self.tokenizer = None

    def setup(self, stage: str | None = None) -> None:
        from lit_selfimprove.modeling import load_tokenizer

        self.tokenizer = load_tokenizer(self.tokenizer_name)

    def _loader(self, seed: int) -> DataLoader:
        ds = _PretrainStream(
            self.role,
            self.level_weights,
            self.tokenizer,
            seed,
            self.max_length,
            self.sloppy_levels,
            self.carry_drop,
            self.teacher_scratchpad,
        )
        pad = self.tokenizer.pad_token_id
        return DataLoader(ds, batch_size=self.batch_size, collate_fn=lambda b: pad_collate(b, pad))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.seed)

    def val_dataloader(self) -> DataLoader:
        loader = self._loader(self.seed + 1)
        return _Take(loader, self.val_batches)


class _Take:
    """First ``n`` batches of an endless loader, re-iterable (a fixed validation set)."""

    def __init__(self, loader: DataLoader, n: int):
        self.loader, self.n = loader, n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                return
            yield batch

    def __len__(self) -> int:
        return self.n


class ArithmeticProblemDataModule(LightningDataModule):
    """Tiny-world problems for RL: train and held-out test sets of given levels.

    The test set (``num_test`` problems, seed ``seed + 1``) is drawn first and excluded from
    the training set, so evaluation is always on problems never trained on.

    Args:
        levels: levels to draw from (e.g. ``[3]`` for the medium level).
        num_train: distinct training problems.
        num_test: distinct held-out problems (validation and test).
        seed: generation seed.
        batch_size: questions per training step.
        val_batch_size: questions per validation batch.
    """

    def __init__(
        self,
        levels: list[int] = (3,),
        num_train: int = 2000,
        num_test: int = 200,
        seed: int = 0,
        batch_size: int = 8,
        val_batch_size: int = 200,
    ):
        super().__init__()
        if num_train < 1 or num_test < 1:
            raise ValueError("num_train and num_test must be >= 1")
        self.levels, self.num_train, self.num_test = list(levels), num_train, num_test
        self.seed, self.batch_size, self.val_batch_size = seed, batch_size, val_batch_size
        self.train_records: list[dict] = []
        self.test_records: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        self.test_records = generate_problems(self.levels, self.num_test, self.seed + 1)
        exclude = {r["question"] for r in self.test_records}
        self.train_records = generate_problems(self.levels, self.num_train, self.seed, exclude=exclude)

    def train_dataloader(self) -> DataLoader:
        from lit_selfimprove.datamodules.problems import ProblemDataset, collate_problems

        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            ProblemDataset(self.train_records),
            batch_size=self.batch_size,
            shuffle=True,
            generator=gen,
            collate_fn=collate_problems,
            drop_last=True,
        )

    def _eval_loader(self) -> DataLoader:
        from lit_selfimprove.datamodules.problems import ProblemDataset, collate_problems

        return DataLoader(
            ProblemDataset(self.test_records), batch_size=self.val_batch_size, collate_fn=collate_problems
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()
