"""The metadata filter: ``meta_filter={"key": value or [values]}`` keeps a record when every key matches one
of its values (see the package docs for how keys are resolved and values compared)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from lit_selfimprove.datamodules.prefix_suffix.sources import (
    _GLOB_CHARS,
    _get_path,
    _infer_redpajama_set,
    _Source,
)


def _check_meta_filter(meta_filter: Any) -> None:
    if meta_filter is not None and (
        not isinstance(meta_filter, Mapping) or not all(isinstance(k, str) and k for k in meta_filter)
    ):
        raise ValueError(f"meta_filter must map field names to allowed values, got {meta_filter!r}")


def _normalize_filter(meta_filter: Mapping[str, Any] | None) -> dict[str, list[Any]] | None:
    """``{key: [allowed values]}`` (a single value becomes a one-element list); None for no filter."""
    if not meta_filter:
        return None
    return {k: list(v) if isinstance(v, (list, tuple, set)) else [v] for k, v in meta_filter.items()}


def _value_matches(value: Any, allowed: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_value_matches(v, allowed) for v in value)
    if isinstance(allowed, str) and _GLOB_CHARS.search(allowed):
        return fnmatch.fnmatchcase(str(value), allowed)
    return value == allowed or str(value) == str(allowed)


def _lookup(record: dict[str, Any], src: _Source, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of a filter key in a record (see the package docs for the order of the places)."""
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


def _keep(meta_filter: dict[str, list[Any]] | None, record: dict[str, Any], src: _Source) -> bool:
    """Whether ``record`` (read from ``src``) passes the normalized ``meta_filter``."""
    if not meta_filter:
        return True
    for key, allowed in meta_filter.items():
        found, value = _lookup(record, src, key)
        if not found or not any(_value_matches(value, a) for a in allowed):
            return False
    return True
