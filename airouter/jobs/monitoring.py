"""Models watched on what clinicians send back: a structure set approved or edited in the
planning system (or PACS) for a study we processed is compared, structure by structure, with
our result, and the agreement is aggregated per model version and subgroup.

1. :func:`queue_evaluations` (at each study completion): an RTSTRUCT received in the study,
   not written by us, that delineates a series one of our jobs wrote an RTSTRUCT for, gets an
   ``evaluate`` job (once).
2. :func:`evaluate` (a worker): both structure sets are filled on the source series' grid
   (:mod:`encoders.structures`), ROIs matched by name (case and spacing ignored), else by
   code; per pair MONAI's Dice, HD95 and surface Dice, and the volume difference
   (:mod:`inference.evaluation`), stored with the case's subgroup.
3. :func:`summarise`: per model version and subgroup (sex, age band, manufacturer, scanner,
   site, slice thickness band) the cases and medians; a subgroup is flagged when its median
   Dice is below ``monitoring.dice_threshold`` or below the model version's other cases by
   more than ``monitoring.margin``. A new flag is an audit event (``subgroup_flagged``); the
   API, the dashboard and ``/metrics`` show them all. Reviewers' rejections are counted per
   model and subgroup too.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from airouter.core.db import Evaluation, Event, Instance, Job, Output, Series, Store, Study
from airouter.core.settings import MonitoringSettings
from airouter.core.vocab import Action, JobState, OutputKind, Priority, Source
from airouter.jobs.recorder import JobRecorder
from encoders.common import EncodeError
from encoders.structures import Roi, rasterize, referenced_series, rois
from inference.evaluation import compare
from inference.volume import build_volume

log = logging.getLogger(__name__)

DIMENSIONS = ("sex", "age_band", "manufacturer", "scanner", "site", "thickness")
_RESULTS = (JobState.DONE, JobState.DISPATCHING, JobState.AWAITING_REVIEW)


class EvaluationError(Exception):
    """The structure set cannot be compared; the message says why (no PHI)."""


def queue_evaluations(s: Session, study_uid: str) -> list[Job]:
    """An ``evaluate`` job for each structure set of the study sent back to us (see the
    module), in the caller's transaction."""
    ours = set(
        s.scalars(
            select(Output.sop_instance_uid)
            .join(Job, Job.id == Output.job_id)
            .where(Job.study_uid == study_uid)
        )
    )
    created = []
    returned = s.scalars(
        select(Series).where(
            Series.study_uid == study_uid,
            Series.modality == "RTSTRUCT",
            Series.source != Source.PRODUCED,
        )
    ).all()
    for series in returned:
        done = s.scalars(
            select(Job.id).where(Job.series_uid == series.series_uid, Job.action == Action.EVALUATE)
        ).first()
        if done is not None:
            continue
        instance = s.scalars(
            select(Instance).where(Instance.series_uid == series.series_uid).order_by(Instance.id)
        ).first()
        if instance is None or instance.sop_instance_uid in ours:
            continue  # our own result, come back (a PACS sending it on)
        try:
            header = dcmread(instance.path, stop_before_pixels=True)
        except (OSError, ValueError) as exc:
            log.warning("study %s: returned structure set unreadable: %s", study_uid, exc)
            continue
        delineated = referenced_series(header)
        evaluated = s.scalars(
            select(Job)
            .join(Output, Output.job_id == Job.id)
            .where(
                Job.study_uid == study_uid,
                Job.series_uid.in_(delineated),
                Job.action == Action.RUN,
                Job.state.in_(_RESULTS),
                Output.kind == OutputKind.RTSTRUCT,
            )
            .order_by(Job.id.desc())
        ).first()
        if evaluated is None:
            continue  # a structure set of a series we did not contour
        job = Job(
            study_uid=study_uid,
            series_uid=series.series_uid,
            rule="monitoring",
            action=Action.EVALUATE,
            models=list(evaluated.models or []),
            outputs=[],
            destinations=[],
            instance_count=1,
            priority=Priority.ROUTINE.rank,
            options={"evaluates": evaluated.id, "reference": instance.sop_instance_uid},
        )
        s.add(job)
        s.flush()
        s.add(
            Event(
                kind="evaluation_queued",
                study_uid=study_uid,
                job_id=job.id,
                detail=f"structure set {instance.sop_instance_uid} against job {evaluated.id}",
            )
        )
        created.append(job)
    return created


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def match(ours: list[Roi], theirs: list[Roi]) -> list[tuple[Roi, Roi]]:
    """Pairs (ours, theirs): same name (case, spaces and underscores aside), else same code."""
    by_name = {_norm(r.name): r for r in theirs}
    by_code = {r.code: r for r in theirs if r.code is not None}
    pairs, used = [], set()
    for roi in ours:
        other = by_name.get(_norm(roi.name)) or (by_code.get(roi.code) if roi.code else None)
        if other is not None and other.number not in used:
            pairs.append((roi, other))
            used.add(other.number)
    return pairs


def _age(header: Dataset) -> int | None:
    text = str(header.get("PatientAge", "") or "")
    if len(text) == 4 and text[:3].isdigit():
        years = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52, "D": 1 / 365}.get(text[3])
        return int(int(text[:3]) * years) if years else None
    born, seen = str(header.get("PatientBirthDate", "")), str(header.get("StudyDate", ""))
    try:
        b, d = (
            date(int(born[:4]), int(born[4:6]), int(born[6:8])),
            date(int(seen[:4]), int(seen[4:6]), int(seen[6:8])),
        )
    except ValueError:
        return None
    return d.year - b.year - ((d.month, d.day) < (b.month, b.day))


def subgroup_of(header: Dataset, calling_ae: str | None) -> dict[str, str]:
    """The case's subgroup along each dimension (``unknown`` where the header is silent)."""
    age = _age(header)
    thickness = header.get("SliceThickness")
    band = "unknown"
    if thickness not in (None, ""):
        t = float(thickness)
        band = "<=1mm" if t <= 1 else "1-2.5mm" if t <= 2.5 else "2.5-5mm" if t <= 5 else ">5mm"
    manufacturer = str(header.get("Manufacturer", "") or "").strip() or "unknown"
    model = str(header.get("ManufacturerModelName", "") or "").strip()
    site = (calling_ae or "").strip() or str(header.get("InstitutionName", "") or "").strip()
    return {
        "sex": {"M": "M", "F": "F", "O": "O"}.get(str(header.get("PatientSex", "")), "unknown"),
        "age_band": f"{age // 10 * 10}-{age // 10 * 10 + 9}" if age is not None else "unknown",
        "manufacturer": manufacturer,
        "scanner": f"{manufacturer} {model}".strip() if model else manufacturer,
        "site": site or "unknown",
        "thickness": band,
    }


def _model_of(roi: Roi, models: list[str]) -> tuple[str, str]:
    """(model, version) from our ROI's generation description ("<model> <version> card:<sum>":
    the card's checksum is part of the version, a changed card is another version)."""
    name, _, version = roi.generation.partition(" ")
    if not name:
        return (models[0] if models else "?"), "?"
    return name, version or "?"


def evaluate(
    store: Store, recorder: JobRecorder, job: Job, settings: MonitoringSettings, max_bytes: int
) -> None:
    """Run an ``evaluate`` job (see the module): store one row per matched structure, end the
    job done, and record the subgroups newly flagged."""
    evaluated_id = int((job.options or {})["evaluates"])
    with store.session() as s:
        evaluated = s.get(Job, evaluated_id)
        if evaluated is None:
            raise EvaluationError(f"job {evaluated_id} is gone")
        rt = s.scalars(
            select(Output.path)
            .where(Output.job_id == evaluated_id, Output.kind == OutputKind.RTSTRUCT)
            .order_by(Output.id)
        ).first()
        sources = list(
            s.scalars(select(Instance.path).where(Instance.series_uid == evaluated.series_uid))
        )
        reference = s.scalars(
            select(Instance).where(Instance.series_uid == job.series_uid).order_by(Instance.id)
        ).first()
        study = s.get(Study, job.study_uid)
        calling = study.calling_ae if study is not None else None
        models = list(evaluated.models or [])
    if rt is None or reference is None or not sources:
        raise EvaluationError(
            f"job {evaluated_id}'s RTSTRUCT, its source or the returned structure set is "
            "no longer stored"
        )
    volume = build_volume(sources, max_bytes)
    ours_ds, theirs_ds = dcmread(rt), dcmread(reference.path)
    shape = tuple(volume.hu.shape)
    try:
        ours, theirs = (
            rasterize(ours_ds, volume.affine, shape),
            rasterize(theirs_ds, volume.affine, shape),
        )
    except EncodeError as exc:
        raise EvaluationError(f"structure set {reference.sop_instance_uid}: {exc}") from exc
    pairs = match(rois(ours_ds), rois(theirs_ds))
    if not pairs:
        raise EvaluationError(
            f"structure set {reference.sop_instance_uid} has no structure of job {evaluated_id}"
        )
    spacing = tuple(float(np.linalg.norm(volume.affine[:3, axis])) for axis in range(3))
    group = subgroup_of(volume.datasets[0], calling)
    rows = []
    for mine, other in pairs:
        agreement = compare(
            ours[mine.number], theirs[other.number], spacing, settings.surface_tolerance_mm
        )
        model, version = _model_of(mine, models)
        rows.append(
            Evaluation(
                job_id=job.id,
                evaluated_job_id=evaluated_id,
                study_uid=job.study_uid,
                reference_uid=reference.sop_instance_uid,
                structure=mine.name,
                model=model,
                model_version=version,
                dice=agreement.dice,
                hd95_mm=agreement.hd95_mm,
                surface_dice=agreement.surface_dice,
                volume_ml=agreement.volume_ml,
                reference_volume_ml=agreement.reference_volume_ml,
                subgroup=group,
            )
        )
    unmatched = sorted({r.name for r in rois(ours_ds)} - {m.name for m, _ in pairs})
    recorder.event(
        "evaluation",
        {
            "evaluated_job": evaluated_id,
            "dice": {r.structure: round(r.dice, 4) for r in rows},
            "not_returned": unmatched,
        },
    )
    with store.session() as s:
        row = s.get(Job, job.id, with_for_update=True)
        assert row is not None
        s.add_all(rows)
        recorder.apply(row, JobState.DONE)
        recorder.flush_events(s, row.study_uid)
        s.flush()
        _flag_new(s, settings)
    log.info("job %s: %d structures compared with job %s", job.id, len(rows), evaluated_id)


@dataclass(frozen=True)
class SubgroupStat:
    """A model version's cases in one subgroup: how many, the medians, whether flagged."""

    model: str
    version: str
    dimension: str
    value: str
    cases: int  # results compared (one per returned structure set)
    structures: int
    median_dice: float
    median_hd95_mm: float | None
    median_surface_dice: float | None
    median_volume_difference_ml: float
    others_median_dice: float | None  # the model version's cases outside the subgroup
    flagged: bool
    reason: str | None

    def as_json(self) -> dict[str, Any]:
        """Plain JSON."""
        return asdict(self)


def _median(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(statistics.median(kept)) if kept else None


def summarise(s: Session, settings: MonitoringSettings) -> list[SubgroupStat]:
    """Every (model version, dimension, value) with evaluations, flagged or not."""
    by_version: dict[tuple[str, str], list[Evaluation]] = defaultdict(list)
    for e in s.scalars(select(Evaluation).order_by(Evaluation.id)):
        by_version[(e.model, e.model_version)].append(e)
    stats = []
    for (model, version), rows in sorted(by_version.items()):
        for dimension in DIMENSIONS:
            values = sorted({str((r.subgroup or {}).get(dimension, "unknown")) for r in rows})
            for value in values:
                inside = [r for r in rows if (r.subgroup or {}).get(dimension, "unknown") == value]
                outside = [r for r in rows if r not in inside]
                dice = _median(r.dice for r in inside) or 0.0
                others = _median(r.dice for r in outside)
                cases = len({r.job_id for r in inside})
                reason = None
                if cases >= settings.min_cases:
                    if dice < settings.dice_threshold:
                        reason = f"median Dice {dice:.3f} below {settings.dice_threshold}"
                    elif others is not None and dice < others - settings.margin:
                        reason = (
                            f"median Dice {dice:.3f} below the other cases' {others:.3f} "
                            f"by more than {settings.margin}"
                        )
                stats.append(
                    SubgroupStat(
                        model=model,
                        version=version,
                        dimension=dimension,
                        value=value,
                        cases=cases,
                        structures=len(inside),
                        median_dice=dice,
                        median_hd95_mm=_median(r.hd95_mm for r in inside),
                        median_surface_dice=_median(r.surface_dice for r in inside),
                        median_volume_difference_ml=_median(
                            r.volume_ml - r.reference_volume_ml for r in inside
                        )
                        or 0.0,
                        others_median_dice=others,
                        flagged=reason is not None,
                        reason=reason,
                    )
                )
    return stats


def _flag_new(s: Session, settings: MonitoringSettings) -> None:
    """An audit event for each subgroup flagged now that was not flagged before."""
    earlier = {
        json.loads(d).get("key")
        for d in s.scalars(select(Event.detail).where(Event.kind == "subgroup_flagged"))
        if d.startswith("{")
    }
    for stat in summarise(s, settings):
        key = f"{stat.model}/{stat.version}/{stat.dimension}={stat.value}"
        if stat.flagged and key not in earlier:
            log.warning("subgroup %s flagged: %s", key, stat.reason)
            detail = {"key": key, "reason": stat.reason, "cases": stat.cases}
            s.add(Event(kind="subgroup_flagged", detail=json.dumps(detail, sort_keys=True)))


def rejections(s: Session) -> list[dict[str, Any]]:
    """Results reviewers rejected, per model and subgroup (the source series' first header)."""
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    totals: dict[tuple[str, str, str], int] = defaultdict(int)
    reviewed = s.execute(
        select(Job.id, Job.models, Job.state, Job.series_uid, Study.calling_ae)
        .join(Study, Study.study_uid == Job.study_uid)
        .where(Job.action == Action.RUN)
        .where(Job.state.in_([JobState.REJECTED, JobState.DONE, JobState.DISPATCHING]))
        .where(Job.options["review"].as_string() == "required")
    ).all()
    headers: dict[str, dict[str, str]] = {}
    for _job_id, job_models, state, series_uid, calling in reviewed:
        if series_uid not in headers:
            path = s.scalars(
                select(Instance.path).where(Instance.series_uid == series_uid).limit(1)
            ).first()
            try:
                header = dcmread(path, stop_before_pixels=True) if path else Dataset()
            except (OSError, ValueError):
                header = Dataset()
            headers[series_uid] = subgroup_of(header, calling)
        for model in job_models or []:
            for dimension, value in headers[series_uid].items():
                totals[(model, dimension, value)] += 1
                if state is JobState.REJECTED:
                    counts[(model, dimension, value)] += 1
    return [
        {"model": m, "dimension": d, "value": v, "reviewed": n, "rejected": counts[(m, d, v)]}
        for (m, d, v), n in sorted(totals.items())
    ]
