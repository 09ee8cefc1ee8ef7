"""Problem sources: record loaders for math problem sets (files, HARP's zip, local dataset folders, hub ids).

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

from lit_selfimprove.assets import resolve
from lit_selfimprove.datamodules.readers import Malformed, decode_utf8, iter_lines, parse_json
from lit_selfimprove.rewards.answers import extract_boxed

__all__ = [
    "PROBLEM_FORMATS",
    "check_levels",
    "load_located_problems",
    "load_problems",
    "looks_like_file",
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


_LEVEL_RE = re.compile(r"^(?:level\s*)?([0-9]+)$", re.IGNORECASE)


def check_levels(levels: Sequence[int] | None) -> list[int] | None:
    """Validated MATH difficulty levels to keep (None: all records); raises on an empty or non-int list."""
    if levels is None:
        return None
    levels = list(levels)
    if not levels or not all(isinstance(lv, int) and not isinstance(lv, bool) for lv in levels):
        raise ValueError(f"levels must be a non-empty list of ints (MATH levels 1-5) or None, got {levels!r}")
    return levels


def _record_level(raw: dict, origin: str) -> int | None:
    """A raw record's MATH ``level`` (``3``, ``"3"`` or MATH's ``"Level 3"``); None for an unrated
    ``"Level ?"``. Raises ``ValueError`` naming the record when the field is missing: filtering by level
    is then a configuration mistake (not a malformed record), and must not silently keep or drop all."""
    if "level" not in raw:
        raise ValueError(
            f"{origin}: levels= is set but the record has no 'level' field; filter by level only MATH / "
            "MATH-500 records (level 1-5), or remove levels"
        )
    value = raw["level"]
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    match = _LEVEL_RE.match(str(value).strip())
    return int(match.group(1)) if match else None


def _source_rows(
    source: str, fmt: str, split: str | None
) -> tuple[str, Iterator[tuple[str, int, Any]], str, Callable[[int], str]]:
    """``(record kind, raw rows, "row"/"line", fallback id of a row number)`` for a hub or file source."""
    if fmt == "hub":
        ds = _load_hub_dataset(source, split)
        columns = list(getattr(ds, "column_names", None) or [])
        kind = _kind_from_keys(columns) or "jsonl"
        name = source.rstrip("/").split("/")[-1]
        rows: Iterator[tuple[str, int, Any]] = ((source, i, raw) for i, raw in enumerate(ds, start=1))
        return kind, rows, "row", (lambda n: f"{name}-{split or 'data'}-{n - 1}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"problem file not found: {source!r}")
    stem = path.name.split(".")[0] if path.suffix == ".zip" else path.stem
    return fmt, _iter_jsonl(path), "line", (lambda n: f"{stem}-{n}")


def load_problems(
    source: str,
    format: str = "auto",
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    split: str | None = None,
    skip_malformed: bool = False,
    limit: int | None = None,
    levels: Sequence[int] | None = None,
) -> tuple[list[dict[str, str]], int]:
    """Load a problem set as records ``{"id": str, "question": str, "answer": str}``:
    ``(records, n_skipped)``.

    See :func:`load_located_problems` for the arguments and errors (it also returns each record's file:line).
    """
    records, n_skipped, _ = load_located_problems(
        source, format, question_field, answer_field, id_field, split, skip_malformed, limit, levels
    )
    return records, n_skipped


def _origin(source: str, where: str, unit: str, number: int) -> str:
    """``path:line`` of a file record (``where`` is the file's name, ``archive.zip:member`` for a zip),
    ``dataset row N`` of a hub record."""
    if unit == "row":
        return f"{where} row {number}"
    return f"{Path(source).parent / where}:{number}"


def load_located_problems(
    source: str,
    format: str = "auto",
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    split: str | None = None,
    skip_malformed: bool = False,
    limit: int | None = None,
    levels: Sequence[int] | None = None,
) -> tuple[list[dict[str, str]], int, list[str]]:
    """Load a problem set as records ``{"id": str, "question": str, "answer": str}``, with where each came
    from: ``origins[i]`` is the ``file:line`` of ``records[i]`` (``dataset row N`` for a hub dataset), so
    that a problem found unusable after loading (e.g. a prompt too long for the model) can be named.

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
        levels: Keep only the records whose MATH ``level`` (``3``, ``"3"`` or ``"Level 3"``) is in this list
            (None: all). Filtered at load time because the plain records carry no level; ``limit`` counts
            the kept records only.

    Returns:
        ``(records, n_skipped, origins)``.

    Raises:
        ValueError: On a malformed record (invalid JSON, not an object, missing or empty question/answer,
            duplicate id) naming the file and its 1-based line number, unless ``skip_malformed``; when
            ``levels`` is set and a record has no ``level`` field; and always when no record is left.
        FileNotFoundError: When ``source`` does not exist and does not look like a hub id.
    """
    if format not in PROBLEM_FORMATS:
        raise ValueError(f"unknown problem format {format!r}; expected one of {PROBLEM_FORMATS}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    source = str(source)
    levels = check_levels(levels)
    fields = (question_field, answer_field, id_field)
    source = resolve(source)  # builtin:NAME -> the bundled file
    fmt = _detect_format(source) if format == "auto" else format

    kind, rows, unit, fallback = _source_rows(source, fmt, split)
    records, origins, n_skipped, seen_levels = _read_records(
        source, rows, kind, fields, unit, fallback, skip_malformed, levels, limit
    )
    if not records:
        raise ValueError(
            f"no problems loaded from {source!r} (format {fmt!r}, {n_skipped} malformed skipped)"
            + _levels_note(levels, seen_levels)
        )
    return records, n_skipped, origins


def _read_records(
    source: str,
    rows: Iterator[tuple[str, int, Any]],
    kind: str,
    fields: tuple[str | None, str | None, str | None],
    unit: str,
    fallback: Callable[[int], str],
    skip_malformed: bool,
    levels: list[int] | None,
    limit: int | None,
) -> tuple[list[dict[str, str]], list[str], int, set[int | None]]:
    """``(records, origins, n_skipped, levels seen)`` of a source's raw rows (:func:`_source_rows`):
    each converted (a malformed one or a duplicate id raises, or is counted with ``skip_malformed``),
    kept when its level is in ``levels``, until ``limit`` are kept."""
    records: list[dict[str, str]] = []
    origins: list[str] = []
    seen: dict[str, int] = {}
    n_skipped = 0
    seen_levels: set[int | None] = set()
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
        if levels is not None:
            level = _record_level(raw, _origin(source, where, unit, number))
            seen_levels.add(level)
            if level not in levels:
                continue
        records.append(record)
        origins.append(_origin(source, where, unit, number))
        if limit is not None and len(records) >= limit:
            break
    return records, origins, n_skipped, seen_levels


def _levels_note(levels: list[int] | None, seen_levels: set[int | None]) -> str:
    """What the level filter saw, for the "nothing loaded" error."""
    if levels is None or not seen_levels:
        return ""
    seen = sorted(str(lv) if lv is not None else "unrated" for lv in seen_levels)
    return f": none has a level in {levels} (levels in the source: {', '.join(seen)})"


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
