"""The patient's previous study, for a rule with ``compare_with_prior``: found in the node's
archive first, then in the rule's ``source`` PACS (C-FIND, then C-GET of the series into the
job's folder).

A prior is a study of the same Patient ID (and Issuer of Patient ID, when either study has
one: never the name), dated before the current one (within ``max_interval_days``), with a
received series of the same modality (and body part, where both say) of at least
``min_instances`` images; the latest such study is taken, its largest such series measured.

The outcome is explicit, and recorded in the job's events: ``compared``, ``no_prior`` (no
earlier study of the patient), ``no_comparable_series`` (earlier studies, none with such a
series), or ``unavailable`` (the PACS could not be asked or did not send it); the events
are ``prior_<outcome>``.

The same models (the versions of this job) are run on the prior images, so the comparison is
between one model version's measurements; an earlier SR of another version is not reused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from airouter.core.db import Instance, Series, Store, Study
from airouter.core.settings import DicomNode, DispatchSettings
from airouter.core.vocab import Source
from scp.retrieve import Peer, RetrieveError, find, get_series

log = logging.getLogger(__name__)


@dataclass
class PriorImages:
    """What was found: the prior study and the files of its series (or why there is none)."""

    outcome: str  # compared | no_prior | no_comparable_series | unavailable (event prior_<it>)
    detail: str = ""
    study_uid: str | None = None
    study_date: str | None = None
    series_uid: str | None = None
    where: str | None = None  # "archive" or the PACS's destination name
    paths: list[str] = field(default_factory=list)


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _date(text: str) -> date | None:
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except (ValueError, IndexError):
        return None


def interval_days(prior: str, current: str) -> int | None:
    """Days from ``prior`` to ``current`` (DA values); None when either is not a date."""
    a, b = _date(prior), _date(current)
    return (b - a).days if a is not None and b is not None else None


@dataclass(frozen=True)
class _Want:
    patient_id: str
    issuer: str
    study_uid: str
    study_date: str
    modality: str
    body_part: str
    max_days: int | None
    min_instances: int

    def in_window(self, study_date: str) -> bool:
        days = interval_days(study_date, self.study_date)
        if days is None or days <= 0:
            return False
        return self.max_days is None or days <= self.max_days

    def comparable(self, modality: str, body_part: str) -> bool:
        if modality.upper() != self.modality.upper():
            return False
        return not (body_part and self.body_part and body_part.upper() != self.body_part.upper())


def find_prior(
    store: Store,
    header: Dataset,
    options: dict[str, Any],
    dispatch: DispatchSettings,
    folder: Path,
) -> PriorImages:
    """The prior of the study ``header`` (the current series' first image) belongs to."""
    want = _Want(
        patient_id=_text(header, "PatientID"),
        issuer=_text(header, "IssuerOfPatientID"),
        study_uid=_text(header, "StudyInstanceUID"),
        study_date=_text(header, "StudyDate"),
        modality=_text(header, "Modality"),
        body_part=_text(header, "BodyPartExamined"),
        max_days=options.get("max_interval_days"),
        min_instances=int(options.get("min_instances", 5)),
    )
    if not want.patient_id or _date(want.study_date) is None:
        return PriorImages("no_prior", "the study has no Patient ID or no Study Date")
    with store.session() as s:
        own = _in_archive(s, want)
    if own.outcome == "compared" or not options.get("source"):
        return own
    found = _in_pacs(want, options["source"], dispatch, folder)
    if found.outcome == "compared":
        return found
    if own.outcome == "no_comparable_series" and found.outcome == "no_prior":
        return own
    return found


def _in_archive(s: Session, want: _Want) -> PriorImages:
    studies = s.scalars(
        select(Study)
        .where(Study.patient_id == want.patient_id, Study.study_uid != want.study_uid)
        .order_by(Study.study_date.desc())
    ).all()
    candidates = [st for st in studies if st.study_date and want.in_window(st.study_date)]
    if not candidates:
        return PriorImages("no_prior", "no earlier study of the patient in the archive")
    for study in candidates:
        rows = s.execute(
            select(Series, func.count(Instance.id))
            .join(Instance, Instance.series_uid == Series.series_uid)
            .where(Series.study_uid == study.study_uid, Series.source != Source.PRODUCED)
            .group_by(Series.series_uid)
        ).all()
        usable = [
            (n, series)
            for series, n in rows
            if n >= want.min_instances
            and want.comparable(series.modality or "", series.body_part_examined or "")
        ]
        if not usable:
            continue
        _, series = max(usable, key=lambda pair: pair[0])
        paths = list(
            s.scalars(select(Instance.path).where(Instance.series_uid == series.series_uid))
        )
        first = dcmread(paths[0], stop_before_pixels=True, specific_tags=["IssuerOfPatientID"])
        if _text(first, "IssuerOfPatientID") != want.issuer:
            continue  # the same ID from another issuer: another patient
        return PriorImages(
            "compared",
            f"study of {study.study_date} in the archive",
            study.study_uid,
            study.study_date,
            series.series_uid,
            "archive",
            paths,
        )
    return PriorImages(
        "no_comparable_series",
        f"{len(candidates)} earlier stud(ies) in the archive, none with a {want.modality} "
        f"series of {want.min_instances} images or more",
    )


def _in_pacs(want: _Want, source: str, dispatch: DispatchSettings, folder: Path) -> PriorImages:
    node = dispatch.destinations.get(source)
    if not isinstance(node, DicomNode):
        return PriorImages("unavailable", f"{source!r} is not a DICOM destination")
    peer = Peer(
        node.ae_title,
        node.host,
        node.port,
        dispatch.calling_ae_title or "AIROUTER",
        dispatch.timeouts.dimse_timeout_s or 60.0,
    )
    keys: dict[str, Any] = {
        "PatientID": want.patient_id,
        "StudyInstanceUID": "",
        "StudyDate": "",
        "ModalitiesInStudy": "",
    }
    if want.issuer:
        keys["IssuerOfPatientID"] = want.issuer
    try:
        studies = find(peer, "STUDY", keys)
        dated = sorted(
            (
                (_text(st, "StudyDate"), _text(st, "StudyInstanceUID"))
                for st in studies
                if _text(st, "PatientID") == want.patient_id
                and _text(st, "IssuerOfPatientID") == want.issuer
                and _text(st, "StudyInstanceUID") != want.study_uid
                and want.in_window(_text(st, "StudyDate"))
            ),
            reverse=True,
        )
        if not dated:
            return PriorImages("no_prior", f"no earlier study of the patient in {source}")
        for study_date, study_uid in dated:
            series = find(
                peer,
                "SERIES",
                {
                    "StudyInstanceUID": study_uid,
                    "SeriesInstanceUID": "",
                    "Modality": "",
                    "BodyPartExamined": "",
                    "NumberOfSeriesRelatedInstances": "",
                },
            )
            usable = [
                (int(x.get("NumberOfSeriesRelatedInstances") or 0), _text(x, "SeriesInstanceUID"))
                for x in series
                if want.comparable(_text(x, "Modality"), _text(x, "BodyPartExamined"))
            ]
            usable = [u for u in usable if u[0] >= want.min_instances]
            if not usable:
                continue
            _, series_uid = max(usable)
            files = get_series(peer, study_uid, series_uid, folder / series_uid)
            return PriorImages(
                "compared",
                f"study of {study_date} in {source}, {len(files)} images retrieved",
                study_uid,
                study_date,
                series_uid,
                source,
                [str(f) for f in files],
            )
    except RetrieveError as exc:
        return PriorImages("unavailable", str(exc))
    return PriorImages(
        "no_comparable_series",
        f"{len(dated)} earlier stud(ies) in {source}, none with a {want.modality} series of "
        f"{want.min_instances} images or more",
    )
