"""Sources of the corpus stream: local ``.jsonl`` / ``.jsonl.zst`` / ``.jsonl.gz`` / ``.txt`` files (folders
and globs expanded) and a streamed Hugging Face dataset, read as unparsed records in a fixed order, and the
parsing of one record into its fields and text."""

from __future__ import annotations

import ast
import glob
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_selfimprove.datamodules.readers import Malformed, decode_utf8, iter_lines, parse_json
from lit_selfimprove.datamodules.soar_corpus import SOAR_PREFIX, materialize

if TYPE_CHECKING:
    from lit_selfimprove.datamodules.prefix_suffix.config import CorpusConfig

# Longest suffix first so that "x.jsonl.zst" is not taken for ".jsonl".
_FILE_SUFFIXES = (".jsonl.zst", ".jsonl.gz", ".jsonl", ".txt")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A name ending in a letters-only extension (".jsonl", ".gz", a typo such as ".jsnol") names a file.
_FILE_EXT_RE = re.compile(r"\.[A-Za-z]{1,5}$")

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
        if source.startswith(SOAR_PREFIX):  # soar:RUN_DIR -> its documents, rendered once into a cached file
            source = materialize(source)
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


def _parse(src: _Source, payload: Any, text_field: str) -> tuple[dict[str, Any], str]:
    """Payload (a ``.txt`` path, a jsonl line as bytes, or a hub row) -> ``(record, text)``; raises
    :class:`Malformed`."""
    if src.kind == ".txt":  # universal newlines, as in text mode
        text = decode_utf8(Path(payload).read_bytes(), multiline=True)
        return {}, text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text
    record = parse_json(decode_utf8(payload)) if isinstance(payload, bytes) else payload
    if not isinstance(record, dict):
        raise Malformed(f"expected a JSON object, got {type(record).__name__}")
    if "meta" in record:
        record["meta"] = _parse_meta(record["meta"])
    found, text = _get_path(record, text_field)
    if not found:
        raise Malformed(f"no text field {text_field!r} (fields: {sorted(record)})")
    if not isinstance(text, str):
        raise Malformed(f"text field {text_field!r} is {type(text).__name__}, not a string")
    return record, text


class _Reader:
    """Every record of the sources, unparsed, in the fixed order: the files, then the ``hf_name`` dataset."""

    def __init__(self, config: CorpusConfig) -> None:
        sources = config.sources
        self.sources = [] if sources is None else ([sources] if isinstance(sources, str) else list(sources))
        self.files = resolve_source_files(self.sources) if self.sources else []
        self.file_sources = [_file_source(p) for p in self.files]
        self.hf_name, self.hf_config = config.hf_name, config.hf_config
        self.hf_split, self.data_files = config.hf_split, config.data_files
        self._hf_ds = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_hf_ds"] = None  # re-created lazily in each worker
        return state

    def describe(self) -> str:
        parts = [str(s) for s in self.sources]
        if self.hf_name is not None:
            parts.append(f"hf:{self.hf_name}" + (f"[{self.hf_config}]" if self.hf_config else ""))
        return ", ".join(parts)

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

    def records(self) -> Iterator[tuple[_Source, int, Any]]:
        """``(source, line / row number, payload)`` for every non-blank record (a ``.txt`` file is one)."""
        for src, path in zip(self.file_sources, self.files):
            if src.kind == ".txt":
                yield src, 1, path
                continue
            for _, lineno, line in iter_lines(path):
                yield src, lineno, line
        if self.hf_name is not None:
            src = _Source("hf", self.hf_name, self.hf_name, None)
            for row_no, row in enumerate(self._hf_rows(), start=1):
                yield src, row_no, row
