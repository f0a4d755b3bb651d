"""Attribute matching on the archive's index (PS3.4 C.2.2.2), shared by QIDO-RS and C-FIND.

Matching keys by DICOM keyword: single values, UID lists (``a,b`` or ``a\\b``), wildcards
``*`` and ``?`` (patient names case-insensitive), date and time ranges (``a-b``, ``-b``,
``a-``), an empty value matching everything. Each key belongs to a level (study, series,
instance) and is matched on the index column that holds it. A value the attribute cannot
hold is a :class:`QueryError` (the callers' 400, or a C-FIND failure status).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import InstrumentedAttribute

from airouter.core.db import Instance, Series, Study
from airouter.core.spool import is_valid_uid

LEVELS = ("study", "series", "instance")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


class QueryError(ValueError):
    """A matching key whose value the attribute cannot hold (the message says which)."""


@dataclass(frozen=True)
class Attr:
    """A matching key: its keyword, VR, the index column (or a condition builder), level."""

    keyword: str
    vr: str
    column: Any  # an InstrumentedAttribute, or a callable building the condition
    level: str  # study, series, instance


def _modalities_in_study(values: list[str]) -> ColumnElement[bool]:
    return Study.study_uid.in_(select(Series.study_uid).where(Series.modality.in_(values)))


ATTRS: dict[str, Attr] = {
    a.keyword: a
    for a in (
        Attr("StudyInstanceUID", "UI", Study.study_uid, "study"),
        Attr("PatientID", "LO", Study.patient_id, "study"),
        Attr("PatientName", "PN", Study.patient_name, "study"),
        Attr("StudyDate", "DA", Study.study_date, "study"),
        Attr("StudyTime", "TM", Study.study_time, "study"),
        Attr("AccessionNumber", "SH", Study.accession_number, "study"),
        Attr("StudyDescription", "LO", Study.study_description, "study"),
        Attr("ModalitiesInStudy", "CS", _modalities_in_study, "study"),
        Attr("SeriesInstanceUID", "UI", Series.series_uid, "series"),
        Attr("Modality", "CS", Series.modality, "series"),
        Attr("SeriesNumber", "IS", Series.series_number, "series"),
        Attr("SeriesDescription", "LO", Series.series_description, "series"),
        Attr("SOPInstanceUID", "UI", Instance.sop_instance_uid, "instance"),
        Attr("SOPClassUID", "UI", Instance.sop_class_uid, "instance"),
        Attr("InstanceNumber", "IS", Instance.instance_number, "instance"),
    )
}


def keyword_of(key: str) -> str | None:
    """The DICOM keyword of a query key (a keyword or 8 hex digits), None if it is none."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        try:
            return keyword_for_tag(int(key, 16)) or None
        except (KeyError, ValueError):
            return None
    return key if tag_for_keyword(key) is not None else None


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _range(column: Any, value: str, pattern: re.Pattern[str], what: str) -> ColumnElement[bool]:
    low, dash, high = value.partition("-")
    for part in (low, high) if dash else (low,):
        if part and not pattern.match(part):
            raise QueryError(f"not a {what} or {what} range: {value[:40]!r}")
    if not dash:
        return column == value
    if not low and not high:
        raise QueryError(f"an empty {what} range: {value!r}")
    conditions = []
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= (high if what == "date" else high + "\uffff"))
    return conditions[0] if len(conditions) == 1 else conditions[0] & conditions[1]


def condition(attr: Attr, value: str) -> ColumnElement[bool] | None:
    """The SQL condition of one matching key; None for universal matching (empty value)."""
    if value == "":
        return None
    if callable(attr.column) and not isinstance(attr.column, InstrumentedAttribute):
        return attr.column([v for v in re.split(r"[,\\]", value) if v])
    column = attr.column
    if attr.vr == "UI":
        uids = [v for v in re.split(r"[,\\]", value) if v]
        bad = [u for u in uids if not is_valid_uid(u)]
        if bad:
            raise QueryError(f"{attr.keyword}: not a valid UID: {bad[0][:70]!r}")
        return column.in_(uids)
    if attr.vr == "DA":
        return _range(column, value.replace(".", ""), _DATE, "date")
    if attr.vr == "TM":
        return _range(column, value.replace(":", ""), _TIME, "time")
    if attr.vr == "IS":
        if not re.fullmatch(r"[+-]?\d{1,10}", value.strip()):
            raise QueryError(f"{attr.keyword}: not an integer: {value[:40]!r}")
        return column == int(value)
    if "*" in value or "?" in value:
        if attr.vr == "PN":
            return func.lower(column).like(_like(value.lower()), escape="\\")
        return column.like(_like(value), escape="\\")
    if attr.vr == "PN":
        return func.lower(column) == value.lower()
    if attr.vr == "CS" and ("\\" in value or "," in value):
        return column.in_([v for v in re.split(r"[,\\]", value) if v])
    return column == value
