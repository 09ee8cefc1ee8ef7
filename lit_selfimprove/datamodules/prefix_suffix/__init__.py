"""Prefix -> suffix chunks streamed from a text corpus, for Self-Improving Pretraining (SIP).

SIP (the Self-Improving Pretraining paper, section 2) replaces next-token prediction with sequence-level learning on
continuations: every document is cut into chunks of ``N`` tokens; the current chunk is the *suffix* (the
reference continuation a judge compares the policy's rollouts with) and the text before it, up to the
context window, is the *prefix* the policy continues. This module streams such pairs from local files or a
Hugging Face streaming dataset without ever holding the corpus in memory (one document at a time, plus the
optional shuffle buffer).

Sources (read in a fixed order: the given sources in order, the files of a folder or glob sorted by path,
then the ``hf_name`` dataset):

* ``.jsonl``, ``.jsonl.zst`` (stream-decompressed with ``zstandard``) and ``.jsonl.gz``: one JSON object per
  line; blank lines are ignored. Each line is decoded on its own: a line that is not valid UTF-8 is a
  malformed record (see ``skip_malformed``), not the end of the stream. The text is ``text_field`` (a dotted
  path such as ``"content.body"`` reaches into nested objects); a ``meta`` given as a JSON string (as in
  RedPajama-1T) is parsed.
* ``.txt``: the whole file is ONE document (no ``meta``). Paragraphs are not split into documents because
  the earlier paragraphs of an article or book are exactly the prefix a later chunk should be conditioned on.
* folders (searched recursively for the extensions above) and glob patterns (``**`` allowed).
* ``soar:PATH``: a SOAR run directory or rows file (PQ, teacher samples, sampled questions), rendered as
  question / answer documents once into a cached ``.jsonl`` (:mod:`~lit_selfimprove.datamodules.soar_corpus`;
  ``python -m lit_selfimprove soar-corpus`` renders them with a student's own solutions instead).
* ``hf_name``: ``datasets.load_dataset(hf_name, hf_config, split=hf_split, data_files=data_files,
  streaming=True)``: a hub id, a local dataset folder, or a builder such as ``"json"`` with ``data_files``. A
  name that looks like a local path (see :func:`~.sources._looks_local`) and does not exist fails at once.

Pipeline, for one *slot* (a data-parallel rank x dataloader worker; ``num_slots = world_size * num_workers``):

1. **Sharding.** Non-blank record number ``i`` (counted over all sources, before any filtering) belongs to
   slot ``i % num_slots``, where worker ``w`` of rank ``r`` is slot ``w * world_size + r`` (so a rank's
   documents, ``i % world_size == r``, do not depend on ``num_workers``); a slot parses and tokenizes only
   its own records, so ranks and workers never share a document. (Every slot still reads, without parsing,
   the whole stream.)
2. **Metadata filter.** ``meta_filter={"key": value or [values]}``: a record is kept when every key matches
   one of its values (``str`` comparison; values with ``*?[`` are ``fnmatch`` patterns, e.g. ``"cc/*"``;
   a list-valued field matches when one element does; a missing key never matches). Keys are resolved as:
   a dotted key (``"meta.source"``) is a path from the record's root; a plain key is looked up in the
   record's ``meta`` dict, then among the record's top-level fields, then in two derived keys:
   ``source_name`` (the file name without extensions, e.g. ``"sample_c4-rp1"``; ``hf_name`` for hub rows)
   and ``redpajama_set_name`` (``RedPajamaC4``, ``RedPajamaArXiv``, ``RedPajamaBook``,
   ``RedPajamaCommonCrawl``, ``RedPajamaGithub``, ``RedPajamaStackExchange``, ``RedPajamaWikipedia``),
   inferred from the file or folder name (``c4``, ``arxiv``, ``book``, ``cc``/``common_crawl``, ``github``,
   ``stackexchange``, ``wiki``/``wikipedia``) or from RedPajama-1T's ``red_pajama_subset`` field. SlimPajama
   carries ``meta.redpajama_set_name`` itself, so ``{"redpajama_set_name": ["RedPajamaC4", ...]}`` selects the
   same domains on SlimPajama, on RedPajama-1T and on the bundled RedPajama sample, whose per-domain ``meta``
   keys otherwise differ (``source`` exists for c4 / github / stackexchange only, the cc sample has no
   ``meta`` at all).
3. **Splits.** A document belongs to the split whose interval of ``[0, 1)`` (the ``splits`` fractions laid
   end to end in the given order; a remainder when they sum to less than 1 is used by no split) contains
   ``sha1(split_salt + key)`` read as a fraction, where ``key`` is the document's ``id_field`` value when one
   is configured, else its text. So policy / judge / rewriter / eval are disjoint and each document's split
   depends on nothing but the document: not on source order, sharding, ``seed`` or ``PYTHONHASHSEED``.
4. **Chunks.** A document whose text is empty or whitespace only is skipped and counted (``empty``). The text
   is tokenized without added special tokens (literal special-token text such as ``"<eos>"`` inside a
   document is tokenized as ordinary text), in pieces of at most ``piece_chars`` (100,000) characters cut
   between words (see :func:`~.chunking.text_pieces`), so that a huge document does not take the tokenizer's
   memory per character times its length. Suffix ``k`` starts at token ``s_k`` and holds ``suffix_tokens``
   tokens; its prefix is the ``context_length - suffix_tokens`` tokens before it (fewer at the start of a
   document, never fewer than ``min_prefix_tokens``). ``split_mode="fixed"``:
   ``s_k = min_prefix_tokens + k * suffix_tokens``; ``"random"``: the same grid shifted by a random offset
   in ``[0, suffix_tokens)`` drawn per document and epoch from ``seed`` (deterministic, different every
   epoch); with ``max_chunks_per_doc`` the first chunks are kept (fixed) or a random subset (random). A tail
   shorter than ``min_suffix_tokens`` (default: ``suffix_tokens``, i.e. only full chunks) is dropped, and a
   document with fewer than ``min_prefix_tokens + min_suffix_tokens`` tokens is skipped and counted.
5. **Shuffle buffer** (``shuffle_buffer_size``; 0 keeps document order): reservoir-style, the random slot
   for the ``t``-th draw is a hash of ``(seed, slot, epoch, t)``, so the order is reproducible from a
   counter. At the end of a pass the buffer is drained, then (``repeat=True``) the next epoch starts over.

Item texts are ``tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`` of
exactly the item's tokens, so characters the tokenizer maps to its unknown token vanish from the texts, and a
byte-level BPE token cut in the middle of a multi-byte character decodes to a replacement character.

Restarts: a slot's position is ``(epoch, record index and chunk of the document being cut, the buffered
chunks as (record index, chunk) references, draw counter)``. :class:`PrefixSuffixDataModule` keeps, per slot,
the position after the last batch *actually used* for training (reported by the Trainer's
``on_before_batch_transfer`` hook, not by the prefetching dataloader), saves it in ``state_dict()`` and
starts every new training iterator there, so a resumed run neither replays nor skips a chunk. Restoring
re-reads the current epoch up to that position (parsing and tokenizing only the documents that the buffer
references).

Layout: ``sources`` (file and hub readers, record parsing), ``meta_filter``, ``splits`` (hashed splits),
``chunking`` (tokenizing in pieces, chunks, collation), ``stream`` (a slot's resumable shuffle stream),
``dataset``, ``datamodule``, and ``config`` (the arguments the Dataset and the DataModule share). jsonl lines
are read and decoded by :mod:`lit_selfimprove.datamodules.readers`, shared with the problem loader.
"""

from __future__ import annotations

from lit_selfimprove.datamodules.prefix_suffix.chunking import collate_prefix_suffix
from lit_selfimprove.datamodules.prefix_suffix.config import SPLIT_MODES, CorpusConfig
from lit_selfimprove.datamodules.prefix_suffix.datamodule import PrefixSuffixDataModule
from lit_selfimprove.datamodules.prefix_suffix.dataset import PrefixSuffixDataset
from lit_selfimprove.datamodules.prefix_suffix.sources import resolve_source_files
from lit_selfimprove.datamodules.prefix_suffix.splits import DEFAULT_SPLITS, assign_split

__all__ = [
    "DEFAULT_SPLITS",
    "SPLIT_MODES",
    "CorpusConfig",
    "PrefixSuffixDataModule",
    "PrefixSuffixDataset",
    "assign_split",
    "collate_prefix_suffix",
    "resolve_source_files",
]
