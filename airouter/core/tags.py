"""Tag extraction: the attributes of a received data set, as JSON-able values by keyword.

Rules match on these (``series.tags``), the index stores them, and the rules CLI reads them
from files; every stage that looks at headers uses the same conversion. A value pydicom cannot
convert (an odd character set, a malformed number) is skipped, never raised.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# Attributes denormalised for the rules (first instance of a series wins): every top-level,
# public attribute with a short, textual or numeric value, so a rule can test any keyword.
_SKIPPED_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ", "UT", "LT"}
_MAX_VALUE_CHARS = 256


class Unreadable(ValueError):
    """An attribute is present but its value cannot be read (an unknown VR, a bad length)."""


def read(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """The one guarded accessor: ``keyword``'s value, ``default`` when absent, and
    :class:`Unreadable` (naming the keyword, never the value) when pydicom cannot convert it.
    pydicom converts values lazily, on first access; any of its errors surfaces here."""
    try:
        return ds.get(keyword, default)
    except Exception as exc:
        raise Unreadable(f"{keyword} is unreadable ({type(exc).__name__})") from exc


def read_or_none(ds: Dataset, keyword: str) -> Any:
    """Like :func:`read`, with None for an unreadable value (for what indexing may lack)."""
    try:
        return read(ds, keyword)
    except Unreadable:
        return None


def series_tags(ds: Dataset) -> dict[str, Any]:
    """The attributes rules match on, by keyword, as JSON-able values (an unreadable element
    is skipped)."""
    tags: dict[str, Any] = {}
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
        except Exception:
            continue
        keyword = element.keyword
        if not keyword or element.tag.is_private or element.VR in _SKIPPED_VRS:
            continue
        if element.tag.group in (0x0002, 0x7FE0):
            continue
        value = _json_value(ds, keyword)
        if value is not None and len(str(value)) <= _MAX_VALUE_CHARS:
            tags[keyword] = value
    _lift_shared_geometry(ds, tags)
    return tags


# Enhanced (multi-frame) images keep their geometry in functional groups; rules see it under
# the single-frame keywords.
_SHARED_GEOMETRY = (
    ("PlaneOrientationSequence", "ImageOrientationPatient"),
    ("PixelMeasuresSequence", "PixelSpacing"),
    ("PixelMeasuresSequence", "SliceThickness"),
)


def _lift_shared_geometry(ds: Dataset, tags: dict[str, Any]) -> None:
    try:
        shared = ds.get("SharedFunctionalGroupsSequence")
        groups = shared[0] if shared else None
        frames = ds.get("PerFrameFunctionalGroupsSequence")
        first = frames[0] if frames else None
        for sequence, keyword in _SHARED_GEOMETRY:
            if keyword in tags:
                continue
            for group in (groups, first):
                if group is not None and sequence in group and keyword in group[sequence][0]:
                    value = _json_value(group[sequence][0], keyword)
                    if value is not None:
                        tags[keyword] = value
                    break
    except Exception:  # a malformed functional group never breaks indexing
        return


def text_value(ds: Dataset, keyword: str) -> str | None:
    """A tag as text (None when absent or empty); an odd character set never breaks indexing."""
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else str(value)
    except Exception:
        return None


def int_value(value: Any) -> int | None:
    """An IS/US value as an int (None when absent, empty or not a number)."""
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _json_value(ds: Dataset, keyword: str) -> Any:
    try:
        value = ds.get(keyword)
        if isinstance(value, MultiValue | list | tuple):
            return [_scalar(v) for v in value]
        return None if value is None else _scalar(value)
    except Exception:
        return None


def _scalar(v: Any) -> Any:
    if isinstance(v, float):  # DS
        return float(v)
    if isinstance(v, int):  # IS, US
        return int(v)
    return str(v)
