"""Chunking: a document's text tokenized in bounded pieces, cut into suffix chunks with their prefixes, and
the collation of chunk items into the batches SIP modules consume."""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lit_selfimprove.datamodules.prefix_suffix.config import CorpusConfig
from lit_selfimprove.datamodules.prefix_suffix.splits import _hash_int


def text_pieces(text: str, size: int) -> Iterator[str]:
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


@dataclass
class _Doc:
    """A document of the selected split, tokenized, with its suffix start positions."""

    doc_id: str
    tokens: array  # int32 token ids (4 bytes a token, where a list of ints takes ~10 times more)
    starts: Sequence[int]


def _chunk_starts(cfg: CorpusConfig, n_tokens: int, doc_id: str, epoch: int) -> Sequence[int]:
    m, n, ms = cfg.min_prefix_tokens, cfg.suffix_tokens, cfg.min_suffix
    if n_tokens < m + ms:
        return range(0)
    rng = None
    offset = 0
    if cfg.split_mode == "random":
        rng = random.Random(_hash_int(cfg.seed, "cut", doc_id, epoch))
        offset = rng.randrange(min(n, n_tokens - m - ms + 1))
    starts: Sequence[int] = range(m + offset, n_tokens - ms + 1, n)
    limit = cfg.max_chunks_per_doc
    if limit is not None and len(starts) > limit:
        starts = sorted(rng.sample(starts, limit)) if rng is not None else starts[:limit]
    return starts


def _marker_starts(cfg: CorpusConfig, cuts: Sequence[int], n_tokens: int) -> Sequence[int]:
    """Split mode ``marker``: the token positions after the marker that leave a long enough prefix and suffix."""
    starts = [s for s in cuts if s >= cfg.min_prefix_tokens and n_tokens - s >= cfg.min_suffix]
    return starts[: cfg.max_chunks_per_doc] if cfg.max_chunks_per_doc is not None else starts


def _make_doc(cfg: CorpusConfig, tok: Any, text: str, doc_id: str, epoch: int) -> _Doc:
    """Tokenize ``text`` in pieces of at most ``cfg.piece_chars`` characters (see :func:`text_pieces`), so
    that the tokenizer's memory does not grow with the document, into a compact int32 array. In split mode
    ``marker`` the text is first cut after each ``split_marker`` and the parts tokenized one by one."""
    tokens = array("i")
    marker = cfg.split_marker if cfg.split_mode == "marker" else None
    parts = text.split(marker) if marker else [text]
    cuts = []
    for i, part in enumerate(parts):
        part = part + marker if marker and i < len(parts) - 1 else part
        for piece in text_pieces(part, cfg.piece_chars) if part else ():
            tokens.extend(
                tok(piece, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
            )
        cuts.append(len(tokens))
    if marker:
        return _Doc(doc_id, tokens, _marker_starts(cfg, cuts[:-1], len(tokens)))
    return _Doc(doc_id, tokens, _chunk_starts(cfg, len(tokens), doc_id, epoch))


def _item(cfg: CorpusConfig, tok: Any, doc: _Doc, k: int) -> dict[str, Any]:
    s = doc.starts[k]
    prefix = doc.tokens[max(0, s - cfg.max_prefix_tokens) : s].tolist()
    suffix = doc.tokens[s : s + cfg.suffix_tokens].tolist()

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
