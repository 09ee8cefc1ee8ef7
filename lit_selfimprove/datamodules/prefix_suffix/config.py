"""The one configuration of what the corpus stream reads and how it cuts it, shared by
:class:`~lit_selfimprove.datamodules.prefix_suffix.PrefixSuffixDataset` and
:class:`~lit_selfimprove.datamodules.prefix_suffix.PrefixSuffixDataModule` (their arguments of the same names)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from lit_selfimprove.datamodules.prefix_suffix.meta_filter import _check_meta_filter
from lit_selfimprove.datamodules.prefix_suffix.sources import _check_hf_name
from lit_selfimprove.datamodules.prefix_suffix.splits import DEFAULT_SPLITS, _check_splits

SPLIT_MODES = ("fixed", "random", "marker")


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


@dataclass
class CorpusConfig:
    """Sources, filter, splits and chunking: the arguments of the same names (and defaults) of the Dataset
    and the DataModule, documented there. Validated on construction, where ``splits`` becomes the checked
    fractions (``DEFAULT_SPLITS`` when None); the other fields are kept as given."""

    sources: str | Sequence[str] | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str | None = "train"
    data_files: Any = None
    text_field: str = "text"
    id_field: str | None = None
    meta_filter: Mapping[str, Any] | None = None
    suffix_tokens: int = 128
    context_length: int = 2048
    min_prefix_tokens: int = 32
    min_suffix_tokens: int | None = None
    split_mode: str = "fixed"
    max_chunks_per_doc: int | None = None
    splits: Mapping[str, float] | None = None
    split_salt: str = ""
    seed: int = 0
    skip_malformed: bool = False
    # Longest piece of a document tokenized in one call (cut between words, see chunking.text_pieces): the
    # tokenizer's working memory (hundreds of bytes per character for a fast tokenizer) is bounded by it
    # instead of by the document's length. Not part of the stream's fingerprint: a memory bound.
    piece_chars: int = 100_000
    # split_mode "marker": a suffix starts right after every occurrence of this text (e.g. "\nA: " in
    # question / answer documents: the question is the prefix, the worked answer the suffix). The text
    # before and after each cut is tokenized separately, so the cut is a token boundary for any tokenizer.
    split_marker: str | None = None

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> CorpusConfig:
        """The config of a constructor's arguments (its ``locals()``), taken by field name."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls)})

    def __post_init__(self) -> None:
        _check_chunking(
            self.suffix_tokens,
            self.context_length,
            self.min_prefix_tokens,
            self.min_suffix_tokens,
            self.max_chunks_per_doc,
        )
        if self.piece_chars < 1:
            raise ValueError(f"piece_chars must be >= 1, got {self.piece_chars}")
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {self.split_mode!r}")
        if (self.split_mode == "marker") != bool(self.split_marker):
            raise ValueError(
                "split_mode 'marker' needs a non-empty split_marker (e.g. '\\nA: '), and split_marker "
                f"needs split_mode 'marker'; got split_mode={self.split_mode!r}, split_marker={self.split_marker!r}"
            )
        self.splits = _check_splits(DEFAULT_SPLITS if self.splits is None else self.splits)
        _check_meta_filter(self.meta_filter)
        if self.data_files is not None and self.hf_name is None:
            raise ValueError(
                "data_files is forwarded to datasets.load_dataset: also pass hf_name (e.g. 'json')"
            )
        if self.sources is None and self.hf_name is None:
            raise ValueError("no source given: pass sources (files, folders, globs) and/or hf_name")
        if self.hf_name is not None:
            _check_hf_name(self.hf_name)

    @property
    def min_suffix(self) -> int:
        """``min_suffix_tokens``, ``suffix_tokens`` when None."""
        return self.suffix_tokens if self.min_suffix_tokens is None else self.min_suffix_tokens

    @property
    def max_prefix_tokens(self) -> int:
        return self.context_length - self.suffix_tokens

    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments (of a Dataset)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
