"""DIMSE query/retrieve of the node's archive: C-FIND, C-MOVE and C-GET (PS3.4 Annex C),
patient root and study root, over the same index and matching as QIDO-RS.

- C-FIND at PATIENT (patient root), STUDY, SERIES and IMAGE level: the identifier's keys
  match as PS3.4 C.2.2.2 says (``airouter.core.query``), and each answer carries every key
  asked for (with its value where the index holds it), the level's unique keys and our AE as
  the Retrieve AE Title. A C-CANCEL stops it.
- C-MOVE sends the instances to a configured DICOM node, looked up by the Move Destination
  AE title (its host, port and TLS from ``dispatch.destinations``); any other title is
  refused with 0xA801 (Move Destination unknown). C-GET sends them back on the association.
- Retrieval takes the level's unique keys (a list of UIDs at a level is allowed).
- ``allowed`` restricts who may query and retrieve, by calling AE title; any other gets
  0x0124 (Refused: Not Authorized). Logs name the AE titles and counts, never a patient.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import ColumnElement, distinct, func, select

from airouter.core.db import Instance, Series, Store, Study
from airouter.core.query import ATTRS, QueryError, condition
from scp.server import ExtraService

log = logging.getLogger(__name__)

PENDING, SUCCESS, CANCEL = 0xFF00, 0x0000, 0xFE00
NOT_AUTHORIZED = 0x0124
IDENTIFIER_MISMATCH = 0xA900  # Identifier does not match SOP Class
UNABLE = 0xC000  # Unable to process
_PATIENT_ROOT = {
    str(PatientRootQueryRetrieveInformationModelFind),
    str(PatientRootQueryRetrieveInformationModelMove),
    str(PatientRootQueryRetrieveInformationModelGet),
}
_LEVELS = {"PATIENT": "patient", "STUDY": "study", "SERIES": "series", "IMAGE": "instance"}
_UNIQUE = {
    "PATIENT": ("PatientID",),
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}
_CONTROL = {"QueryRetrieveLevel", "SpecificCharacterSet"}
_ORDER = ("patient", "study", "series", "instance")


@dataclass(frozen=True)
class MoveTarget:
    """Where C-MOVE may send: a DICOM node by its AE title (TLS when ``tls`` is given)."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None


class QueryFailed(Exception):
    """A request the archive cannot answer; ``status`` is the DIMSE status to send."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _failure(status: int, reason: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = reason[:64]
    return ds


def _text(value: Any) -> str:
    """A query key's value as QIDO-RS would receive it (multiple values joined by ``\\``)."""
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


class ArchiveQR:
    """The C-FIND, C-MOVE and C-GET SCP of the archive (``services`` binds them to the AE)."""

    def __init__(
        self,
        store: Store,
        ae_title: str,
        targets: dict[str, MoveTarget],
        allowed: Sequence[str] = (),
        max_matches: int = 10000,
    ) -> None:
        self.store = store
        self.ae_title = ae_title
        self.targets = targets
        self.allowed = {a.strip() for a in allowed}
        self.max_matches = max_matches

    def services(self) -> list[ExtraService]:
        """The Q/R SOP classes and their handlers, for ``scp.server.build_ae``."""
        find = (
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelFind,
        )
        move = (
            PatientRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelMove,
        )
        get = (
            PatientRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelGet,
        )
        out = [ExtraService(str(c), evt.EVT_C_FIND, self.handle_find) for c in find]
        out += [ExtraService(str(c), evt.EVT_C_MOVE, self.handle_move) for c in move]
        out += [ExtraService(str(c), evt.EVT_C_GET, self.handle_get) for c in get]
        return out

    # -- the requests ----------------------------------------------------------------------
    def _level(self, event: Any, identifier: Dataset) -> str:
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        if level not in _LEVELS:
            raise QueryFailed(IDENTIFIER_MISMATCH, f"QueryRetrieveLevel {level[:16]!r} unknown")
        patient_root = str(event.context.abstract_syntax) in _PATIENT_ROOT
        if level == "PATIENT" and not patient_root:
            raise QueryFailed(IDENTIFIER_MISMATCH, "PATIENT level needs the patient root model")
        return level

    def _authorised(self, event: Any) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        if self.allowed and calling not in self.allowed:
            raise QueryFailed(NOT_AUTHORIZED, f"{calling} may not query or retrieve")

    def _conditions(self, identifier: Dataset, level: str) -> list[ColumnElement[bool]]:
        depth = _ORDER.index(_LEVELS[level])
        where = []
        for element in identifier:
            keyword = element.keyword
            if not keyword or keyword in _CONTROL:
                continue
            attr = ATTRS.get(keyword)
            if attr is None or _ORDER.index(attr.level) > max(depth, 1):
                continue  # not a key the index matches at this level: returned, not matched
            try:
                cond = condition(attr, _text(element.value))
            except QueryError as exc:
                raise QueryFailed(UNABLE, str(exc)) from exc
            if cond is not None:
                where.append(cond)
        return where

    def handle_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND: one pending answer per match, then success (or cancel, or a failure)."""
        try:
            self._authorised(event)
            identifier = event.identifier
            level = self._level(event, identifier)
            answers = self._find(identifier, level)
            count = 0
            for answer in answers:
                if event.is_cancelled:
                    yield CANCEL, None
                    return
                count += 1
                yield PENDING, answer
        except QueryFailed as exc:
            log.warning("C-FIND from %s refused: %s", event.assoc.requestor.ae_title, exc)
            yield exc.status, _failure(exc.status, str(exc))
            return
        except Exception as exc:  # the index failed: a status with the reason, not a crash
            log.exception("C-FIND from %s failed", event.assoc.requestor.ae_title)
            yield UNABLE, _failure(UNABLE, f"{type(exc).__name__}: {exc}")
            return
        log.info("C-FIND from %s at %s level: %d match(es)", event.assoc.requestor.ae_title,
                 level, count)  # fmt: skip
        yield SUCCESS, None

    def _find(self, identifier: Dataset, level: str) -> list[Dataset]:
        where = self._conditions(identifier, level)
        asked = [e.keyword for e in identifier if e.keyword and e.keyword not in _CONTROL]
        with self.store.session() as s:
            if level == "PATIENT":
                rows = s.execute(
                    select(Study.patient_id, Study.patient_name, func.count(Study.study_uid))
                    .where(*where)
                    .group_by(Study.patient_id, Study.patient_name)
                    .limit(self.max_matches)
                ).all()
                values = [
                    {"PatientID": pid, "PatientName": name, "NumberOfPatientRelatedStudies": n}
                    for pid, name, n in rows
                ]
            elif level == "STUDY":
                studies = s.scalars(
                    select(Study).where(*where).order_by(Study.created_at).limit(self.max_matches)
                ).all()
                values = [self._study_values(s, study, asked) for study in studies]
            elif level == "SERIES":
                found = s.execute(
                    select(Series, Study)
                    .join(Study, Study.study_uid == Series.study_uid)
                    .where(*where)
                    .order_by(Series.study_uid, Series.series_number)
                    .limit(self.max_matches)
                ).all()
                values = [self._series_values(s, se, st, asked) for se, st in found]
            else:
                images = s.execute(
                    select(Instance, Series, Study)
                    .join(Series, Series.series_uid == Instance.series_uid)
                    .join(Study, Study.study_uid == Instance.study_uid)
                    .where(*where)
                    .order_by(Instance.series_uid, Instance.instance_number, Instance.id)
                    .limit(self.max_matches)
                ).all()
                values = [
                    {
                        **_study_dict(st),
                        **_series_dict(se),
                        "SOPInstanceUID": i.sop_instance_uid,
                        "SOPClassUID": i.sop_class_uid,
                        "InstanceNumber": i.instance_number,
                    }
                    for i, se, st in images
                ]
        return [self._answer(identifier, level, v) for v in values]

    def _study_values(self, s: Any, study: Study, asked: list[str]) -> dict[str, Any]:
        values = _study_dict(study)
        if "ModalitiesInStudy" in asked:
            values["ModalitiesInStudy"] = sorted(
                m
                for m in s.scalars(
                    select(distinct(Series.modality)).where(Series.study_uid == study.study_uid)
                )
                if m
            )
        if "NumberOfStudyRelatedSeries" in asked:
            values["NumberOfStudyRelatedSeries"] = s.scalar(
                select(func.count()).where(Series.study_uid == study.study_uid)
            )
        if "NumberOfStudyRelatedInstances" in asked:
            values["NumberOfStudyRelatedInstances"] = s.scalar(
                select(func.count()).where(Instance.study_uid == study.study_uid)
            )
        return values

    def _series_values(
        self, s: Any, series: Series, study: Study, asked: list[str]
    ) -> dict[str, Any]:
        values = {**_study_dict(study), **_series_dict(series)}
        if "NumberOfSeriesRelatedInstances" in asked:
            values["NumberOfSeriesRelatedInstances"] = s.scalar(
                select(func.count()).where(Instance.series_uid == series.series_uid)
            )
        return values

    def _answer(self, identifier: Dataset, level: str, values: dict[str, Any]) -> Dataset:
        """The identifier's keys, with the values the index holds (unique keys always)."""
        answer = Dataset()
        answer.SpecificCharacterSet = "ISO_IR 192"  # what the index holds: UTF-8
        answer.QueryRetrieveLevel = level
        wanted = [e.keyword for e in identifier if e.keyword and e.keyword not in _CONTROL]
        for keyword in dict.fromkeys([*_UNIQUE[level], *wanted]):
            value = values.get(keyword)
            setattr(answer, keyword, "" if value is None else value)
        answer.RetrieveAETitle = self.ae_title
        return answer

    # -- retrieval -------------------------------------------------------------------------
    def _paths(self, identifier: Dataset, level: str) -> list[tuple[str, str, str]]:
        """(path, SOP class, transfer syntax) of the instances the unique keys name."""
        where: list[ColumnElement[bool]] = []
        needed = {"PATIENT": ["PatientID"], "STUDY": ["StudyInstanceUID"],
                  "SERIES": ["SeriesInstanceUID"], "IMAGE": ["SOPInstanceUID"]}[level]  # fmt: skip
        for keyword in needed:
            value = _text(identifier.get(keyword))
            if not value:
                raise QueryFailed(IDENTIFIER_MISMATCH, f"{keyword} is needed at {level} level")
        columns = {  # the instance's own columns: no join can widen what is retrieved
            "PatientID": Study.patient_id,
            "StudyInstanceUID": Instance.study_uid,
            "SeriesInstanceUID": Instance.series_uid,
            "SOPInstanceUID": Instance.sop_instance_uid,
        }
        for keyword, column in columns.items():
            value = _text(identifier.get(keyword))
            if not value:
                continue
            try:
                cond = condition(
                    replace(ATTRS.get(keyword) or ATTRS["PatientID"], column=column), value
                )
            except QueryError as exc:
                raise QueryFailed(UNABLE, str(exc)) from exc
            if cond is not None:
                where.append(cond)
        with self.store.session() as s:
            rows = s.execute(
                select(Instance.path, Instance.sop_class_uid, Instance.transfer_syntax)
                .join(Study, Study.study_uid == Instance.study_uid)
                .where(*where)
                .order_by(Instance.series_uid, Instance.instance_number, Instance.id)
            ).all()
        return [(p, c, t) for p, c, t in rows]

    def _sub_operations(
        self, event: Any, found: list[tuple[str, str, str]]
    ) -> Iterator[tuple[int, Dataset | None]]:
        for path, _, _ in found:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, pydicom.dcmread(path)

    def handle_get(self, event: Any) -> Iterator[Any]:
        """C-GET: the instances, sent back as C-STORE sub-operations on this association."""
        try:
            self._authorised(event)
            level = self._level(event, event.identifier)
            found = self._paths(event.identifier, level)
        except QueryFailed as exc:
            log.warning("C-GET from %s refused: %s", event.assoc.requestor.ae_title, exc)
            yield 1  # (with none, pynetdicom would answer success)
            yield exc.status, _failure(exc.status, str(exc))
            return
        log.info("C-GET from %s: %d instance(s)", event.assoc.requestor.ae_title, len(found))
        yield len(found)
        yield from self._sub_operations(event, found)

    def handle_move(self, event: Any) -> Iterator[Any]:
        """C-MOVE: the instances, sent on a new association to the Move Destination."""
        raw = event.move_destination
        destination = (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)).strip()
        calling = event.assoc.requestor.ae_title
        target = self.targets.get(destination)
        if target is None:
            log.warning("C-MOVE from %s to unknown destination %r refused", calling, destination)
            yield None, None  # pynetdicom answers 0xA801, Move Destination unknown
            return
        failure: QueryFailed | None = None
        found: list[tuple[str, str, str]] = []
        try:
            self._authorised(event)
            found = self._paths(event.identifier, self._level(event, event.identifier))
        except QueryFailed as exc:
            log.warning("C-MOVE from %s refused: %s", calling, exc)
            failure = exc
        contexts: dict[str, list[str]] = {}
        for _, sop_class, syntax in found:
            syntaxes = [syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            contexts.setdefault(sop_class, list(dict.fromkeys(syntaxes)))
        options: dict[str, Any] = {
            "ae_title": target.ae_title,
            "contexts": [build_context(c, t) for c, t in list(contexts.items())[:128]]
            or [build_context("1.2.840.10008.1.1")],
        }
        if target.tls is not None:
            options["tls_args"] = (target.tls, target.server_hostname)
        yield target.host, target.port, options
        if failure is not None:
            yield 1  # a failure status needs one sub-operation announced
            yield failure.status, _failure(failure.status, str(failure))
            return
        log.info("C-MOVE from %s: %d instance(s) to %s", calling, len(found), destination)
        yield len(found)
        yield from self._sub_operations(event, found)


def _study_dict(study: Study) -> dict[str, Any]:
    return {
        "StudyInstanceUID": study.study_uid,
        "PatientID": study.patient_id,
        "PatientName": study.patient_name,
        "StudyDate": study.study_date,
        "StudyTime": study.study_time,
        "AccessionNumber": study.accession_number,
        "StudyDescription": study.study_description,
    }


def _series_dict(series: Series) -> dict[str, Any]:
    return {
        "SeriesInstanceUID": series.series_uid,
        "Modality": series.modality,
        "SeriesNumber": series.series_number,
        "SeriesDescription": series.series_description,
        "BodyPartExamined": series.body_part_examined,
    }
