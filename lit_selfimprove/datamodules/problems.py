"""Problem data: loaders for math problem sets and a LightningDataModule over them.

Every loader returns plain records ``{"id": str, "question": str, "answer": str}``:

* ``"math"``: MATH / MATH-500 jsonl (``problem``, ``solution``, ``answer``, ``unique_id``). When the
  ``answer`` field is missing or empty, the answer is the content of the solution's last ``\\boxed{...}``.
* ``"harp"``: HARP as shipped (``HARP.jsonl.zip`` holding ``HARD-Math.jsonl``) or an unzipped jsonl
  (``problem``, ``answer`` wrapped in ``$...$``; id ``<year>-<contest>-<number>``).
* ``"olympiadbench"``: OlympiadBench jsonl (``question``, ``final_answer`` as a list of ``$...$`` strings,
  ``id``; a non-empty ``context`` is prepended to the question).
* ``"jsonl"``: generic jsonl with configurable field names (default ``question`` / ``answer`` / ``id``);
  this is also the format of the hard-set files written by the fail@k builder.
* ``"hub"``: a Hugging Face dataset id, a local dataset folder (data files, or a ``save_to_disk`` folder)
  loaded with :func:`datasets.load_dataset` / :func:`datasets.load_from_disk`.
* ``"auto"``: inferred from the path and the first record's keys.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lit_selfimprove.assets import resolve
from lit_selfimprove.datamodules.readers import Malformed, decode_utf8, iter_lines, parse_json
from lit_selfimprove.distributed import world
from lit_selfimprove.rewards.math_verify import extract_boxed

__all__ = [
    "PROBLEM_FORMATS",
    "ProblemDataModule",
    "ProblemDataset",
    "collate_problems",
    "load_problems",
    "split_problems",
]

PROBLEM_FORMATS = ("auto", "math", "harp", "olympiadbench", "jsonl", "hub")

# Default (question, answer, id) field names per record kind; user-given field names override them.
_DEFAULT_FIELDS: dict[str, tuple[str, str, str]] = {
    "math": ("problem", "answer", "unique_id"),
    "harp": ("problem", "answer", "id"),
    "olympiadbench": ("question", "final_answer", "id"),
    "jsonl": ("question", "answer", "id"),
}

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_HARP_MEMBER = "HARD-Math.jsonl"


# ----------------------------------------------------------------------------------------------------------
# answer helpers
# ----------------------------------------------------------------------------------------------------------


def _strip_dollars(answer: str) -> str:
    """Remove the ``$`` math delimiters (not ``\\$``) from an answer, e.g. ``"$10\\frac{2}{3}$"``."""
    stripped = _UNESCAPED_DOLLAR_RE.sub("", answer).strip()
    # "$x$." -> "x" (a sentence-final period outside the math); keep "\ldots." and similar untouched.
    if stripped.endswith(".") and not stripped.endswith("\\."):
        candidate = stripped[:-1].rstrip()
        if candidate and (answer.rstrip().endswith("$.") or answer.rstrip().endswith(".$")):
            stripped = candidate
    return stripped


def _to_text(value: Any) -> str:
    """Field value -> stripped string (lists are joined with ``", "``)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in (_to_text(v) for v in value) if t)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


# ----------------------------------------------------------------------------------------------------------
# record conversion
# ----------------------------------------------------------------------------------------------------------


def _kind_from_keys(keys: Sequence[str] | set[str]) -> str | None:
    """Record kind inferred from a record's keys (None when unknown)."""
    keys = set(keys)
    if "final_answer" in keys:
        return "olympiadbench"
    if {"year", "contest", "number", "problem"} <= keys:
        return "harp"
    if "problem" in keys and ("solution" in keys or "answer" in keys):
        return "math"
    if {"question", "answer"} <= keys:
        return "jsonl"
    return None


def _convert(
    raw: Any,
    kind: str,
    fields: tuple[str | None, str | None, str | None],
    fallback_id: str,
) -> dict[str, str]:
    """One raw record -> ``{"id", "question", "answer"}``; raises :class:`Malformed`."""
    if not isinstance(raw, dict):
        raise Malformed(f"expected a JSON object, got {type(raw).__name__}")
    dq, da, di = _DEFAULT_FIELDS[kind]
    q_field, a_field, id_field = fields[0] or dq, fields[1] or da, fields[2] or di

    if q_field not in raw:
        raise Malformed(f"missing question field {q_field!r}")
    question = _to_text(raw[q_field])
    if kind == "olympiadbench" and fields[0] is None:
        context = _to_text(raw.get("context"))
        if context:
            question = f"{context}\n\n{question}"
    if not question:
        raise Malformed(f"empty question field {q_field!r}")

    if a_field in raw:
        answer = _to_text(raw[a_field])
    elif kind != "math":
        raise Malformed(f"missing answer field {a_field!r}")
    else:
        answer = ""
    if kind == "math" and not answer:
        solution = raw.get("solution")
        if not isinstance(solution, str):
            raise Malformed(f"missing answer field {a_field!r} and no 'solution' to take \\boxed{{}} from")
        answer = extract_boxed(solution) or ""
        if not answer:
            raise Malformed(f"empty answer field {a_field!r} and no \\boxed{{}} in the solution")
    if kind in ("harp", "olympiadbench"):
        answer = _strip_dollars(answer)
    if not answer:
        raise Malformed(f"empty answer field {a_field!r}")

    if id_field in raw and _to_text(raw[id_field]):
        rid = _to_text(raw[id_field])
    elif kind == "harp" and fields[2] is None and all(k in raw for k in ("year", "contest", "number")):
        rid = f"{raw['year']}-{raw['contest']}-{raw['number']}"
    else:
        rid = fallback_id
    return {"id": rid, "question": question, "answer": answer}


# ----------------------------------------------------------------------------------------------------------
# raw readers: yield (location, line/row number, raw record or Malformed)
# ----------------------------------------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[tuple[str, int, Any]]:
    for where, lineno, line in iter_lines(path, zip_member=_HARP_MEMBER):
        try:  # decoded per record: one bad byte is one malformed record, named by file and line
            text = decode_utf8(line)
            if not text.strip():
                continue  # a line of (Unicode) whitespace is not a record
            raw = parse_json(text)
        except Malformed as err:
            raw = err
        yield where, lineno, raw


def _first_record_keys(path: Path) -> list[str]:
    for _, _, raw in _iter_jsonl(path):
        if isinstance(raw, dict):
            return list(raw)
    return []


def _load_hub_dataset(source: str, split: str | None):
    """``datasets`` Dataset for a hub id / local dataset folder (``save_to_disk`` folders included)."""
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except ValueError as err:
            if "split" in str(err).lower():
                raise ValueError(f"{source}: split {split!r} not found ({err})") from err
            raise
    if isinstance(ds, (datasets.DatasetDict, dict)):
        if split is not None:
            if split not in ds:
                raise ValueError(f"{source}: split {split!r} not found; available splits: {sorted(ds)}")
            ds = ds[split]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise ValueError(f"{source}: several splits {sorted(ds)}; pass split=...")
    return ds


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------


def _detect_format(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        return "hub"
    if path.is_file():
        if path.suffix == ".zip":
            return "harp"
        kind = _kind_from_keys(_first_record_keys(path))
        return kind or "jsonl"
    if _HUB_ID_RE.match(source) and not looks_like_file(source):
        return "hub"
    raise FileNotFoundError(
        f"problem source not found: {source!r} (no such file or folder; hub dataset ids look like 'owner/name')"
    )


def looks_like_file(source: str) -> bool:
    """Whether ``source`` names a file rather than a hub id: a short alphabetic extension (``.jsonl``,
    a typo'd ``.jsnol``, ``.zip``) or an explicit local path (``/``, ``./``, ``../``, ``~``)."""
    suffix = Path(source).suffix[1:]
    return source.startswith(("/", "./", "../", "~")) or (suffix.isalpha() and len(suffix) <= 5)


def load_problems(
    source: str,
    format: str = "auto",
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    split: str | None = None,
    skip_malformed: bool = False,
    limit: int | None = None,
) -> tuple[list[dict[str, str]], int]:
    """Load a problem set as records ``{"id": str, "question": str, "answer": str}``.

    Args:
        source: A jsonl file, HARP's zip, a local dataset folder or a Hugging Face dataset id.
        format: One of ``"auto"``, ``"math"``, ``"harp"``, ``"olympiadbench"``, ``"jsonl"``, ``"hub"``.
            ``"auto"`` picks ``harp`` for a ``.zip``, ``hub`` for a folder or a non-existent ``owner/name``,
            and otherwise looks at the first record's keys (``final_answer`` -> olympiadbench,
            ``year``+``contest``+``number``+``problem`` -> harp, ``problem``+``solution``/``answer`` -> math,
            anything else -> jsonl).
        question_field: Question field name (default per format: ``problem`` for math/harp, else ``question``).
        answer_field: Answer field name (default ``answer``; ``final_answer`` for olympiadbench).
        id_field: Id field name (default ``unique_id`` for math, else ``id``). Records without one get
            ``<file stem>-<line>`` (``<year>-<contest>-<number>`` for HARP, ``<name>-<split>-<row>`` on the hub).
        split: Dataset split for the hub format (ignored for files).
        skip_malformed: Skip (and count) malformed records instead of raising.
        limit: Keep at most this many records (the first ones in file order).

    Returns:
        ``(records, n_skipped)``.

    Raises:
        ValueError: On a malformed record (invalid JSON, not an object, missing or empty question/answer,
            duplicate id) naming the file and its 1-based line number, unless ``skip_malformed``; and
            always when no record is left.
        FileNotFoundError: When ``source`` does not exist and does not look like a hub id.
    """
    if format not in PROBLEM_FORMATS:
        raise ValueError(f"unknown problem format {format!r}; expected one of {PROBLEM_FORMATS}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    source = str(source)
    fields = (question_field, answer_field, id_field)
    source = resolve(source)  # builtin:NAME -> the bundled file
    fmt = _detect_format(source) if format == "auto" else format

    if fmt == "hub":
        ds = _load_hub_dataset(source, split)
        columns = list(getattr(ds, "column_names", None) or [])
        kind = _kind_from_keys(columns) or "jsonl"
        name = source.rstrip("/").split("/")[-1]
        rows: Iterator[tuple[str, int, Any]] = ((source, i, raw) for i, raw in enumerate(ds, start=1))
        unit, fallback = "row", (lambda n: f"{name}-{split or 'data'}-{n - 1}")
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"problem file not found: {source!r}")
        kind = fmt
        stem = path.name.split(".")[0] if path.suffix == ".zip" else path.stem
        rows = _iter_jsonl(path)
        unit, fallback = "line", (lambda n: f"{stem}-{n}")

    records: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    n_skipped = 0
    for where, number, raw in rows:
        try:
            if isinstance(raw, Malformed):
                raise raw
            record = _convert(raw, kind, fields, fallback(number))
            if record["id"] in seen:
                raise Malformed(f"duplicate id {record['id']!r} (first at {unit} {seen[record['id']]})")
        except Malformed as err:
            if not skip_malformed:
                raise err.error(where, unit, number) from None
            n_skipped += 1
            continue
        seen[record["id"]] = number
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(
            f"no problems loaded from {source!r} (format {fmt!r}, {n_skipped} malformed skipped)"
        )
    return records, n_skipped


def split_problems(
    records: Sequence[dict[str, str]], test_fraction: float = 0.5, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Deterministic train/test split (SOAR uses 50/50).

    Records are sorted by id (then question, answer) and permuted with ``random.Random(seed)``, so the split
    depends only on the records and the seed (not on file order or Python's hash randomization). The test set
    is the first ``round(len * test_fraction)`` records of the permutation; both parts keep that permuted
    order, are disjoint and cover all records.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    ordered = sorted(records, key=lambda r: (r["id"], r["question"], r["answer"]))
    random.Random(seed).shuffle(ordered)
    n_test = int(round(len(ordered) * test_fraction))
    return ordered[n_test:], ordered[:n_test]


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
    ) -> None:
        super().__init__()
        if extra_order not in ("mixed", "curriculum"):
            raise ValueError(f"extra_order must be 'mixed' or 'curriculum', got {extra_order!r}")
        if curriculum_steps < 1:
            raise ValueError(f"curriculum_steps must be >= 1, got {curriculum_steps}")
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
        self.num_extra = 0
        self.train_records: list[dict[str, str]] = []
        self.test_records: list[dict[str, str]] = []
        self._loaded = False

    def _load(self, source: str) -> list[dict[str, str]]:
        records, n_skipped = load_problems(
            source,
            format=self.format,
            question_field=self.question_field,
            answer_field=self.answer_field,
            id_field=self.id_field,
            split=self.hub_split,
            skip_malformed=self.skip_malformed,
        )
        rank_zero_info(
            f"ProblemDataModule: loaded {len(records)} problems from {source} ({n_skipped} skipped)"
        )
        return records

    def setup(self, stage: str | None = None) -> None:
        if not self._loaded:
            train = self._load(self.train_source) if self.train_source is not None else []
            if self.test_source is not None:
                test = self._load(self.test_source)
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
                records, n_skipped = load_problems(source, format="auto", skip_malformed=self.skip_malformed)
                for i, r in enumerate(records):  # PQ files have no ids: make them unique
                    r["id"] = f"{Path(source).stem}:{i}:{r['id']}"
                rank_zero_info(f"ProblemDataModule: {len(records)} extra training problems from {source}")
                extra.extend(records)
            self.num_extra = len(extra)
            self.train_records, self.test_records = extra + train, test
            self._loaded = True
            rank_zero_info(
                f"ProblemDataModule: {len(self.train_records)} train / {len(self.test_records)} test problems"
                + (f" ({len(self.val_records)} used for validation)" if self.val_limit is not None else "")
            )
        if stage == "fit" and not self.train_records:
            raise ValueError("ProblemDataModule: fitting needs a train_source with at least one problem")

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
