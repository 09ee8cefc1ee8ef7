"""Prefix -> suffix chunks streamed from a text corpus, for Self-Improving Pretraining (SIP).

SIP (``docs/METHODS.md`` section 2) replaces next-token prediction with sequence-level learning on
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
* ``hf_name``: ``datasets.load_dataset(hf_name, hf_config, split=hf_split, data_files=data_files,
  streaming=True)``: a hub id, a local dataset folder, or a builder such as ``"json"`` with ``data_files``. A
  name that looks like a local path (see :func:`_looks_local`) and does not exist fails at once.

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
   document is tokenized as ordinary text), in pieces of at most 100,000 characters cut between words (see
   :func:`_text_pieces`), so that a huge document does not take the tokenizer's memory per character times
   its length. Suffix ``k`` starts at token ``s_k`` and holds ``suffix_tokens`` tokens; its prefix is the
   ``context_length - suffix_tokens`` tokens before it (fewer at the start of a document, never fewer than
   ``min_prefix_tokens``). ``split_mode="fixed"``:
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
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import logging
import math
import os
import random
import re
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

__all__ = [
    "DEFAULT_SPLITS",
    "SPLIT_MODES",
    "PrefixSuffixDataModule",
    "PrefixSuffixDataset",
    "assign_split",
    "collate_prefix_suffix",
    "resolve_source_files",
]

log = logging.getLogger(__name__)

DEFAULT_SPLITS: dict[str, float] = {"policy": 0.8, "judge": 0.05, "rewriter": 0.05, "eval": 0.1}
SPLIT_MODES = ("fixed", "random")

# Longest suffix first so that "x.jsonl.zst" is not taken for ".jsonl".
_FILE_SUFFIXES = (".jsonl.zst", ".jsonl.gz", ".jsonl", ".txt")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A name ending in a letters-only extension (".jsonl", ".gz", a typo such as ".jsnol") names a file.
_FILE_EXT_RE = re.compile(r"\.[A-Za-z]{1,5}$")
# Longest piece of a document tokenized in one call: the tokenizer's working memory (hundreds of bytes per
# character for a fast tokenizer) is bounded by it instead of by the document's length.
_PIECE_CHARS = 100_000
_STATE_KEY = "_stream_state"  # batch key carrying the producing slot's position (popped before training)
_STATE_VERSION = 1

_REDPAJAMA_SET_RE = re.compile(
    r"(?<![a-z])(arxiv|books?|c4|cc|common_?crawl|github|stackexchange|wikipedia|wiki)(?![a-z])"
)
_REDPAJAMA_SETS = {
    "arxiv": "RedPajamaArXiv",
    "book": "RedPajamaBook",
    "books": "RedPajamaBook",
    "c4": "RedPajamaC4",
    "cc": "RedPajamaCommonCrawl",
    "common_crawl": "RedPajamaCommonCrawl",
    "commoncrawl": "RedPajamaCommonCrawl",
    "github": "RedPajamaGithub",
    "stackexchange": "RedPajamaStackExchange",
    "wiki": "RedPajamaWikipedia",
    "wikipedia": "RedPajamaWikipedia",
}


class _Malformed(Exception):
    """A record that cannot be used (reason in the message; ``lineno`` overrides the record's line)."""

    def __init__(self, reason: str, lineno: int | None = None) -> None:
        super().__init__(reason)
        self.lineno = lineno


# ----------------------------------------------------------------------------------------------------------
# hashing helpers (stable across processes: no use of Python's randomized hash())
# ----------------------------------------------------------------------------------------------------------


def _hash_int(*parts: Any) -> int:
    """A 64-bit integer determined by ``parts`` only (used as a counter-based random number)."""
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _split_point(key: str, salt: str = "") -> float:
    """``sha1(salt + key)`` as a fraction in ``[0, 1)``."""
    digest = hashlib.sha1((salt + key).encode("utf-8")).hexdigest()
    return int(digest[:13], 16) / float(16**13)


def _check_splits(splits: Mapping[str, float]) -> dict[str, float]:
    """Validate split fractions (each > 0, total <= 1) and return them as a plain dict."""
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(f"splits must be a non-empty mapping name -> fraction, got {splits!r}")
    out: dict[str, float] = {}
    for name, frac in splits.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"split names must be non-empty strings, got {name!r}")
        if (
            isinstance(frac, bool)
            or not isinstance(frac, (int, float))
            or not math.isfinite(frac)
            or frac <= 0
        ):
            raise ValueError(f"split fraction of {name!r} must be a number > 0, got {frac!r}")
        out[name] = float(frac)
    total = sum(out.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"split fractions must sum to at most 1, got {total:g} for {out}")
    return out


def assign_split(key: str, splits: Mapping[str, float] = DEFAULT_SPLITS, salt: str = "") -> str | None:
    """The split of a document whose key (its id, or its text) is ``key``; None when it falls in no split.

    The splits' fractions are laid end to end on ``[0, 1)`` in the given order and the document goes to the
    interval that contains ``sha1(salt + key)`` read as a fraction, so the assignment is a pure function of
    the document (and the split configuration).
    """
    u = _split_point(key, salt)
    acc = 0.0
    for name, frac in splits.items():
        acc += frac
        if u < acc:
            return name
    return None


# ----------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in _FILE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def resolve_source_files(sources: str | Sequence[str]) -> list[Path]:
    """Expand files, folders (recursive) and glob patterns into the ordered list of readable files.

    Folders and globs contribute their supported files (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``, ``.txt``)
    sorted by path; a file listed twice is read once (at its first place).

    Raises:
        FileNotFoundError: A source that does not exist, or a folder / glob without supported files.
        ValueError: A file given explicitly whose extension is not supported.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    from lit_selfimprove.assets import resolve

    for source in sources:
        source = resolve(str(source))  # builtin:tiny-facts -> the bundled corpus
        if _GLOB_CHARS.search(source):
            found: list[Path] = []
            for match in sorted(glob.glob(source, recursive=True)):
                p = Path(match)
                if p.is_dir():
                    found.extend(q for q in sorted(p.rglob("*")) if q.is_file() and _file_kind(q))
                elif p.is_file() and _file_kind(p):
                    found.append(p)
            if not found:
                raise FileNotFoundError(
                    f"no {'/'.join(_FILE_SUFFIXES)} file matches the glob pattern {source!r}"
                )
            for p in found:
                add(p)
        elif Path(source).is_dir():
            found = [q for q in sorted(Path(source).rglob("*")) if q.is_file() and _file_kind(q)]
            if not found:
                raise FileNotFoundError(f"folder {source!r} holds no {'/'.join(_FILE_SUFFIXES)} file")
            for p in found:
                add(p)
        elif Path(source).is_file():
            if _file_kind(Path(source)) is None:
                raise ValueError(
                    f"unsupported source file {source!r}: expected one of {', '.join(_FILE_SUFFIXES)}"
                )
            add(Path(source))
        else:
            hint = ""
            if _HUB_ID_RE.match(source) and not _looks_local(source):
                hint = f" (a Hugging Face dataset id? pass it as hf_name={source!r})"
            raise FileNotFoundError(f"source not found: {source!r}{hint}")
    return files


def _looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``org/name``): it starts with ``/``,
    ``.`` or ``~``, has a backslash or more than one ``/``, or ends in a file extension (letters only)."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or bool(_FILE_EXT_RE.search(name))
    )


def _check_hf_name(hf_name: str) -> None:
    """Fail fast on an ``hf_name`` that names a missing local file (else ``datasets`` tries the hub)."""
    if not Path(hf_name).expanduser().exists() and _looks_local(hf_name):
        raise FileNotFoundError(
            f"hf_name={hf_name!r} looks like a local path but does not exist (hub ids look like 'org/name')"
        )


def _infer_redpajama_set(*names: str) -> str | None:
    """RedPajama set name (``RedPajamaC4``, ...) from file / folder / subset names, the first that has one."""
    for name in names:
        match = _REDPAJAMA_SET_RE.search(name.lower())
        if match:
            return _REDPAJAMA_SETS[match.group(1).replace("-", "_")]
    return None


@dataclass(frozen=True)
class _Source:
    """One source: a local file (``kind`` is its extension) or the ``hf_name`` dataset (``kind="hf"``)."""

    kind: str
    where: str  # path, or the hub name, used in messages
    source_name: str
    set_name: str | None


def _file_source(path: Path) -> _Source:
    kind = _file_kind(path) or ""
    stem = path.name[: len(path.name) - len(kind)] if kind else path.stem
    parents = [p.name for p in list(path.parents)[:2]]
    return _Source(kind, str(path), stem, _infer_redpajama_set(stem, *parents))


def _open_lines(path: Path) -> IO[bytes]:
    """Open a (possibly compressed) file for streaming iteration over its lines as bytes (decoded per record,
    so that an invalid UTF-8 byte spoils one record, not the stream)."""
    name = path.name.lower()
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as err:  # pragma: no cover - zstandard is a core dependency
            raise ImportError("reading .zst files needs zstandard: pip install zstandard") from err
        raw = path.open("rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def _decode_utf8(data: bytes, multiline: bool = False) -> str:
    """``data`` decoded as UTF-8; raises :class:`_Malformed` at the first invalid byte (with its line number
    when ``data`` is a whole file)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        column = err.start - data.rfind(b"\n", 0, err.start)
        lineno = data.count(b"\n", 0, err.start) + 1 if multiline else None
        raise _Malformed(
            f"invalid UTF-8 (byte 0x{data[err.start]:02x} at byte {column} of the line)", lineno
        ) from None


def _text_pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``size`` characters, each cut (in the second half of its
    window) before a single space between two non-space characters: where byte-level BPE pre-tokenizers
    (GPT-2, Llama 3) start a word anyway, so that they and a char tokenizer tokenize the pieces exactly as the
    whole text. Without such a space the cut falls inside a word (avoiding whitespace runs), where a BPE
    tokenization may differ from the one-call one, and so may SentencePiece's (dummy prefix) at every cut.
    """
    start = 0
    while len(text) - start > size:
        end, lo = start + size, start + size // 2
        cut = text.rfind(" ", lo, end)
        while cut > lo and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", lo, cut)
        if cut <= lo:
            cut = end
            while cut > lo and text[cut - 1].isspace() and text[cut].isspace():
                cut -= 1
            cut = cut if cut > lo else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _get_path(obj: Any, dotted: str) -> tuple[bool, Any]:
    """``(found, value)`` of a dotted path (``"meta.source"``) inside nested dicts."""
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def _parse_meta(meta: Any) -> Any:
    """``meta`` given as a JSON (or Python-literal) string -> dict; anything else unchanged."""
    if isinstance(meta, str):
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(meta)
            except (ValueError, SyntaxError, TypeError):
                continue
            if isinstance(value, dict):
                return value
    return meta


def _value_matches(value: Any, allowed: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_value_matches(v, allowed) for v in value)
    if isinstance(allowed, str) and _GLOB_CHARS.search(allowed):
        return fnmatch.fnmatchcase(str(value), allowed)
    return value == allowed or str(value) == str(allowed)


# ----------------------------------------------------------------------------------------------------------
# collate
# ----------------------------------------------------------------------------------------------------------


def collate_prefix_suffix(
    items: Sequence[dict[str, Any]], pad_id: int, suffix_len: int | None = None
) -> dict[str, Any]:
    """Items -> the batch SIP modules consume.

    Returns ``prefix_ids`` / ``prefix_mask`` ``[B, P]`` LEFT-padded with ``pad_id`` (P = the longest prefix),
    ``suffix_ids`` / ``suffix_mask`` ``[B, N]`` RIGHT-padded (N = ``suffix_len`` when given, else the longest
    suffix), ``prefix_text`` / ``suffix_text`` / ``doc_id`` lists, and ``suffix_start`` ``[B]`` (the
    suffix's token offset in its document).
    """
    if not items:
        raise ValueError("collate_prefix_suffix needs at least one item")
    b = len(items)
    p_len = max(len(it["prefix_ids"]) for it in items)
    s_len = max(len(it["suffix_ids"]) for it in items)
    if suffix_len is not None:
        if s_len > suffix_len:
            raise ValueError(f"a suffix has {s_len} tokens, more than suffix_len={suffix_len}")
        s_len = suffix_len
    prefix_ids = torch.full((b, p_len), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((b, p_len), dtype=torch.long)
    suffix_ids = torch.full((b, s_len), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((b, s_len), dtype=torch.long)
    for i, it in enumerate(items):
        p = torch.as_tensor(it["prefix_ids"], dtype=torch.long)
        s = torch.as_tensor(it["suffix_ids"], dtype=torch.long)
        if len(p):
            prefix_ids[i, p_len - len(p) :] = p
            prefix_mask[i, p_len - len(p) :] = 1
        suffix_ids[i, : len(s)] = s
        suffix_mask[i, : len(s)] = 1
    return {
        "prefix_ids": prefix_ids,
        "prefix_mask": prefix_mask,
        "suffix_ids": suffix_ids,
        "suffix_mask": suffix_mask,
        "prefix_text": [it["prefix_text"] for it in items],
        "suffix_text": [it["suffix_text"] for it in items],
        "doc_id": [it["doc_id"] for it in items],
        "suffix_start": torch.tensor([int(it["suffix_start"]) for it in items], dtype=torch.long),
    }


# ----------------------------------------------------------------------------------------------------------
# the streaming dataset
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Doc:
    """A document of the selected split, tokenized, with its suffix start positions."""

    doc_id: str
    tokens: array  # int32 token ids (4 bytes a token, where a list of ints takes ~10 times more)
    starts: Sequence[int]


def _rank_world_from_env() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else the launcher's env, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    world = os.environ.get("WORLD_SIZE")
    if world is not None:
        for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK"):
            if key in os.environ:
                return int(os.environ[key]), int(world)
    return 0, 1


class PrefixSuffixDataset(IterableDataset):
    """Streams ``(prefix, suffix)`` chunk items of one split of a corpus (see the module docs).

    Each item is ``{"prefix_ids": LongTensor[P], "suffix_ids": LongTensor[<=N], "prefix_text": str,
    "suffix_text": str, "doc_id": str, "suffix_start": int}``; batch them with
    :func:`collate_prefix_suffix`. Iterating shards by ``rank`` / ``world_size`` (default: torch.distributed,
    else the launcher's environment, else 0 / 1) and by dataloader worker.

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
        meta_filter: Keep only records whose metadata match (see the module docs).
        suffix_tokens: Tokens per suffix chunk (N).
        context_length: Prefix + suffix tokens at most; the prefix keeps its last
            ``context_length - suffix_tokens`` tokens.
        min_prefix_tokens: Tokens before the first suffix (every suffix has at least this much prefix).
        min_suffix_tokens: Shortest tail chunk kept (default ``suffix_tokens``: full chunks only).
        split_mode: ``"fixed"`` or ``"random"`` chunk boundaries.
        max_chunks_per_doc: Keep at most this many chunks per document.
        splits: Split name -> fraction of documents (each > 0, sum <= 1).
        split_salt: Salt of the split hash; change it only to draw a different partition.
        seed: Seed of the random split points and the shuffle buffer (not of the splits).
        shuffle_buffer_size: Chunks held for shuffling (0: stream order).
        repeat: Start over (next epoch) after a full pass; otherwise stop.
        skip_malformed: Skip and count malformed records instead of raising.
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
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_chunking(
            suffix_tokens, context_length, min_prefix_tokens, min_suffix_tokens, max_chunks_per_doc
        )
        if split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {split_mode!r}")
        self.splits = _check_splits(DEFAULT_SPLITS if splits is None else splits)
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; splits are {list(self.splits)}")
        if shuffle_buffer_size < 0:
            raise ValueError(f"shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}")
        if meta_filter is not None and (
            not isinstance(meta_filter, Mapping) or not all(isinstance(k, str) and k for k in meta_filter)
        ):
            raise ValueError(f"meta_filter must map field names to allowed values, got {meta_filter!r}")
        if data_files is not None and hf_name is None:
            raise ValueError(
                "data_files is forwarded to datasets.load_dataset: also pass hf_name (e.g. 'json')"
            )
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if sources is None and hf_name is None:
            raise ValueError("no source given: pass sources (files, folders, globs) and/or hf_name")
        if hf_name is not None:
            _check_hf_name(hf_name)
        self.sources = [] if sources is None else ([sources] if isinstance(sources, str) else list(sources))
        self.files = resolve_source_files(self.sources) if self.sources else []
        self._file_sources = [_file_source(p) for p in self.files]
        self.tokenizer = tokenizer
        self.split = split
        self.hf_name, self.hf_config, self.hf_split, self.data_files = (
            hf_name,
            hf_config,
            hf_split,
            data_files,
        )
        self.text_field, self.id_field = text_field, id_field
        self.meta_filter = (
            {k: list(v) if isinstance(v, (list, tuple, set)) else [v] for k, v in meta_filter.items()}
            if meta_filter
            else None
        )
        self.suffix_tokens, self.context_length = suffix_tokens, context_length
        self.min_prefix_tokens = min_prefix_tokens
        self.min_suffix_tokens = suffix_tokens if min_suffix_tokens is None else min_suffix_tokens
        self.split_mode, self.max_chunks_per_doc = split_mode, max_chunks_per_doc
        self.split_salt, self.seed = split_salt, seed
        self.shuffle_buffer_size, self.repeat = shuffle_buffer_size, repeat
        self.skip_malformed = skip_malformed
        self.rank, self.world_size = rank, world_size
        # Per-slot start positions (slot id as str -> position), set by the DataModule before iterating.
        self.start_states: dict[str, dict[str, Any]] = {}
        self.stats: dict[str, int] = {}  # counters of the latest pass in this process
        self._hf_ds = None

    # -- plumbing ------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_hf_ds"] = None  # re-created lazily in each worker
        return state

    def get_tokenizer(self) -> Any:
        """The tokenizer object (loaded on first use when given by name)."""
        if isinstance(self.tokenizer, (str, os.PathLike)):
            from lit_selfimprove.modeling import load_tokenizer

            self.tokenizer = load_tokenizer(str(self.tokenizer))
        return self.tokenizer

    @property
    def max_prefix_tokens(self) -> int:
        return self.context_length - self.suffix_tokens

    def slot_info(self) -> tuple[int, int]:
        """``(slot, num_slots)`` of the calling process: ``worker_id * world_size + rank``."""
        rank, world = (self.rank, self.world_size) if self.world_size is not None else _rank_world_from_env()
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        # Worker-major: rank r's slots are r, r + world, ..., so the documents of a rank (all its workers
        # together) are those with index % world_size == rank whatever num_workers is.
        return wid * world + rank, world * workers

    def _describe(self) -> str:
        parts = [str(s) for s in self.sources]
        if self.hf_name is not None:
            parts.append(f"hf:{self.hf_name}" + (f"[{self.hf_config}]" if self.hf_config else ""))
        return ", ".join(parts)

    # -- reading -------------------------------------------------------------------------------------------

    def _hf_rows(self) -> Iterator[dict[str, Any]]:
        if self._hf_ds is None:
            import datasets

            ds = datasets.load_dataset(
                self.hf_name, self.hf_config, split=self.hf_split, data_files=self.data_files, streaming=True
            )
            if isinstance(ds, Mapping):  # no split selected: an IterableDatasetDict
                if len(ds) != 1:
                    raise ValueError(f"{self.hf_name}: several splits {sorted(ds)}; pass hf_split=...")
                ds = next(iter(ds.values()))
            self._hf_ds = ds
        # .iter() rather than iteration: inside a DataLoader worker, iterating a datasets.IterableDataset
        # hands each worker only some of its shards, while this stream shards by record index itself.
        for batch in self._hf_ds.iter(batch_size=256):
            columns = list(batch)
            for i in range(len(batch[columns[0]]) if columns else 0):
                yield {c: batch[c][i] for c in columns}

    def _iter_raw(self) -> Iterator[tuple[_Source, int, Any]]:
        """Every record of every source, unparsed: ``(source, line / row number, payload)``."""
        for src, path in zip(self._file_sources, self.files):
            if src.kind == ".txt":
                yield src, 1, path
                continue
            with _open_lines(path) as fh:
                for lineno, line in enumerate(fh, start=1):
                    if line and not line.isspace():  # bytes: blank means ASCII whitespace only
                        yield src, lineno, line
        if self.hf_name is not None:
            src = _Source("hf", self.hf_name, self.hf_name, None)
            for row_no, row in enumerate(self._hf_rows(), start=1):
                yield src, row_no, row

    def _parse(self, src: _Source, lineno: int, payload: Any) -> tuple[dict[str, Any], str]:
        """Payload -> ``(record, text)``; raises :class:`_Malformed`."""
        if src.kind == ".txt":  # universal newlines, as in text mode
            text = _decode_utf8(Path(payload).read_bytes(), multiline=True)
            return {}, text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text
        if isinstance(payload, bytes):
            payload = _decode_utf8(payload)
        if isinstance(payload, str):
            try:
                record = json.loads(payload)
            except json.JSONDecodeError as err:
                raise _Malformed(f"invalid JSON ({err.msg} at column {err.colno})") from None
        else:
            record = payload
        if not isinstance(record, dict):
            raise _Malformed(f"expected a JSON object, got {type(record).__name__}")
        if "meta" in record:
            record["meta"] = _parse_meta(record["meta"])
        found, text = _get_path(record, self.text_field)
        if not found:
            raise _Malformed(f"no text field {self.text_field!r} (fields: {sorted(record)})")
        if not isinstance(text, str):
            raise _Malformed(f"text field {self.text_field!r} is {type(text).__name__}, not a string")
        return record, text

    def _lookup(self, record: dict[str, Any], src: _Source, key: str) -> tuple[bool, Any]:
        if "." in key:
            return _get_path(record, key)
        meta = record.get("meta")
        if isinstance(meta, Mapping) and key in meta:
            return True, meta[key]
        if key in record:
            return True, record[key]
        if key == "source_name":
            return True, src.source_name
        if key == "redpajama_set_name":
            subset = record.get("red_pajama_subset")
            name = _infer_redpajama_set(subset) if isinstance(subset, str) else None
            name = name or src.set_name
            return name is not None, name
        return False, None

    def _keep(self, record: dict[str, Any], src: _Source) -> bool:
        if not self.meta_filter:
            return True
        for key, allowed in self.meta_filter.items():
            found, value = self._lookup(record, src, key)
            if not found or not any(_value_matches(value, a) for a in allowed):
                return False
        return True

    def _doc_key(self, record: dict[str, Any], text: str) -> tuple[str, str]:
        """``(doc_id, split key)``; raises :class:`_Malformed` when ``id_field`` is missing."""
        if self.id_field is None:
            return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16], text
        found, value = _get_path(record, self.id_field)
        if not found or value is None or str(value) == "":
            raise _Malformed(f"no id field {self.id_field!r}")
        return str(value), str(value)

    def _select(
        self, src: _Source, lineno: int, payload: Any, stats: dict[str, int]
    ) -> tuple[dict[str, Any], str, str, str | None] | None:
        """Parse, filter and assign a split: ``(record, text, doc_id, split)`` or None (counted)."""
        stats["records"] += 1
        try:
            record, text = self._parse(src, lineno, payload)
            empty = not text or text.isspace()
            keep = not empty and self._keep(record, src)
            doc_id, key = self._doc_key(record, text) if keep else ("", "")
        except _Malformed as err:
            if not self.skip_malformed:
                unit = "row" if src.kind == "hf" else "line"
                at = err.lineno or lineno
                raise ValueError(f"{src.where}: malformed record at {unit} {at}: {err}") from None
            stats["malformed"] += 1
            return None
        if empty:
            stats["empty"] += 1
            return None
        if not keep:
            stats["filtered"] += 1
            return None
        return record, text, doc_id, assign_split(key, self.splits, self.split_salt)

    def _chunk_starts(self, n_tokens: int, doc_id: str, epoch: int) -> Sequence[int]:
        m, n, ms = self.min_prefix_tokens, self.suffix_tokens, self.min_suffix_tokens
        if n_tokens < m + ms:
            return range(0)
        rng = None
        offset = 0
        if self.split_mode == "random":
            rng = random.Random(_hash_int(self.seed, "cut", doc_id, epoch))
            offset = rng.randrange(min(n, n_tokens - m - ms + 1))
        starts: Sequence[int] = range(m + offset, n_tokens - ms + 1, n)
        limit = self.max_chunks_per_doc
        if limit is not None and len(starts) > limit:
            starts = sorted(rng.sample(starts, limit)) if rng is not None else starts[:limit]
        return starts

    def _make_doc(self, text: str, doc_id: str, epoch: int) -> _Doc:
        """Tokenize ``text`` in pieces of at most ``_PIECE_CHARS`` characters (see :func:`_text_pieces`), so
        that the tokenizer's memory does not grow with the document, into a compact int32 array."""
        tok = self.get_tokenizer()
        tokens = array("i")
        for piece in _text_pieces(text, _PIECE_CHARS):
            tokens.extend(
                tok(piece, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
            )
        return _Doc(doc_id, tokens, self._chunk_starts(len(tokens), doc_id, epoch))

    def _item(self, doc: _Doc, k: int) -> dict[str, Any]:
        s = doc.starts[k]
        prefix = doc.tokens[max(0, s - self.max_prefix_tokens) : s].tolist()
        suffix = doc.tokens[s : s + self.suffix_tokens].tolist()
        tok = self.get_tokenizer()

        def decode(ids: list[int]) -> str:
            return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        return {
            "prefix_ids": torch.tensor(prefix, dtype=torch.long),
            "suffix_ids": torch.tensor(suffix, dtype=torch.long),
            "prefix_text": decode(prefix),
            "suffix_text": decode(suffix),
            "doc_id": doc.doc_id,
            "suffix_start": s,
        }

    # -- public iteration ----------------------------------------------------------------------------------

    def iter_documents(self, all_splits: bool = False) -> Iterator[dict[str, Any]]:
        """Documents that pass the filter, without tokenizing: ``{"doc_id", "split", "text", "meta",
        "source_name"}``, in stream order, all slots together. Only this split's documents unless
        ``all_splits`` (then ``split`` is None for a document in no split). For users who train the judge or
        rewriter on their own split, or to inspect the partition.
        """
        stats = _new_stats()
        for src, lineno, payload in self._iter_raw():
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


def _check_chunking(
    suffix_tokens: int,
    context_length: int,
    min_prefix_tokens: int,
    min_suffix_tokens: int | None,
    max_chunks_per_doc: int | None,
) -> None:
    if suffix_tokens < 1:
        raise ValueError(f"suffix_tokens must be >= 1, got {suffix_tokens}")
    if suffix_tokens >= context_length:
        raise ValueError(
            f"suffix_tokens ({suffix_tokens}) must be < context_length ({context_length}) to leave room for a prefix"
        )
    if not 1 <= min_prefix_tokens <= context_length - suffix_tokens:
        raise ValueError(
            f"min_prefix_tokens must be in [1, context_length - suffix_tokens = {context_length - suffix_tokens}], "
            f"got {min_prefix_tokens}"
        )
    if min_suffix_tokens is not None and not 1 <= min_suffix_tokens <= suffix_tokens:
        raise ValueError(f"min_suffix_tokens must be in [1, suffix_tokens], got {min_suffix_tokens}")
    if max_chunks_per_doc is not None and max_chunks_per_doc < 1:
        raise ValueError(f"max_chunks_per_doc must be >= 1 or None, got {max_chunks_per_doc}")


class _SlotStream:
    """One slot's chunk stream and its restartable position (see the module docs).

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
        j = _hash_int(self.ds.seed, "shuffle", self.slot, self.epoch, self.drawn) % n
        self.drawn += 1
        return j

    def _epoch(self) -> Iterator[dict[str, Any]]:
        ds, cap = self.ds, self.ds.shuffle_buffer_size
        stats = _new_stats()
        ds.stats = stats
        # On a restore: rebuild the buffered chunks from their references while re-reading the epoch up to
        # the saved position; documents before it that the buffer does not reference are not even parsed.
        restoring, self._restoring = self._restoring, False
        resume_doc = self.doc if restoring and not self.flushing else -1
        resume_chunk = self.chunk
        pending: dict[int, list[int]] = {}
        items: list[dict[str, Any] | None] = []
        if restoring:
            items = [None] * len(self.refs)
            for pos, (raw, _) in enumerate(self.refs):
                pending.setdefault(raw, []).append(pos)
        scan_only = restoring and self.flushing  # the pass had ended: only the buffer is needed
        reached = resume_doc < 0

        if not (scan_only and not pending):
            for raw, (src, lineno, payload) in enumerate(ds._iter_raw()):
                if raw % self.num_slots != self.slot:
                    continue
                if scan_only and not pending:
                    break
                before = scan_only or raw < resume_doc
                if before and raw not in pending:
                    continue
                if not before and not reached:
                    if raw > resume_doc:
                        raise ValueError(self._mismatch(f"record {resume_doc} is not in this slot's stream"))
                    reached = True
                doc = self._document(src, lineno, payload, stats)
                if raw in pending:
                    if doc is None:
                        raise ValueError(self._mismatch(f"record {raw} no longer yields chunks"))
                    for pos in pending.pop(raw):
                        k = self.refs[pos][1]
                        if k >= len(doc.starts):
                            raise ValueError(self._mismatch(f"record {raw} has no chunk {k}"))
                        items[pos] = ds._item(doc, k)
                if before:
                    continue
                if pending:
                    raise ValueError(self._mismatch(f"buffered records {sorted(pending)} were not found"))
                if doc is None:
                    continue
                first = resume_chunk if raw == resume_doc else 0
                for k in range(first, len(doc.starts)):
                    item = ds._item(doc, k)
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
        if pending or not reached:
            raise ValueError(self._mismatch("the saved position lies beyond the end of the data"))

        self.flushing = True
        while items:
            j = self._draw(len(items))
            out = items[j]
            items[j], self.refs[j] = items[-1], self.refs[-1]
            items.pop()
            self.refs.pop()
            self.produced += 1
            yield out
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
                f"PrefixSuffixDataset: no {ds.split!r} chunks{where} after a full pass over {ds._describe()}: "
                f"of {stats['records']} records read{where}, {stats['malformed']} were malformed (skipped), "
                f"{stats['empty']} empty or whitespace-only, "
                f"{stats['filtered']} removed by meta_filter={ds.meta_filter}, {stats['other_split']} in other "
                f"splits than {ds.split!r} ({ds.splits}), {stats['too_short']} shorter than min_prefix_tokens + "
                f"min_suffix_tokens = {ds.min_prefix_tokens + ds.min_suffix_tokens} tokens"
            )

    def _document(self, src: _Source, lineno: int, payload: Any, stats: dict[str, int]) -> _Doc | None:
        selected = self.ds._select(src, lineno, payload, stats)
        if selected is None:
            return None
        _, text, doc_id, split = selected
        if split != self.ds.split:
            stats["other_split"] += 1
            return None
        doc = self.ds._make_doc(text, doc_id, self.epoch)
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


class _BatchedStream(IterableDataset):
    """Collated batches of a :class:`PrefixSuffixDataset`, each tagged with its slot's position."""

    def __init__(self, dataset: PrefixSuffixDataset, batch_size: int, pad_id: int, suffix_len: int) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.pad_id, self.suffix_len = dataset, batch_size, pad_id, suffix_len

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self.dataset.stream()
        it = iter(stream)
        while True:
            items = list(islice(it, self.batch_size))
            if not items:
                return
            batch = collate_prefix_suffix(items, self.pad_id, self.suffix_len)
            batch[_STATE_KEY] = {
                "slot": stream.slot,
                "num_slots": stream.num_slots,
                "state": stream.snapshot(),
            }
            yield batch


class _ListDataset(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _identity(batch: Any) -> Any:
    return batch


class _ResumableLoader(DataLoader):
    """The training DataLoader: every iterator starts at the DataModule's consumed position.

    Outside a running ``Trainer.fit`` a batch counts as consumed when this loader hands it out; inside,
    when the Trainer passes it to ``on_before_batch_transfer`` (Lightning fetches one batch ahead).
    """

    datamodule: PrefixSuffixDataModule | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dm = self.datamodule
        stream: _BatchedStream = self.dataset
        num_slots = stream.dataset.slot_info()[1] * max(1, self.num_workers)
        if dm is not None:
            stream.dataset.start_states = dm._start_states(num_slots)
            driven = dm._trainer_is_fitting()
        else:
            driven = True
        return self._consume(super().__iter__(), driven)

    def state_dict(self) -> dict[str, Any]:
        """Empty: the position lives in the DataModule's ``state_dict`` (defined so that Lightning sees a
        resumable loader and does not warn about mid-epoch checkpoints)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore here (see :meth:`state_dict`)."""

    def _consume(self, it: Iterator[dict[str, Any]], driven: bool) -> Iterator[dict[str, Any]]:
        for batch in it:
            if not driven and self.datamodule is not None:
                self.datamodule._record(batch.pop(_STATE_KEY))
            yield batch


# ----------------------------------------------------------------------------------------------------------
# the DataModule
# ----------------------------------------------------------------------------------------------------------


class PrefixSuffixDataModule(LightningDataModule):
    """Prefix -> suffix batches for Self-Improving Pretraining, streamed, split and restartable.

    Training streams the ``train_split`` (default ``"policy"``) endlessly (``repeat``), shuffled through a
    seeded buffer, sharded over data-parallel ranks and dataloader workers. Validation is a fixed list: the
    first ``num_val_prefixes`` chunks of ``val_split`` (default ``"eval"``) in stream order, at most
    ``val_max_chunks_per_doc`` per document. The judge / rewriter splits are reachable with
    :meth:`split_dataset` / :meth:`split_dataloader`. See the module docs for sources, the metadata filter,
    splits and chunking.

    Batches: ``prefix_ids`` / ``prefix_mask`` ``LongTensor[B, P]`` LEFT-padded with the tokenizer's pad id,
    ``suffix_ids`` / ``suffix_mask`` ``LongTensor[B, N]`` RIGHT-padded, ``prefix_text`` / ``suffix_text``
    (decodes of exactly those tokens), ``doc_id`` (lists of str), and ``suffix_start`` ``LongTensor[B]``.
    No special token (BOS) is added to the prefix.

    Resuming: ``state_dict()`` holds, per slot, the stream position after the last batch used for training;
    Lightning saves it in checkpoints and restores it with ``trainer.fit(..., ckpt_path=...)``, and a
    training dataloader iterator created later starts exactly there (no chunk replayed or skipped). Inside
    ``Trainer.fit`` a batch counts as used when the Trainer calls this DataModule's
    ``on_before_batch_transfer`` (so pass the DataModule to ``fit``; a LightningModule's own
    ``on_before_batch_transfer`` is still called, from this one); outside, when the training dataloader
    yields it. Under DDP, ``state_dict()`` gathers every rank's slots (Lightning calls it on all ranks).
    Resuming needs the same ``world_size * num_workers``. With ``num_workers > 0`` no chunk is replayed or
    skipped either, but after a resume the workers' batches may interleave in a different order.

    Args:
        sources: Local files (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``, ``.txt``), folders or glob patterns.
        tokenizer: ``builtin:tiny-tokenizer`` or a local tokenizer folder (loaded with ``load_tokenizer``).
        hf_name: A dataset for ``datasets.load_dataset(..., streaming=True)`` (hub id, local folder, or a
            builder such as ``"json"`` with ``data_files``), read after ``sources``.
        hf_config: Its configuration name.
        hf_split: Its split.
        data_files: Forwarded to ``load_dataset``.
        text_field: Field holding the document text (dotted path allowed).
        id_field: Optional document id field: then ``doc_id`` and the split key (default: the text's sha1).
        meta_filter: ``{key: value or [values]}`` every record must match, e.g.
            ``{"redpajama_set_name": ["RedPajamaC4", "RedPajamaStackExchange"]}`` or ``{"source": "cc/*"}``.
        suffix_tokens: N, tokens per suffix chunk.
        context_length: Prefix + suffix tokens at most.
        min_prefix_tokens: Tokens before the first suffix.
        min_suffix_tokens: Shortest tail chunk kept (default ``suffix_tokens``).
        split_mode: ``"fixed"`` or ``"random"`` chunk boundaries.
        max_chunks_per_doc: At most this many training chunks per document.
        splits: Split name -> fraction of documents (each > 0, sum <= 1).
        split_salt: Salt of the split hash (change only to draw a different partition).
        train_split: The split streamed for training.
        val_split: The split validation chunks come from.
        num_val_prefixes: Number of validation chunks.
        val_max_chunks_per_doc: At most this many validation chunks per document (None: no limit).
        batch_size: Training batch size (prefixes per step, per rank).
        val_batch_size: Validation batch size (default ``batch_size``).
        shuffle_buffer_size: Training chunks held for shuffling (0: stream order).
        repeat: Cycle the training split (epochs); else training stops after one pass.
        seed: Seed of the shuffle and of the random split points.
        num_workers: Training dataloader workers (each one a slot; 0 is exact and the default).
        skip_malformed: Skip and count malformed records instead of raising.
        rank: Data-parallel rank override (default: the Trainer's, else torch.distributed / environment).
        world_size: Data-parallel world size override.
    """

    def __init__(
        self,
        sources: str | list[str] | None = None,
        tokenizer: str = "builtin:tiny-tokenizer",
        hf_name: str | None = None,
        hf_config: str | None = None,
        hf_split: str | None = "train",
        data_files: str | list[str] | dict[str, Any] | None = None,
        text_field: str = "text",
        id_field: str | None = None,
        meta_filter: dict[str, Any] | None = None,
        suffix_tokens: int = 128,
        context_length: int = 2048,
        min_prefix_tokens: int = 32,
        min_suffix_tokens: int | None = None,
        split_mode: str = "fixed",
        max_chunks_per_doc: int | None = None,
        splits: dict[str, float] | None = None,
        split_salt: str = "",
        train_split: str = "policy",
        val_split: str = "eval",
        num_val_prefixes: int = 256,
        val_max_chunks_per_doc: int | None = 1,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        shuffle_buffer_size: int = 1024,
        repeat: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        skip_malformed: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_chunking(
            suffix_tokens, context_length, min_prefix_tokens, min_suffix_tokens, max_chunks_per_doc
        )
        if split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {split_mode!r}")
        self.splits = _check_splits(DEFAULT_SPLITS if splits is None else splits)
        for what, name in (("train_split", train_split), ("val_split", val_split)):
            if name not in self.splits:
                raise ValueError(f"{what}={name!r} is not one of the splits {list(self.splits)}")
        if train_split == val_split:
            raise ValueError(f"train_split and val_split must differ (both {train_split!r})")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError("batch_size and val_batch_size must be >= 1")
        if num_val_prefixes < 1:
            raise ValueError(f"num_val_prefixes must be >= 1, got {num_val_prefixes}")
        if val_max_chunks_per_doc is not None and val_max_chunks_per_doc < 1:
            raise ValueError(f"val_max_chunks_per_doc must be >= 1 or None, got {val_max_chunks_per_doc}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.train_split, self.val_split = train_split, val_split
        self.num_val_prefixes, self.val_max_chunks_per_doc = num_val_prefixes, val_max_chunks_per_doc
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.rank, self.world_size = rank, world_size
        self._stream_kwargs: dict[str, Any] = {
            "sources": sources,
            "hf_name": hf_name,
            "hf_config": hf_config,
            "hf_split": hf_split,
            "data_files": data_files,
            "text_field": text_field,
            "id_field": id_field,
            "meta_filter": meta_filter,
            "suffix_tokens": suffix_tokens,
            "context_length": context_length,
            "min_prefix_tokens": min_prefix_tokens,
            "min_suffix_tokens": min_suffix_tokens,
            "split_mode": split_mode,
            "max_chunks_per_doc": max_chunks_per_doc,
            "splits": self.splits,
            "split_salt": split_salt,
            "seed": seed,
            "skip_malformed": skip_malformed,
        }
        # Fails early on a missing source or a bad configuration (nothing is read yet).
        self._probe = PrefixSuffixDataset(tokenizer=tokenizer, split=train_split, **self._stream_kwargs)
        self.shuffle_buffer_size, self.repeat = shuffle_buffer_size, repeat
        fingerprint_src = {
            **{k: v for k, v in self._stream_kwargs.items() if k != "skip_malformed"},
            "tokenizer": tokenizer,
            "train_split": train_split,
            "shuffle_buffer_size": shuffle_buffer_size,
            "repeat": repeat,
        }
        self._fingerprint = hashlib.sha1(
            json.dumps(fingerprint_src, sort_keys=True, default=str).encode("utf-8")
        ).hexdigest()
        self._tokenizer: Any = None
        self._slots: dict[str, dict[str, Any]] = {}  # consumed position per slot
        self._num_slots: int | None = None
        self._val_items: list[dict[str, Any]] | None = None

    # -- tokenizer / datasets ------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from lit_selfimprove.modeling import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        _ = self.tokenizer

    def _rank_world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return _rank_world_from_env()

    def split_dataset(
        self,
        split: str,
        repeat: bool = False,
        shuffle_buffer_size: int = 0,
        shard: bool = True,
        **overrides: Any,
    ) -> PrefixSuffixDataset:
        """A :class:`PrefixSuffixDataset` over any split (e.g. ``"judge"`` or ``"rewriter"``) with this
        DataModule's sources, filter and chunking (``overrides`` replace any of its arguments). With
        ``shard`` it is sharded over this DataModule's data-parallel ranks; else one process reads it all.
        """
        kwargs = {**self._stream_kwargs, **overrides}
        if shard:
            rank, world = self._rank_world()
            kwargs.setdefault("rank", rank)
            kwargs.setdefault("world_size", world)
        return PrefixSuffixDataset(
            tokenizer=self.tokenizer,
            split=split,
            repeat=repeat,
            shuffle_buffer_size=shuffle_buffer_size,
            **kwargs,
        )

    def split_dataloader(
        self,
        split: str,
        batch_size: int | None = None,
        repeat: bool = False,
        shuffle_buffer_size: int = 0,
        num_workers: int = 0,
        **overrides: Any,
    ) -> DataLoader:
        """Batches (same keys as training) of any split; not tracked by ``state_dict``."""
        ds = self.split_dataset(split, repeat=repeat, shuffle_buffer_size=shuffle_buffer_size, **overrides)
        collate = partial(
            collate_prefix_suffix, pad_id=self.tokenizer.pad_token_id, suffix_len=ds.suffix_tokens
        )
        return DataLoader(
            ds, batch_size=batch_size or self.batch_size, num_workers=num_workers, collate_fn=collate
        )

    # -- dataloaders ---------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        ds = self.split_dataset(
            self.train_split, repeat=self.repeat, shuffle_buffer_size=self.shuffle_buffer_size
        )
        stream = _BatchedStream(ds, self.batch_size, self.tokenizer.pad_token_id, ds.suffix_tokens)
        loader = _ResumableLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity)
        loader.datamodule = self
        return loader

    @property
    def val_items(self) -> list[dict[str, Any]]:
        """The fixed validation chunks (computed once, identical on every rank)."""
        if self._val_items is None:
            ds = self.split_dataset(
                self.val_split,
                shard=False,
                rank=0,
                world_size=1,
                max_chunks_per_doc=self.val_max_chunks_per_doc,
            )
            self._val_items = list(islice(iter(ds), self.num_val_prefixes))
            if len(self._val_items) < self.num_val_prefixes:
                rank_zero_warn(
                    f"PrefixSuffixDataModule: only {len(self._val_items)} {self.val_split!r} chunks for "
                    f"num_val_prefixes={self.num_val_prefixes}"
                )
            rank_zero_info(
                f"PrefixSuffixDataModule: {len(self._val_items)} validation prefixes from split {self.val_split!r}"
            )
        return self._val_items

    def val_dataloader(self) -> DataLoader:
        collate = partial(
            collate_prefix_suffix, pad_id=self.tokenizer.pad_token_id, suffix_len=self._probe.suffix_tokens
        )
        return DataLoader(
            _ListDataset(self.val_items), batch_size=self.val_batch_size, shuffle=False, collate_fn=collate
        )

    # -- consumed position ---------------------------------------------------------------------------------

    def _trainer_is_fitting(self) -> bool:
        """Whether a running ``Trainer.fit`` drives the training loader (then it reports consumed batches)."""
        trainer = self.trainer
        if trainer is None:
            return False
        from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

        return trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING

    def _record(self, tag: dict[str, Any]) -> None:
        """Mark the batch tagged ``tag`` as used: its slot's position becomes the resume point."""
        self._slots[str(tag["slot"])] = tag["state"]
        self._num_slots = int(tag["num_slots"])

    def _start_states(self, num_slots: int) -> dict[str, dict[str, Any]]:
        if self._slots and self._num_slots is not None and self._num_slots != num_slots:
            raise ValueError(
                f"PrefixSuffixDataModule: the saved stream position has {self._num_slots} slots "
                f"(world_size * num_workers) but this run has {num_slots}; resume with the same world size and "
                "num_workers, or drop the DataModule state from the checkpoint to restart the stream"
            )
        return copy.deepcopy(self._slots)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and _STATE_KEY in batch:
            self._record(batch.pop(_STATE_KEY))
        # Lightning calls only this hook when both the DataModule and the LightningModule define it.
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None and is_overridden("on_before_batch_transfer", model):
            return model.on_before_batch_transfer(batch, dataloader_idx)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training stream's consumed position, every rank's slots included."""
        slots, num_slots = copy.deepcopy(self._slots), self._num_slots
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                gathered: list[Any] = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, (slots, num_slots))
                slots, num_slots = {}, None
                for rank_slots, rank_num in gathered:
                    slots.update(rank_slots)
                    num_slots = num_slots or rank_num
        return {
            "train_stream": {
                "version": _STATE_VERSION,
                "num_slots": num_slots,
                "slots": slots,
                "fingerprint": self._fingerprint,
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stream = state_dict.get("train_stream")
        if not stream:
            return
        if stream.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported PrefixSuffixDataModule state version {stream.get('version')!r}")
        if stream.get("fingerprint") != self._fingerprint:
            rank_zero_warn(
                "PrefixSuffixDataModule: the checkpoint's stream was produced with another configuration "
                "(sources, filter, splits, chunking, tokenizer, seed or buffer); its position may not match"
            )
        self._slots = copy.deepcopy(dict(stream.get("slots") or {}))
        self._num_slots = stream.get("num_slots")
