"""HTTP: DICOMweb (QIDO-RS, WADO-RS; PS3.18) of the node's archive, and the REST API.

The archive holds what the node received and what it produced. Errors are JSON with a status.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import func, select

from airouter.db import (
    Delivery,
    DeliveryState,
    Event,
    Instance,
    Job,
    JobState,
    Output,
    Series,
    Store,
    Study,
    instance_counts,
    utcnow,
)
from router.engine import explain
from router.queue import study_context
from router.registry import RuleSet
from scp.ingest import Ingest
from scp.server import AssociationTracker
from scp.spool import is_valid_uid
from scp.stow import StowError, boundary_of, split_parts, store_parts

DICOM_JSON = "application/dicom+json"


def _attr(vr: str, value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(value)}]}
    return {"vr": vr, "Value": [value]}


def _study_json(study: Study, n_series: int, n_instances: int) -> dict[str, Any]:
    return {
        "0020000D": _attr("UI", study.study_uid),
        "00080020": _attr("DA", study.study_date),
        "00080030": _attr("TM", study.study_time),
        "00080050": _attr("SH", study.accession_number),
        "00081030": _attr("LO", study.study_description),
        "00100010": _attr("PN", study.patient_name),
        "00100020": _attr("LO", study.patient_id),
        "00201206": _attr("IS", n_series),
        "00201208": _attr("IS", n_instances),
    }


def _series_json(series: Series, n_instances: int) -> dict[str, Any]:
    return {
        "0020000D": _attr("UI", series.study_uid),
        "0020000E": _attr("UI", series.series_uid),
        "00080060": _attr("CS", series.modality),
        "0008103E": _attr("LO", series.series_description),
        "00200011": _attr("IS", series.series_number),
        "00201209": _attr("IS", n_instances),
    }


def _instance_json(inst: Instance) -> dict[str, Any]:
    return {
        "0020000D": _attr("UI", inst.study_uid),
        "0020000E": _attr("UI", inst.series_uid),
        "00080016": _attr("UI", inst.sop_class_uid),
        "00080018": _attr("UI", inst.sop_instance_uid),
        "00200013": _attr("IS", inst.instance_number),
        "00083002": _attr("UI", inst.transfer_syntax),
    }


def _check(*uids: str) -> None:
    for uid in uids:
        if not is_valid_uid(uid):
            raise HTTPException(400, f"not a valid UID: {uid[:70]!r}")


def _multipart(paths: list[str]) -> StreamingResponse:
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for path in paths:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            yield Path(path).read_bytes()
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    media = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return StreamingResponse(body(), media_type=media)


def _job_json(job: Job, outputs: list[Output], deliveries: list[Delivery]) -> dict[str, Any]:
    by_output: dict[int, list[dict[str, Any]]] = {}
    for d in deliveries:
        by_output.setdefault(d.output_id, []).append(
            {
                "destination": d.destination,
                "state": d.state.value,
                "attempts": d.attempts,
                "last_status": d.last_status,
                "commitment": d.commitment,
            }
        )
    return {
        "id": job.id,
        "study_uid": job.study_uid,
        "series_uid": job.series_uid,
        "rule": job.rule,
        "version": job.version,
        "instance_count": job.instance_count,
        "models": job.models,
        "priority": job.priority,
        "state": job.state.value,
        "attempts": job.attempts,
        "error": job.error,
        "timings": {k: v for k, v in job.timings.items() if not k.endswith("_at")},
        "created_at": job.created_at.isoformat() + "Z",
        "finished_at": job.finished_at.isoformat() + "Z" if job.finished_at else None,
        "outputs": [
            {
                "kind": o.kind,
                "sop_instance_uid": o.sop_instance_uid,
                "series_uid": o.series_uid,
                "deliveries": by_output.get(o.id, []),
            }
            for o in outputs
        ],
    }


def create_app(
    store: Store,
    health: Callable[[], dict[str, Any]],
    ingest: Ingest | None = None,
    tracker: AssociationTracker | None = None,
    ruleset: RuleSet | None = None,
    on_retry: Callable[[], None] | None = None,
) -> FastAPI:
    """The node's HTTP application (STOW-RS when an ingest is given)."""
    app = FastAPI(title="airouter", version="0.1.0")

    async def _stow(request: Request, study: str | None) -> JSONResponse:
        if ingest is None or tracker is None:
            raise HTTPException(405, "this node does not accept STOW-RS")
        try:
            boundary = boundary_of(request.headers.get("content-type", ""))
            parts = split_parts(await request.body(), boundary)
        except StowError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        base = str(request.base_url).rstrip("/") + "/dicomweb"
        client = request.client.host if request.client else None
        result = await run_in_threadpool(store_parts, ingest, tracker, parts, study, base, client)
        retrieve = f"{base}/studies/{study}" if study else None
        return JSONResponse(
            result.dicom_json(retrieve), status_code=result.http_status, media_type=DICOM_JSON
        )

    @app.post("/dicomweb/studies")
    async def store_instances(request: Request) -> JSONResponse:
        """STOW-RS (PS3.18 10.5): multipart/related; type="application/dicom"."""
        return await _stow(request, None)

    @app.post("/dicomweb/studies/{study}")
    async def store_study_instances(study: str, request: Request) -> JSONResponse:
        _check(study)
        return await _stow(request, study)

    @app.exception_handler(HTTPException)
    async def _json_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail, "status": exc.status_code}, exc.status_code)

    @app.get("/dicomweb/studies")
    def search_studies(StudyInstanceUID: str | None = None) -> JSONResponse:  # noqa: N803
        with store.session() as s:
            q = select(Study)
            if StudyInstanceUID:
                q = q.where(Study.study_uid == StudyInstanceUID)
            rows = []
            for study in s.scalars(q.order_by(Study.created_at)).all():
                n_series = (
                    s.scalar(
                        select(func.count())
                        .select_from(Series)
                        .where(Series.study_uid == study.study_uid)
                    )
                    or 0
                )
                n_inst = (
                    s.scalar(
                        select(func.count())
                        .select_from(Instance)
                        .where(Instance.study_uid == study.study_uid)
                    )
                    or 0
                )
                rows.append(_study_json(study, n_series, n_inst))
        return JSONResponse(rows, media_type=DICOM_JSON)

    @app.get("/dicomweb/studies/{study}/series")
    def search_series(study: str) -> JSONResponse:
        _check(study)
        with store.session() as s:
            if s.get(Study, study) is None:
                raise HTTPException(404, "study not found")
            counts = instance_counts(s, study)
            series = s.scalars(select(Series).where(Series.study_uid == study)).all()
            rows = [_series_json(se, counts.get(se.series_uid, 0)) for se in series]
        return JSONResponse(rows, media_type=DICOM_JSON)

    @app.get("/dicomweb/studies/{study}/series/{series}/instances")
    def search_instances(study: str, series: str) -> JSONResponse:
        _check(study, series)
        with store.session() as s:
            rows = s.scalars(
                select(Instance)
                .where(Instance.study_uid == study, Instance.series_uid == series)
                .order_by(Instance.instance_number, Instance.id)
            ).all()
            if not rows:
                raise HTTPException(404, "series not found")
            body = [_instance_json(i) for i in rows]
        return JSONResponse(body, media_type=DICOM_JSON)

    def _paths(**where: str) -> list[str]:
        with store.session() as s:
            q = select(Instance.path)
            for column, value in where.items():
                q = q.where(getattr(Instance, column) == value)
            paths = list(s.scalars(q.order_by(Instance.series_uid, Instance.instance_number)))
        if not paths:
            raise HTTPException(404, "not found")
        return paths

    @app.get("/dicomweb/studies/{study}")
    def retrieve_study(study: str) -> StreamingResponse:
        _check(study)
        return _multipart(_paths(study_uid=study))

    @app.get("/dicomweb/studies/{study}/series/{series}")
    def retrieve_series(study: str, series: str) -> StreamingResponse:
        _check(study, series)
        return _multipart(_paths(study_uid=study, series_uid=series))

    @app.get("/dicomweb/studies/{study}/series/{series}/instances/{sop}")
    def retrieve_instance(study: str, series: str, sop: str) -> StreamingResponse:
        _check(study, series, sop)
        return _multipart(_paths(study_uid=study, series_uid=series, sop_instance_uid=sop))

    @app.get("/api/rules")
    def get_rules() -> dict[str, Any]:
        """The rules in force and the last rejected edit, if any."""
        if ruleset is None:
            raise HTTPException(404, "no rules loaded")
        return ruleset.status()

    @app.get("/api/studies/{study}/rules")
    def dry_run(study: str) -> dict[str, Any]:
        """Which rules would match this stored study, what they would select, and why not."""
        _check(study)
        if ruleset is None:
            raise HTTPException(404, "no rules loaded")
        with store.session() as s:
            if s.get(Study, study) is None:
                raise HTTPException(404, "study not found")
            ctx = study_context(s, study)
        verdicts = explain(ctx, ruleset.rules)
        return {
            "study": study,
            "series": [
                {
                    "series_uid": x.series_uid,
                    "instances": x.instance_count,
                    "modality": x.tags.get("Modality"),
                }
                for x in ctx.series
            ],
            "rules": [
                {
                    "rule": v.rule.name,
                    "matched": v.matched,
                    "series_uid": v.series_uid,
                    "action": v.rule.action.value,
                    "reason": v.reason,
                }
                for v in verdicts
            ],
        }

    @app.get("/api/deliveries")
    def list_deliveries(state: str | None = None, job: int | None = None) -> list[dict[str, Any]]:
        """The outbox: each (object, destination) with its state and the destination's answer."""
        with store.session() as s:
            q = select(Delivery, Output).join(Output, Output.id == Delivery.output_id)
            if state:
                q = q.where(Delivery.state == state)
            if job is not None:
                q = q.where(Output.job_id == job)
            return [
                {
                    "id": d.id,
                    "job_id": o.job_id,
                    "kind": o.kind,
                    "sop_instance_uid": o.sop_instance_uid,
                    "destination": d.destination,
                    "state": d.state.value,
                    "attempts": d.attempts,
                    "last_status": d.last_status,
                    "commitment": d.commitment,
                    "next_attempt_at": d.next_attempt_at.isoformat() + "Z",
                }
                for d, o in s.execute(q.order_by(Delivery.id)).all()
            ]

    @app.post("/api/deliveries/{delivery_id}/retry")
    def retry_delivery(delivery_id: int) -> dict[str, Any]:
        """Send a failed or dead delivery again now, with a fresh round of attempts."""
        with store.session() as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                raise HTTPException(404, f"delivery {delivery_id} not found")
            if d.state not in (DeliveryState.DEAD, DeliveryState.FAILED):
                raise HTTPException(409, f"delivery {delivery_id} is {d.state.value}")
            d.state, d.attempts, d.next_attempt_at = DeliveryState.PENDING, 0, utcnow()
            output = s.get(Output, d.output_id)
            job_row = s.get(Job, output.job_id) if output else None
            if job_row is not None and job_row.state is JobState.FAILED:
                job_row.state, job_row.error = JobState.DISPATCHING, None
            s.add(
                Event(
                    kind="delivery_retry",
                    job_id=output.job_id if output else None,
                    detail=f"delivery {delivery_id} to {d.destination}",
                )
            )
        if on_retry is not None:
            on_retry()
        return {"id": delivery_id, "state": "pending"}

    @app.get("/api/health")
    def get_health() -> dict[str, Any]:
        return health()

    @app.get("/api/events")
    def list_events(study: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """The audit trail: refusals, routing decisions, failures (no PHI)."""
        with store.session() as s:
            q = select(Event).order_by(Event.id)
            if study:
                q = q.where(Event.study_uid == study)
            if kind:
                q = q.where(Event.kind == kind)
            return [
                {
                    "id": e.id,
                    "at": e.at.isoformat() + "Z",
                    "kind": e.kind,
                    "study_uid": e.study_uid,
                    "job_id": e.job_id,
                    "detail": e.detail,
                }
                for e in s.scalars(q).all()
            ]

    @app.get("/api/jobs")
    def list_jobs(study: str | None = None) -> list[dict[str, Any]]:
        with store.session() as s:
            q = select(Job).order_by(Job.id)
            if study:
                q = q.where(Job.study_uid == study)
            return [_job_details(s, job) for job in s.scalars(q).all()]

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: int) -> dict[str, Any]:
        with store.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise HTTPException(404, f"job {job_id} not found")
            return _job_details(s, job)

    return app


def _job_details(s: Any, job: Job) -> dict[str, Any]:
    outputs = list(s.scalars(select(Output).where(Output.job_id == job.id)).all())
    deliveries = (
        list(
            s.scalars(select(Delivery).where(Delivery.output_id.in_([o.id for o in outputs]))).all()
        )
        if outputs
        else []
    )
    return _job_json(job, outputs, deliveries)
