"""Problem data: a LightningDataModule (and datasets) over math problem sets.

The record loaders (MATH, HARP, OlympiadBench, generic jsonl, hub datasets; format detection) are
:mod:`~lit_selfimprove.datamodules.problem_sources`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lit_selfimprove.datamodules.problem_sources import (
    PROBLEM_FORMATS,
    check_levels,
    load_located_problems,
    split_problems,
)
from lit_selfimprove.datamodules.prompt_length import check_prompt_lengths, check_too_long_mode
from lit_selfimprove.distributed import world

__all__ = ["ProblemDataModule", "ProblemDataset", "ProblemStream", "collate_problems"]


class ProblemDataset(Dataset):
    """A map-style dataset over problem records."""

    def __init__(self, records: Sequence[dict[str, str]]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, str]:
        return self.records[index]


def collate_problems(batch: Sequence[dict[str, str]]) -> dict[str, list[str]]:
    """List of records -> ``{"id": [...], "question": [...], "answer": [...]}``."""
    return {key: [r[key] for r in batch] for key in ("id", "question", "answer")}


class ProblemStream(IterableDataset):
    """Training batches of exactly ``batch_size`` problems, batch ``k`` a pure function of (seed, k).

    The stream walks through fresh permutations of ``records`` (seeded by ``seed`` and the epoch
    of the walk) laid end to end, so every batch is full (the last batch of a pass borrows from the
    next permutation; nothing is dropped) and each problem is seen once per pass. Rank ``r`` of
    ``w`` takes global batch ``k * w + r``. Iteration starts at the batch index ``start()`` returns
    (the batches the trainer has consumed), so a resumed run draws exactly the batches the
    uninterrupted run would have drawn. ``curriculum_steps = N > 0``: batches ``0..N-1`` come from
    the first ``num_extra`` records only (the extra sources), later ones from the rest only.
    """

    def __init__(
        self,
        records: Sequence[dict[str, str]],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_extra: int = 0,
        curriculum_steps: int = 0,
        start: Callable[[], int] | None = None,
    ) -> None:
        if curriculum_steps and not 0 < num_extra < len(records):
            raise ValueError("a curriculum needs both extra and training problems")
        self.records = list(records)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_extra, self.curriculum_steps = num_extra, curriculum_steps
        self.start = start or (lambda: 0)

    def __len__(self) -> int:
        """Batches per rank in one pass over the training problems (one "epoch")."""
        world_size, _ = world()
        return max(1, -(-len(self.records) // (self.batch_size * world_size)))

    def _indices(self, part: int, first: int, stop: int, lo: int, hi: int) -> list[int]:
        """Positions ``lo..hi-1`` of the endless walk over records ``first..stop-1``."""
        n, out = stop - first, []
        for pass_ in range(lo // n, (hi - 1) // n + 1):
            if self.shuffle:
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + part) * 1_000_003 + pass_)
                perm = torch.randperm(n, generator=gen).tolist()
            else:
                perm = list(range(n))
            a, b = max(lo, pass_ * n) - pass_ * n, min(hi, (pass_ + 1) * n) - pass_ * n
            out.extend(first + i for i in perm[a:b])
        return out

    def batch_indices(self, k: int, world: int = 1, rank: int = 0) -> list[int]:
        """Record indices of rank ``rank``'s batch at global step ``k``."""
        if self.curriculum_steps:
            if k < self.curriculum_steps:
                first, stop, part = 0, self.num_extra, 1
            else:
                first, stop, part, k = self.num_extra, len(self.records), 2, k - self.curriculum_steps
        else:
            first, stop, part = 0, len(self.records), 0
        lo = (k * world + rank) * self.batch_size
        return self._indices(part, first, stop, lo, lo + self.batch_size)

    def __iter__(self):
        world_size, rank = world()
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        start = self.start()
        for k in range(start + worker, start + len(self), workers):
            yield collate_problems([self.records[i] for i in self.batch_indices(k, world_size, rank)])


class ProblemDataModule(LightningDataModule):
    """Problems (question + reference answer) for training and evaluating a self-improving LM.

    Sources:

    * only ``train_source`` and ``use_split=True``: the records are split deterministically with
      :func:`split_problems` (``test_fraction``, ``split_seed``) into train and test sets (SOAR's 50/50);
    * ``test_source`` given: it is the test set as is, and all of ``train_source`` is the training set;
    * ``use_split=False`` and no ``test_source``: the whole ``train_source`` is the training set AND the
      test set (the same records, e.g. to measure progress on the problems being trained on);
    * only ``test_source``: evaluation only (``validate`` / ``test``); ``fit`` raises.

    A fail@k hard set (``X.jsonl`` with ``X.train.jsonl`` / ``X.test.jsonl`` written by the fail@k builder)
    is generic jsonl: pass ``train_source=X.train.jsonl, test_source=X.test.jsonl`` to use the builder's
    split, or ``train_source=X.jsonl`` to re-split it here.

    The validation set is the first ``val_limit`` test records (in the split's permuted order, or file order
    for a ``test_source``); ``test_dataloader`` always serves the whole test set. Batches are dicts of
    lists ``{"id": [...], "question": [...], "answer": [...]}``. Loading happens in :meth:`setup`; an
    empty source or split raises ``ValueError`` there.

    Args:
        train_source: Training problems: a jsonl file, HARP's zip, a local dataset folder or a hub dataset id.
        test_source: Test problems (same kinds of source); when given, ``train_source`` is not split.
        format: Problem format for both sources: auto, math, harp, olympiadbench, jsonl or hub.
        question_field: Question field name (default per format).
        answer_field: Answer field name (default per format).
        id_field: Id field name (default per format).
        hub_split: Split to load for hub / local dataset folder sources.
        test_fraction: Fraction of ``train_source`` held out as the test set when splitting.
        split_seed: Seed of the train/test split and of the training shuffle.
        use_split: Split ``train_source`` into train/test when no ``test_source`` is given.
        batch_size: Training batch size (problems per step).
        val_batch_size: Batch size of the validation and test dataloaders.
        val_limit: Use at most this many test problems for validation (None: all).
        num_workers: DataLoader worker processes.
        skip_malformed: Skip (and count) malformed records instead of raising.
        shuffle: Shuffle the training problems (a fresh permutation every pass).
        extra_train_sources: More training problems (jsonl, auto-detected format), e.g. SOAR's
            promotion questions ``promotion_questions.jsonl`` or questions sampled from a teacher:
            SOAR-PQ trains a fresh student on PQ + D_train.
        extra_order: ``mixed`` (one stream over extra + train problems: SOAR-PQ on HARP) or
            ``curriculum`` (the first ``curriculum_steps`` batches from the extra problems only, then
            the training problems only: SOAR-PQ on MATH, 64 steps).
        curriculum_steps: N, the number of batches on the extra sources with ``extra_order: curriculum``.
        too_long: What to do with a problem whose prompt plus the generation budget does not fit the
            model's context (``max_position_embeddings``), checked once when fitting starts (by a module
            that calls :meth:`check_prompt_lengths`: StudentRLVR, TeacherMetaRL): ``error`` (default)
            raises naming its file:line, its prompt tokens and the limit; ``skip`` drops such problems
            and warns with their count and the longest.
        levels: Keep only the problems whose MATH ``level`` is in this list (e.g. ``[1, 2]`` for MATH-500's
            easiest, the ones a 135M model can solve at all); None keeps all. Applied to ``train_source``
            and ``test_source`` when loading, so before the train/test split: the split is then a pure
            function of (the kept records, ``split_seed``). Not applied to ``extra_train_sources`` (PQ
            files carry no level). A record without a ``level`` field, or no record left, raises.

    Training batches come from a :class:`ProblemStream`: every batch holds exactly ``batch_size``
    problems (SOAR's |Q_R| is the same every outer step), batch ``k`` depends only on
    (``split_seed``, k), and the stream resumes at the trainer's global step, so a run resumed from
    a checkpoint trains on exactly the batches of the uninterrupted run. One "epoch" is one pass over
    the training problems; ``max_steps`` is the natural way to bound a run.
    """

    def __init__(
        self,
        train_source: str | None = None,
        test_source: str | None = None,
        format: str = "auto",
        question_field: str | None = None,
        answer_field: str | None = None,
        id_field: str | None = None,
        hub_split: str | None = "test",
        test_fraction: float = 0.5,
        split_seed: int = 0,
        use_split: bool = True,
        batch_size: int = 8,
        val_batch_size: int = 64,
        val_limit: int | None = None,
        num_workers: int = 0,
        skip_malformed: bool = False,
        shuffle: bool = True,
        extra_train_sources: list[str] | None = None,
        extra_order: str = "mixed",
        curriculum_steps: int = 64,
        too_long: str = "error",
        levels: list[int] | None = None,
    ) -> None:
        super().__init__()
        levels = check_levels(levels)
        if extra_order not in ("mixed", "curriculum"):
            raise ValueError(f"extra_order must be 'mixed' or 'curriculum', got {extra_order!r}")
        if curriculum_steps < 1:
            raise ValueError(f"curriculum_steps must be >= 1, got {curriculum_steps}")
        check_too_long_mode(too_long)
        if train_source is None and test_source is None:
            raise ValueError("ProblemDataModule needs train_source and/or test_source")
        if format not in PROBLEM_FORMATS:
            raise ValueError(f"unknown problem format {format!r}; expected one of {PROBLEM_FORMATS}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError("batch_size and val_batch_size must be >= 1")
        if val_limit is not None and val_limit < 1:
            raise ValueError(f"val_limit must be >= 1 or None, got {val_limit}")
        self.save_hyperparameters()
        self.train_source = train_source
        self.test_source = test_source
        self.format = format
        self.question_field = question_field
        self.answer_field = answer_field
        self.id_field = id_field
        self.hub_split = hub_split
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.use_split = use_split
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.val_limit = val_limit
        self.num_workers = num_workers
        self.skip_malformed = skip_malformed
        self.shuffle = shuffle
        self.extra_train_sources = list(extra_train_sources or [])
        self.extra_order = extra_order
        self.curriculum_steps = curriculum_steps
        self.too_long = too_long
        self.levels = levels
        self.num_extra = 0
        self.train_records: list[dict[str, str]] = []
        self.test_records: list[dict[str, str]] = []
        # record id -> "file:line", per set (a train and a test file may share ids)
        self._origins: dict[str, dict[str, str]] = {"train": {}, "test": {}}
        self._loaded = False

    def _load(self, source: str) -> tuple[list[dict[str, str]], dict[str, str]]:
        """``(records, {id: file:line})`` of one source."""
        records, n_skipped, origins = load_located_problems(
            source,
            format=self.format,
            question_field=self.question_field,
            answer_field=self.answer_field,
            id_field=self.id_field,
            split=self.hub_split,
            skip_malformed=self.skip_malformed,
            levels=self.levels,
        )
        at_levels = f" at levels {self.levels}" if self.levels is not None else ""
        rank_zero_info(
            f"ProblemDataModule: loaded {len(records)} problems{at_levels} from {source} ({n_skipped} skipped)"
        )
        return records, {r["id"]: where for r, where in zip(records, origins)}

    def setup(self, stage: str | None = None) -> None:
        if not self._loaded:
            train, train_origins = (
                self._load(self.train_source) if self.train_source is not None else ([], {})
            )
            test_origins = train_origins
            if self.test_source is not None:
                test, test_origins = self._load(self.test_source)
                overlap = {r["id"] for r in train} & {r["id"] for r in test}
                if overlap and self.test_source != self.train_source:
                    rank_zero_warn(
                        f"ProblemDataModule: {len(overlap)} problem ids are in both train and test sources"
                    )
            elif self.use_split:
                train, test = split_problems(train, self.test_fraction, self.split_seed)
                if not train or not test:
                    raise ValueError(
                        f"splitting {len(train) + len(test)} problems from {self.train_source!r} with "
                        f"test_fraction={self.test_fraction} leaves an empty train or test set"
                    )
            else:
                test = list(train)
            extra = []
            for source in self.extra_train_sources:
                records, n_skipped, origins = load_located_problems(
                    source, format="auto", skip_malformed=self.skip_malformed
                )
                for i, (r, where) in enumerate(
                    zip(records, origins)
                ):  # PQ files have no ids: make them unique
                    r["id"] = f"{Path(source).stem}:{i}:{r['id']}"
                    train_origins[r["id"]] = where
                rank_zero_info(f"ProblemDataModule: {len(records)} extra training problems from {source}")
                extra.extend(records)
            self.num_extra = len(extra)
            self.train_records, self.test_records = extra + train, test
            self._origins = {"train": train_origins, "test": test_origins}
            self._loaded = True
            rank_zero_info(
                f"ProblemDataModule: {len(self.train_records)} train / {len(self.test_records)} test problems"
                + (f" ({len(self.val_records)} used for validation)" if self.val_limit is not None else "")
            )
        if stage == "fit" and not self.train_records:
            raise ValueError("ProblemDataModule: fitting needs a train_source with at least one problem")

    def origin(self, record: dict[str, str], part: str = "train") -> str:
        """Where a ``part`` (``train`` / ``test``) record came from: ``file:line``, else its id."""
        return self._origins[part].get(record["id"]) or f"problem {record['id']!r}"

    def check_prompt_lengths(
        self,
        prompt_tokens: Callable[[list[str]], list[int]],
        max_positions: int,
        max_new_tokens: int,
        eval_max_new_tokens: int | None = None,
    ) -> None:
        """Refuse (``too_long="error"``) or drop (``"skip"``) the problems whose prompt, counted in tokens by
        ``prompt_tokens``, plus the generation budget does not fit ``max_positions``: the training problems
        with ``max_new_tokens``, the test (and so validation) problems with ``eval_max_new_tokens``
        (default: the same). Called once by a module at fit start, before any dataloader is built; see
        :mod:`~lit_selfimprove.datamodules.prompt_length`."""
        if not self._loaded:
            raise RuntimeError("ProblemDataModule: call setup() before check_prompt_lengths()")
        parts = (
            ("train", self.train_records, max_new_tokens),
            ("test", self.test_records, eval_max_new_tokens or max_new_tokens),
        )
        for part, records, budget in parts:
            if not records:
                continue
            kept = check_prompt_lengths(
                records,
                prompt_tokens,
                max_positions,
                budget,
                self.too_long,
                origin=functools.partial(self.origin, part=part),
                what=f"{'training' if part == 'train' else 'test'} problems",
            )
            if part == "train":
                extra = {id(r) for r in self.train_records[: self.num_extra]}
                self.num_extra = sum(id(r) in extra for r in kept)
                self.train_records = kept
            else:
                self.test_records = kept

    @property
    def val_records(self) -> list[dict[str, str]]:
        """The validation records: the first ``val_limit`` test records."""
        return self.test_records[: self.val_limit] if self.val_limit is not None else self.test_records

    def _check_loaded(self, records: list[dict[str, str]], what: str) -> None:
        if not self._loaded:
            raise RuntimeError("ProblemDataModule: call setup() before requesting dataloaders")
        if not records:
            raise ValueError(f"ProblemDataModule: the {what} set is empty")

    def train_dataloader(self) -> DataLoader:
        self._check_loaded(self.train_records, "training")
        curriculum = self.num_extra and self.extra_order == "curriculum"
        stream = ProblemStream(
            self.train_records,
            self.batch_size,
            seed=self.split_seed,
            shuffle=self.shuffle,
            num_extra=self.num_extra,
            curriculum_steps=self.curriculum_steps if curriculum else 0,
            start=self._batches_consumed,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    def _batches_consumed(self) -> int:
        """Training batches the attached trainer has consumed: optimizer steps (times the
        accumulation under automatic optimization); 0 without a trainer."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        model = trainer.lightning_module
        if model is not None and model.automatic_optimization:
            return trainer.global_step * trainer.accumulate_grad_batches
        return trainer.global_step

    def _eval_loader(self, records: list[dict[str, str]]) -> DataLoader:
        return DataLoader(
            ProblemDataset(records),
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_problems,
        )

    def val_dataloader(self) -> DataLoader:
        self._check_loaded(self.val_records, "validation")
        return self._eval_loader(self.val_records)

    def test_dataloader(self) -> DataLoader:
        self._check_loaded(self.test_records, "test")
        return self._eval_loader(self.test_records)
