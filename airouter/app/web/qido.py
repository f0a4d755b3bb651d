"""QIDO-RS (PS3.18 10.6) of the node's archive at every level, over its index.

``/studies``, ``/series``, ``/instances``, ``/studies/{s}/series``, ``/studies/{s}/instances``
and ``/studies/{s}/series/{se}/instances``. Matching (PS3.4 C.2.2.2) on the attributes the
index holds, by keyword or tag: single values, UID lists (``a,b`` or ``a\\b``), wildcards
``*`` and ``?`` (patient name case-insensitive), date and time ranges (``a-b``, ``-b``,
``a-``). ``limit`` and ``offset`` page; ``includefield`` (keywords, tags, ``all``) adds the
optional attributes of the level. A matching key the index cannot match on is ignored with a
``Warning: 299`` header, as the standard allows; so is ``fuzzymatching=true``. A key that is
no DICOM attribute, or a value the attribute cannot hold, is a 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import InstrumentedAttribute

from airouter.core.db import Instance, Series, Store, Study
from airouter.core.spool import is_valid_uid

DICOM_JSON = "application/dicom+json"
MAX_LIMIT = 1000  # a page holds at most this many results (a larger limit is capped)
_CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


@dataclass(frozen=True)
class _Attr:
    keyword: str
    vr: str
    column: Any  # an InstrumentedAttribute, or a callable building the condition
    level: str  # study, series, instance


def _modalities_in_study(values: list[str]) -> ColumnElement[bool]:
    return Study.study_uid.in_(select(Series.study_uid).where(Series.modality.in_(values)))


_ATTRS: dict[str, _Attr] = {
    a.keyword: a
    for a in (
        _Attr("StudyInstanceUID", "UI", Study.study_uid, "study"),
        _Attr("PatientID", "LO", Study.patient_id, "study"),
        _Attr("PatientName", "PN", Study.patient_name, "study"),
        _Attr("StudyDate", "DA", Study.study_date, "study"),
        _Attr("StudyTime", "TM", Study.study_time, "study"),
        _Attr("AccessionNumber", "SH", Study.accession_number, "study"),
        _Attr("StudyDescription", "LO", Study.study_description, "study"),
        _Attr("ModalitiesInStudy", "CS", _modalities_in_study, "study"),
        _Attr("SeriesInstanceUID", "UI", Series.series_uid, "series"),
        _Attr("Modality", "CS", Series.modality, "series"),
        _Attr("SeriesNumber", "IS", Series.series_number, "series"),
        _Attr("SeriesDescription", "LO", Series.series_description, "series"),
        _Attr("SOPInstanceUID", "UI", Instance.sop_instance_uid, "instance"),
        _Attr("SOPClassUID", "UI", Instance.sop_class_uid, "instance"),
        _Attr("InstanceNumber", "IS", Instance.instance_number, "instance"),
    )
}
_LEVELS = ("study", "series", "instance")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def _keyword(key: str) -> str | None:
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
            raise HTTPException(400, f"not a {what} or {what} range: {value[:40]!r}")
    if not dash:
        return column == value
    if not low and not high:
        raise HTTPException(400, f"an empty {what} range: {value!r}")
    conditions = []
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= (high if what == "date" else high + "\uffff"))
    return conditions[0] if len(conditions) == 1 else conditions[0] & conditions[1]


def _condition(attr: _Attr, value: str) -> ColumnElement[bool] | None:
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
            raise HTTPException(400, f"{attr.keyword}: not a valid UID: {bad[0][:70]!r}")
        return column.in_(uids)
    if attr.vr == "DA":
        return _range(column, value.replace(".", ""), _DATE, "date")
    if attr.vr == "TM":
        return _range(column, value.replace(":", ""), _TIME, "time")
    if attr.vr == "IS":
        if not re.fullmatch(r"[+-]?\d{1,10}", value.strip()):
            raise HTTPException(400, f"{attr.keyword}: not an integer: {value[:40]!r}")
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


@dataclass
class _Query:
    where: list[ColumnElement[bool]]
    warnings: list[str]
    limit: int
    offset: int
    include: set[str]  # keywords, or {"all"}


def _parse(request: Request, level: str) -> _Query:
    """The request's matching keys, paging and includefield, for a query at ``level``."""
    params = request.query_params
    allowed = set(_LEVELS[: _LEVELS.index(level) + 1])
    where: list[ColumnElement[bool]] = []
    warnings: list[str] = []
    include: set[str] = set()
    for key, value in params.multi_items():
        if key in _CONTROL:
            continue
        keyword = _keyword(key)
        if keyword is None:
            raise HTTPException(400, f"not a DICOM attribute (keyword or tag): {key[:64]!r}")
        attr = _ATTRS.get(keyword)
        if attr is None or attr.level not in allowed:
            warnings.append(f"{keyword} is not a supported matching key here: ignored")
            continue
        condition = _condition(attr, value)
        if condition is not None:
            where.append(condition)
    for field in params.getlist("includefield"):
        for item in (f.strip() for f in field.split(",")):
            if not item:
                continue
            if item == "all":
                include.add("all")
                continue
            keyword = _keyword(item)
            if keyword is None:
                raise HTTPException(400, f"includefield: not a DICOM attribute: {item[:64]!r}")
            include.add(keyword)
    if params.get("fuzzymatching", "false").lower() == "true":
        warnings.append("fuzzymatching is not supported: exact matching was used")
    limit = _count(params.get("limit"), "limit", MAX_LIMIT)
    if limit > MAX_LIMIT:
        warnings.append(f"limit capped at {MAX_LIMIT}")
        limit = MAX_LIMIT
    return _Query(where, warnings, limit, _count(params.get("offset"), "offset", 0), include)


def _count(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or len(value) > 9:
        raise HTTPException(400, f"{name} must be a non-negative integer: {value[:20]!r}")
    return int(value)


def _attr(vr: str, value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(value)}]}
    return {"vr": vr, "Value": list(value) if isinstance(value, list) else [value]}


def _tag(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


def _put(out: dict[str, Any], keyword: str, value: Any) -> None:
    out[_tag(keyword)] = _attr(dictionary_VR(keyword), value)


def _wanted(query: _Query, level: str) -> bool:
    """Whether includefield asks for the attributes of ``level`` (``all``, or one of them)."""
    return "all" in query.include or any(
        (a := _ATTRS.get(k)) is not None and a.level == level for k in query.include
    )


def _study_part(study: Study, out: dict[str, Any]) -> None:
    for keyword, value in (
        ("StudyInstanceUID", study.study_uid),
        ("StudyDate", study.study_date),
        ("StudyTime", study.study_time),
        ("AccessionNumber", study.accession_number),
        ("PatientName", study.patient_name),
        ("PatientID", study.patient_id),
        ("StudyDescription", study.study_description),
    ):
        _put(out, keyword, value)


def _series_part(series: Series, out: dict[str, Any]) -> None:
    _put(out, "SeriesInstanceUID", series.series_uid)
    _put(out, "Modality", series.modality)
    _put(out, "SeriesNumber", series.series_number)
    _put(out, "SeriesDescription", series.series_description)
    if series.body_part_examined:
        _put(out, "BodyPartExamined", series.body_part_examined)


def _instance_part(inst: Instance, out: dict[str, Any]) -> None:
    _put(out, "SOPClassUID", inst.sop_class_uid)
    _put(out, "SOPInstanceUID", inst.sop_instance_uid)
    _put(out, "InstanceNumber", inst.instance_number)
    _put(out, "AvailableTransferSyntaxUID", inst.transfer_syntax)


def _answer(rows: list[dict[str, Any]], query: _Query) -> JSONResponse:
    headers = {"Warning": ", ".join(f'299 airouter "{w}"' for w in query.warnings)}
    return JSONResponse(rows, media_type=DICOM_JSON, headers=headers if query.warnings else None)


def _page(q: Any, query: _Query) -> Any:
    return q.offset(query.offset).limit(query.limit)


def qido_router(store: Store) -> APIRouter:
    """The QIDO-RS routes, under ``/dicomweb``."""
    app = APIRouter(prefix="/dicomweb")

    def studies(request: Request, restrict: list[ColumnElement[bool]]) -> JSONResponse:
        query = _parse(request, "study")
        with store.session() as s:
            q = select(Study).where(*restrict, *query.where).order_by(Study.created_at)
            found = list(s.scalars(_page(q, query)).all())
            uids = [x.study_uid for x in found]
            n_series = dict(
                s.execute(
                    select(Series.study_uid, func.count())
                    .where(Series.study_uid.in_(uids))
                    .group_by(Series.study_uid)
                ).all()
            )
            n_instances = dict(
                s.execute(
                    select(Instance.study_uid, func.count())
                    .where(Instance.study_uid.in_(uids))
                    .group_by(Instance.study_uid)
                ).all()
            )
            modalities: dict[str, set[str]] = {}
            for uid, modality in s.execute(
                select(Series.study_uid, Series.modality).where(Series.study_uid.in_(uids))
            ).all():
                if modality:
                    modalities.setdefault(uid, set()).add(modality)
            rows = []
            for study in found:
                out: dict[str, Any] = {}
                _study_part(study, out)
                _put(out, "ModalitiesInStudy", sorted(modalities.get(study.study_uid, ())))
                _put(out, "NumberOfStudyRelatedSeries", n_series.get(study.study_uid, 0))
                _put(out, "NumberOfStudyRelatedInstances", n_instances.get(study.study_uid, 0))
                rows.append(out)
        return _answer(rows, query)

    def series_search(
        request: Request, restrict: list[ColumnElement[bool]], with_study: bool
    ) -> JSONResponse:
        query = _parse(request, "series")
        with store.session() as s:
            q = (
                select(Series, Study)
                .join(Study, Study.study_uid == Series.study_uid)
                .where(*restrict, *query.where)
                .order_by(Series.study_uid, Series.series_number, Series.series_uid)
            )
            found = s.execute(_page(q, query)).all()
            uids = [se.series_uid for se, _ in found]
            counts = dict(
                s.execute(
                    select(Instance.series_uid, func.count())
                    .where(Instance.series_uid.in_(uids))
                    .group_by(Instance.series_uid)
                ).all()
            )
            rows = []
            for series, study in found:
                out: dict[str, Any] = {}
                if with_study or _wanted(query, "study"):
                    _study_part(study, out)
                else:
                    _put(out, "StudyInstanceUID", study.study_uid)
                _series_part(series, out)
                _put(out, "NumberOfSeriesRelatedInstances", counts.get(series.series_uid, 0))
                rows.append(out)
        return _answer(rows, query)

    def instance_search(
        request: Request, restrict: list[ColumnElement[bool]], with_series: bool, with_study: bool
    ) -> JSONResponse:
        query = _parse(request, "instance")
        with store.session() as s:
            q = (
                select(Instance, Series, Study)
                .join(Series, Series.series_uid == Instance.series_uid)
                .join(Study, Study.study_uid == Instance.study_uid)
                .where(*restrict, *query.where)
                .order_by(Instance.series_uid, Instance.instance_number, Instance.id)
            )
            rows = []
            for inst, series, study in s.execute(_page(q, query)).all():
                out: dict[str, Any] = {}
                if with_study or _wanted(query, "study"):
                    _study_part(study, out)
                else:
                    _put(out, "StudyInstanceUID", study.study_uid)
                if with_series or _wanted(query, "series"):
                    _series_part(series, out)
                else:
                    _put(out, "SeriesInstanceUID", series.series_uid)
                _instance_part(inst, out)
                rows.append(out)
        return _answer(rows, query)

    def known_study(study: str) -> None:
        if not is_valid_uid(study):
            raise HTTPException(400, f"not a valid UID: {study[:70]!r}")
        with store.session() as s:
            if s.get(Study, study) is None:
                raise HTTPException(404, "study not found")

    def known_series(study: str, series: str) -> None:
        known_study(study)
        if not is_valid_uid(series):
            raise HTTPException(400, f"not a valid UID: {series[:70]!r}")
        with store.session() as s:
            found = s.get(Series, series)
            if found is None or found.study_uid != study:
                raise HTTPException(404, "series not found")

    @app.get("/studies")
    def search_studies(request: Request) -> JSONResponse:
        """Studies, matched on study-level attributes."""
        return studies(request, [])

    @app.get("/series")
    def search_all_series(request: Request) -> JSONResponse:
        """Series of every study; study attributes match and are returned too."""
        return series_search(request, [], with_study=True)

    @app.get("/instances")
    def search_all_instances(request: Request) -> JSONResponse:
        """Instances of every study."""
        return instance_search(request, [], with_series=True, with_study=True)

    @app.get("/studies/{study}/series")
    def search_series(request: Request, study: str) -> JSONResponse:
        """The series of a study."""
        known_study(study)
        return series_search(request, [Series.study_uid == study], with_study=False)

    @app.get("/studies/{study}/instances")
    def search_study_instances(request: Request, study: str) -> JSONResponse:
        """The instances of a study, with their series' attributes."""
        known_study(study)
        return instance_search(
            request, [Instance.study_uid == study], with_series=True, with_study=False
        )

    @app.get("/studies/{study}/series/{series}/instances")
    def search_instances(request: Request, study: str, series: str) -> JSONResponse:
        """The instances of a series."""
        known_series(study, series)
        return instance_search(
            request,
            [Instance.study_uid == study, Instance.series_uid == series],
            with_series=False,
            with_study=False,
        )

    return app
