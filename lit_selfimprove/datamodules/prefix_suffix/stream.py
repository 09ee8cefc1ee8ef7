"""The resumable shuffle stream of one slot (a data-parallel rank x dataloader worker): this slot's documents
cut into chunks, passed through the seeded shuffle buffer, with a position that can be saved after any item
and restored by re-reading the epoch up to it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import closing
from itertools import chain
from typing import TYPE_CHECKING, Any

from lit_selfimprove.datamodules.prefix_suffix.chunking import _Doc, _item, _make_doc
from lit_selfimprove.datamodules.prefix_suffix.sources import _Source
from lit_selfimprove.datamodules.prefix_suffix.splits import _hash_int

if TYPE_CHECKING:
    from lit_selfimprove.datamodules.prefix_suffix.dataset import PrefixSuffixDataset

log = logging.getLogger(__name__)


def _new_stats() -> dict[str, int]:
    return {
        "records": 0,
        "malformed": 0,
        "empty": 0,
        "filtered": 0,
        "other_split": 0,
        "too_short": 0,
        "documents": 0,
        "chunks": 0,
    }


class _SlotStream:
    """One slot's chunk stream and its restartable position (see the package docs).

    The position after each yielded item is :meth:`snapshot`: ``epoch``; ``doc`` / ``chunk``: the record
    index of the document being cut and how many of its chunks were taken (``doc=-1``: none yet);
    ``flushing``: the pass is over and the buffer is being drained; ``buffer``: ``[record index, chunk]`` of
    every buffered chunk, in buffer order; ``drawn``: shuffle draws so far (the draw's random number is a
    hash of it); ``produced``: items yielded in this epoch.
    """

    def __init__(self, ds: PrefixSuffixDataset, slot: int, num_slots: int, state: dict[str, Any] | None):
        self.ds, self.slot, self.num_slots = ds, slot, num_slots
        st = state or {}
        self.epoch = int(st.get("epoch", 0))
        self.doc = int(st.get("doc", -1))
        self.chunk = int(st.get("chunk", 0))
        self.flushing = bool(st.get("flushing", False))
        self.refs: list[tuple[int, int]] = [(int(r), int(k)) for r, k in st.get("buffer", [])]
        self.drawn = int(st.get("drawn", 0))
        self.produced = int(st.get("produced", 0))
        self._restoring = state is not None

    def snapshot(self) -> dict[str, Any]:
        """The position after the last yielded item (plain ints and lists: safe for ``weights_only`` loads)."""
        return {
            "epoch": self.epoch,
            "doc": self.doc,
            "chunk": self.chunk,
            "flushing": self.flushing,
            "buffer": [[r, k] for r, k in self.refs],
            "drawn": self.drawn,
            "produced": self.produced,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self._epoch()
            if not self.ds.repeat:
                return
            self.epoch += 1
            self.doc, self.chunk, self.flushing = -1, 0, False
            self.refs, self.drawn, self.produced = [], 0, 0

    def _draw(self, n: int) -> int:
        j = _hash_int(self.ds.config.seed, "shuffle", self.slot, self.epoch, self.drawn) % n
        self.drawn += 1
        return j

    def _epoch(self) -> Iterator[dict[str, Any]]:
        """One pass: restore the saved position (once, after a resume), stream, drain the buffer."""
        stats = _new_stats()
        self.ds.stats = stats
        restoring, self._restoring = self._restoring, False
        with closing(self._records()) as records:
            items, resume = self._restore(records, stats) if restoring else ([], None)
            if not self.flushing:
                yield from self._stream(records, items, resume, stats)
        self.flushing = True
        yield from self._drain(items)
        self._end_of_pass(stats)

    def _records(self) -> Iterator[tuple[int, _Source, int, Any]]:
        """``(record index, source, line, payload)`` of this slot's records, in stream order."""
        for raw, (src, lineno, payload) in enumerate(self.ds._reader.records()):
            if raw % self.num_slots == self.slot:
                yield raw, src, lineno, payload

    def _restore(
        self, records: Iterator[tuple[int, _Source, int, Any]], stats: dict[str, int]
    ) -> tuple[list[dict[str, Any]], tuple[int, int, _Doc | None] | None]:
        """Re-read this epoch up to the saved position, rebuilding the buffered items from their references;
        the records before it that the buffer does not reference are not even parsed. Returns the buffer and,
        ``(record index, first chunk, document)`` of the record to go on with (None when there is none)."""
        items: list[Any] = [None] * len(self.refs)
        pending: dict[int, list[int]] = {}  # record index -> positions in the buffer
        for pos, (raw, _) in enumerate(self.refs):
            pending.setdefault(raw, []).append(pos)
        resume_doc = -1 if self.flushing else self.doc
        for raw, src, lineno, payload in records if pending or not self.flushing else ():
            at_resume = not self.flushing and raw >= resume_doc
            if at_resume and raw > resume_doc >= 0:
                raise ValueError(self._mismatch(f"record {resume_doc} is not in this slot's stream"))
            if not at_resume and raw not in pending:
                continue
            doc = self._document(src, lineno, payload, stats)
            for pos in pending.pop(raw, ()):
                items[pos] = self._buffered_item(raw, doc, self.refs[pos][1])
            if at_resume:
                if pending:
                    raise ValueError(self._mismatch(f"buffered records {sorted(pending)} were not found"))
                return items, (raw, self.chunk if raw == resume_doc else 0, doc)
            if self.flushing and not pending:
                break
        if pending or resume_doc >= 0:
            raise ValueError(self._mismatch("the saved position lies beyond the end of the data"))
        return items, None

    def _buffered_item(self, raw: int, doc: _Doc | None, k: int) -> dict[str, Any]:
        if doc is None:
            raise ValueError(self._mismatch(f"record {raw} no longer yields chunks"))
        if k >= len(doc.starts):
            raise ValueError(self._mismatch(f"record {raw} has no chunk {k}"))
        return _item(self.ds.config, self.ds.get_tokenizer(), doc, k)

    def _stream(
        self,
        records: Iterator[tuple[int, _Source, int, Any]],
        items: list[dict[str, Any]],
        resume: tuple[int, int, _Doc | None] | None,
        stats: dict[str, int],
    ) -> Iterator[dict[str, Any]]:
        """Cut the rest of this slot's documents (from ``resume`` on) into items, yielded in stream order or
        through the shuffle buffer ``items``."""
        cap = self.ds.shuffle_buffer_size
        docs = (
            (raw, 0, self._document(src, lineno, payload, stats)) for raw, src, lineno, payload in records
        )
        for raw, first, doc in chain([resume] if resume else [], docs):
            if doc is None:
                continue
            for k in range(first, len(doc.starts)):
                item = _item(self.ds.config, self.ds.get_tokenizer(), doc, k)
                stats["chunks"] += 1
                self.doc, self.chunk = raw, k + 1
                if cap == 0:
                    self.produced += 1
                    yield item
                elif len(items) < cap:
                    items.append(item)
                    self.refs.append((raw, k))
                else:
                    j = self._draw(len(items))
                    out, items[j], self.refs[j] = items[j], item, (raw, k)
                    self.produced += 1
                    yield out

    def _drain(self, items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The buffered items, in shuffled order, at the end of the pass."""
        while items:
            j = self._draw(len(items))
            out = items[j]
            items[j], self.refs[j] = items[-1], self.refs[-1]
            items.pop()
            self.refs.pop()
            self.produced += 1
            yield out

    def _end_of_pass(self, stats: dict[str, int]) -> None:
        """Log the pass's counters; a pass without a single item is an error that says why."""
        ds = self.ds
        log.info(
            "PrefixSuffixDataset[%s] slot %d/%d epoch %d: %s",
            ds.split,
            self.slot,
            self.num_slots,
            self.epoch,
            stats,
        )
        if self.produced == 0:
            where = f" for slot {self.slot} of {self.num_slots}" if self.num_slots > 1 else ""
            raise ValueError(
                f"PrefixSuffixDataset: no {ds.split!r} chunks{where} after a full pass over {ds._reader.describe()}: "
                f"of {stats['records']} records read{where}, {stats['malformed']} were malformed (skipped), "
                f"{stats['empty']} empty or whitespace-only, "
                f"{stats['filtered']} removed by meta_filter={ds.meta_filter}, {stats['other_split']} in other "
                f"splits than {ds.split!r} ({ds.splits}), {stats['too_short']} shorter than min_prefix_tokens + "
                f"min_suffix_tokens = {ds.config.min_prefix_tokens + ds.config.min_suffix} tokens"
            )

    def _document(self, src: _Source, lineno: int, payload: Any, stats: dict[str, int]) -> _Doc | None:
        selected = self.ds._select(src, lineno, payload, stats)
        if selected is None:
            return None
        _, text, doc_id, split = selected
        if split != self.ds.split:
            stats["other_split"] += 1
            return None
        doc = _make_doc(self.ds.config, self.ds.get_tokenizer(), text, doc_id, self.epoch)
        if not doc.starts:
            stats["too_short"] += 1
            return None
        stats["documents"] += 1
        return doc

    def _mismatch(self, what: str) -> str:
        return (
            f"PrefixSuffixDataset: cannot restore the saved stream position of slot {self.slot} "
            f"(epoch {self.epoch}): {what}; the data or the stream configuration changed since it was saved"
        )
