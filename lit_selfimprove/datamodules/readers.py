"""The reader layer shared by the problem loader (:mod:`~lit_selfimprove.datamodules.problems`) and the corpus
stream (:mod:`~lit_selfimprove.datamodules.prefix_suffix`): jsonl lines read as bytes from plain, compressed
(``.zst``, ``.gz``) or zipped files, decoded and parsed one record at a time, and the malformed-record error.

Each line is decoded on its own, so an invalid UTF-8 byte spoils one record (a :class:`Malformed` one, named by
file and line), not the rest of the file.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["Malformed", "decode_utf8", "iter_lines", "parse_json", "read_jsonl"]


class Malformed(Exception):
    """A record that cannot be used (reason in the message; ``lineno`` overrides the record's line)."""

    def __init__(self, reason: str, lineno: int | None = None) -> None:
        super().__init__(reason)
        self.lineno = lineno

    def error(self, where: str, unit: str, number: int) -> ValueError:
        """The error for a caller that does not skip malformed records: ``where`` (file or dataset) and the
        record's ``unit`` (``"line"`` or ``"row"``) ``number``."""
        return ValueError(f"{where}: malformed record at {unit} {self.lineno or number}: {self}")


def _zip_member(zf: zipfile.ZipFile, path: Path, prefer: str | None) -> str:
    """``prefer`` when the zip holds it, else its only ``.jsonl`` / ``.json`` file."""
    names = [n for n in zf.namelist() if n.endswith((".jsonl", ".json")) and not n.startswith("__MACOSX")]
    if prefer in names:
        return prefer
    if len(names) == 1:
        return names[0]
    wanted = f"{prefer} or a single .jsonl file" if prefer else "a single .jsonl file"
    raise ValueError(f"{path}: expected {wanted} in the zip, found {names}")


def _open(path: Path, zip_member: str | None) -> tuple[IO[bytes], str]:
    """``(binary file, name)``: ``path`` opened for streaming its lines, decompressed on the fly."""
    name = path.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:  # the member keeps the archive's file open until it is closed
            member = _zip_member(zf, path, zip_member)
            return zf.open(member), f"{path.name}:{member}"
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as err:  # pragma: no cover - zstandard is a core dependency
            raise ImportError("reading .zst files needs zstandard: pip install zstandard") from err
        raw = path.open("rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader), path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb"), path.name
    return path.open("rb"), path.name


def iter_lines(path: Path, zip_member: str | None = None) -> Iterator[tuple[str, int, bytes]]:
    """``(name, line number, line)`` for every non-blank line of a jsonl file, undecoded (blank: ASCII
    whitespace only). ``.zst`` and ``.gz`` files are stream-decompressed; a ``.zip`` is read at its member
    ``zip_member`` when it holds one, else at its only ``.jsonl`` / ``.json`` file. ``name`` is the file's
    name, ``archive.zip:member`` for a zip."""
    fh, name = _open(path, zip_member)
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if line and not line.isspace():
                yield name, lineno, line


def decode_utf8(data: bytes, multiline: bool = False) -> str:
    """``data`` decoded as UTF-8; raises :class:`Malformed` at the first invalid byte (with its line number
    when ``data`` is a whole file)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        column = err.start - data.rfind(b"\n", 0, err.start)
        lineno = data.count(b"\n", 0, err.start) + 1 if multiline else None
        raise Malformed(
            f"invalid UTF-8 (byte 0x{data[err.start]:02x} at byte {column} of the line)", lineno
        ) from None


def parse_json(text: str) -> Any:
    """One JSON value; raises :class:`Malformed` on invalid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise Malformed(f"invalid JSON ({err.msg} at column {err.colno})") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for every non-blank line of a small jsonl file read strictly (the labeled
    examples of the judge / rewriter trainings): ``where`` is ``"path:line"``, and a line that is
    not valid UTF-8 JSON raises ``ValueError`` naming it."""
    for _, lineno, line in iter_lines(Path(path)):
        where = f"{path}:{lineno}"
        try:
            yield where, parse_json(decode_utf8(line))
        except Malformed as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from None
