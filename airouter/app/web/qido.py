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

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom.datadict import dictionary_VR, tag_for_keyword
from sqlalchemy import ColumnElement, func, select

from airouter.core.db import Instance, Series, Store, Study
from airouter.core.query import ATTRS, LEVELS, QueryError, condition, keyword_of
from airouter.core.spool import is_valid_uid

DICOM_JSON = "application/dicom+json"
MAX_LIMIT = 1000  # a page holds at most this many results (a larger limit is capped)
_CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


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
    allowed = set(LEVELS[: LEVELS.index(level) + 1])
    where: list[ColumnElement[bool]] = []
    warnings: list[str] = []
    include: set[str] = set()
    for key, value in params.multi_items():
        if key in _CONTROL:
            continue
        keyword = keyword_of(key)
        if keyword is None:
            raise HTTPException(400, f"not a DICOM attribute (keyword or tag): {key[:64]!r}")
        attr = ATTRS.get(keyword)
        if attr is None or attr.level not in allowed:
            warnings.append(f"{keyword} is not a supported matching key here: ignored")
            continue
        try:
            matching = condition(attr, value)
        except QueryError as exc:
            raise HTTPException(400, str(exc)) from exc
        if matching is not None:
            where.append(matching)
    for field in params.getlist("includefield"):
        for item in (f.strip() for f in field.split(",")):
            if not item:
                continue
            if item == "all":
                include.add("all")
                continue
            keyword = keyword_of(item)
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
        (a := ATTRS.get(k)) is not None and a.level == level for k in query.include
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
