"""The dataset: one split of a corpus streamed as prefix -> suffix chunk items, each process reading its own
slot of the records (see the package docs for the pipeline)."""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from lit_selfimprove.datamodules.prefix_suffix.config import CorpusConfig
from lit_selfimprove.datamodules.prefix_suffix.meta_filter import _keep, _normalize_filter
from lit_selfimprove.datamodules.prefix_suffix.sources import _get_path, _parse, _Reader, _Source
from lit_selfimprove.datamodules.prefix_suffix.splits import assign_split
from lit_selfimprove.datamodules.prefix_suffix.stream import _new_stats, _SlotStream
from lit_selfimprove.datamodules.readers import Malformed
from lit_selfimprove.distributed import initialized, world


def _rank_world_from_env() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else the launcher's env, else (0, 1)."""
    if initialized():
        size, rank = world()
        return rank, size
    env_size = os.environ.get("WORLD_SIZE")
    if env_size is not None:
        for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK"):
            if key in os.environ:
                return int(os.environ[key]), int(env_size)
    return 0, 1


class PrefixSuffixDataset(IterableDataset):
    """Streams ``(prefix, suffix)`` chunk items of one split of a corpus (see the package docs).

    Each item is ``{"prefix_ids": LongTensor[P], "suffix_ids": LongTensor[<=N], "prefix_text": str,
    "suffix_text": str, "doc_id": str, "suffix_start": int}``; batch them with
    :func:`collate_prefix_suffix`. Iterating shards by ``rank`` / ``world_size`` (default: torch.distributed,
    else the launcher's environment, else 0 / 1) and by dataloader worker. The arguments it shares with
    :class:`PrefixSuffixDataModule` are kept, validated, in ``config`` (a :class:`CorpusConfig`).

    Args:
        sources: Local files, folders or glob patterns (one string or a list), read in that order.
        tokenizer: A loaded tokenizer, or a name / path for :func:`lit_selfimprove.modeling.load_tokenizer`
            (``builtin:tiny-tokenizer`` or a local folder).
        split: The split to stream (a key of ``splits``).
        hf_name: Dataset for ``datasets.load_dataset(..., streaming=True)``, read after ``sources``.
        hf_config: Its configuration name.
        hf_split: Its split (``"train"``).
        data_files: ``data_files`` forwarded to ``load_dataset`` (e.g. with ``hf_name="json"``).
        text_field: Field holding the text (dotted path allowed).
        id_field: Field holding a document id (dotted path allowed). When set, it is the ``doc_id`` and the
            split key, and a record without it is malformed; else ``doc_id`` is the first 16 hex digits of
            the text's sha1 and the text is the split key.
        meta_filter: Keep only records whose metadata match (see the package docs).
        suffix_tokens: Tokens per suffix chunk (N).
        context_length: Prefix + suffix tokens at most; the prefix keeps its last
            ``context_length - suffix_tokens`` tokens.
        min_prefix_tokens: Tokens before the first suffix (every suffix has at least this much prefix).
        min_suffix_tokens: Shortest tail chunk kept (default ``suffix_tokens``: full chunks only).
        split_mode: ``"fixed"`` or ``"random"`` chunk boundaries, or ``"marker"``: a suffix after each
            ``split_marker``.
        max_chunks_per_doc: Keep at most this many chunks per document.
        splits: Split name -> fraction of documents (each > 0, sum <= 1).
        split_salt: Salt of the split hash; change it only to draw a different partition.
        seed: Seed of the random split points and the shuffle buffer (not of the splits).
        shuffle_buffer_size: Chunks held for shuffling (0: stream order).
        repeat: Start over (next epoch) after a full pass; otherwise stop.
        skip_malformed: Skip and count malformed records instead of raising.
        piece_chars: Longest piece of a document tokenized in one call (a memory bound, see
            :class:`CorpusConfig`).
        split_marker: The text after which a suffix starts in split mode ``"marker"`` (e.g. ``"\nA: "``:
            the question is the prefix, the answer the suffix; see :class:`CorpusConfig`).
        rank: Data-parallel rank override.
        world_size: Data-parallel world size override.
    """

    def __init__(
        self,
        sources: str | Sequence[str] | None = None,
        tokenizer: Any = "builtin:tiny-tokenizer",
        split: str = "policy",
        hf_name: str | None = None,
        hf_config: str | None = None,
        hf_split: str | None = "train",
        data_files: Any = None,
        text_field: str = "text",
        id_field: str | None = None,
        meta_filter: Mapping[str, Any] | None = None,
        suffix_tokens: int = 128,
        context_length: int = 2048,
        min_prefix_tokens: int = 32,
        min_suffix_tokens: int | None = None,
        split_mode: str = "fixed",
        max_chunks_per_doc: int | None = None,
        splits: Mapping[str, float] | None = None,
        split_salt: str = "",
        seed: int = 0,
        shuffle_buffer_size: int = 0,
        repeat: bool = False,
        skip_malformed: bool = False,
        piece_chars: int = 100_000,
        split_marker: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.config = CorpusConfig.from_arguments(locals())
        self.splits = self.config.splits
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; splits are {list(self.splits)}")
        if shuffle_buffer_size < 0:
            raise ValueError(f"shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self._reader = _Reader(self.config)
        self.files = self._reader.files
        self.meta_filter = _normalize_filter(meta_filter)
        self.tokenizer = tokenizer
        self.split = split
        self.shuffle_buffer_size, self.repeat = shuffle_buffer_size, repeat
        self.rank, self.world_size = rank, world_size
        # Per-slot start positions (slot id as str -> position), set by the DataModule before iterating.
        self.start_states: dict[str, dict[str, Any]] = {}
        self.stats: dict[str, int] = {}  # counters of the latest pass in this process

    # -- plumbing ------------------------------------------------------------------------------------------

    def get_tokenizer(self) -> Any:
        """The tokenizer object (loaded on first use when given by name)."""
        if isinstance(self.tokenizer, (str, os.PathLike)):
            from lit_selfimprove.modeling import load_tokenizer

            self.tokenizer = load_tokenizer(str(self.tokenizer))
        return self.tokenizer

    @property
    def suffix_tokens(self) -> int:
        return self.config.suffix_tokens

    @property
    def max_prefix_tokens(self) -> int:
        return self.config.max_prefix_tokens

    def slot_info(self) -> tuple[int, int]:
        """``(slot, num_slots)`` of the calling process: ``worker_id * world_size + rank``."""
        rank, world = (self.rank, self.world_size) if self.world_size is not None else _rank_world_from_env()
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        # Worker-major: rank r's slots are r, r + world, ..., so the documents of a rank (all its workers
        # together) are those with index % world_size == rank whatever num_workers is.
        return wid * world + rank, world * workers

    # -- selecting documents -------------------------------------------------------------------------------

    def _doc_key(self, record: dict[str, Any], text: str) -> tuple[str, str]:
        """``(doc_id, split key)``; raises :class:`Malformed` when ``id_field`` is missing."""
        id_field = self.config.id_field
        if id_field is None:
            return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16], text
        found, value = _get_path(record, id_field)
        if not found or value is None or str(value) == "":
            raise Malformed(f"no id field {id_field!r}")
        return str(value), str(value)

    def _select(
        self, src: _Source, lineno: int, payload: Any, stats: dict[str, int]
    ) -> tuple[dict[str, Any], str, str, str | None] | None:
        """Parse, filter and assign a split: ``(record, text, doc_id, split)`` or None (counted)."""
        stats["records"] += 1
        try:
            record, text = _parse(src, payload, self.config.text_field)
            empty = not text or text.isspace()
            keep = not empty and _keep(self.meta_filter, record, src)
            doc_id, key = self._doc_key(record, text) if keep else ("", "")
        except Malformed as err:
            if not self.config.skip_malformed:
                raise err.error(src.where, "row" if src.kind == "hf" else "line", lineno) from None
            stats["malformed"] += 1
            return None
        if empty:
            stats["empty"] += 1
            return None
        if not keep:
            stats["filtered"] += 1
            return None
        return record, text, doc_id, assign_split(key, self.splits, self.config.split_salt)

    # -- public iteration ----------------------------------------------------------------------------------

    def iter_documents(self, all_splits: bool = False) -> Iterator[dict[str, Any]]:
        """Documents that pass the filter, without tokenizing: ``{"doc_id", "split", "text", "meta",
        "source_name"}``, in stream order, all slots together. Only this split's documents unless
        ``all_splits`` (then ``split`` is None for a document in no split). For users who train the judge or
        rewriter on their own split, or to inspect the partition.
        """
        stats = _new_stats()
        for src, lineno, payload in self._reader.records():
            selected = self._select(src, lineno, payload, stats)
            if selected is None:
                continue
            record, text, doc_id, split = selected
            if all_splits or split == self.split:
                yield {
                    "doc_id": doc_id,
                    "split": split,
                    "text": text,
                    "meta": record.get("meta"),
                    "source_name": src.source_name,
                }

    def stream(self, state: dict[str, Any] | None = None) -> _SlotStream:
        """The calling process's slot stream, starting at ``state`` (else at ``start_states[slot]``)."""
        slot, num_slots = self.slot_info()
        if state is None:
            state = self.start_states.get(str(slot))
        return _SlotStream(self, slot, num_slots, copy.deepcopy(state) if state else None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.stream())
