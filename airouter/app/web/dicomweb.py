"""DICOMweb of the node's archive (PS3.18): QIDO-RS and WADO-RS of what it received and
produced, STOW-RS into the receivers (``scp.stow``). Errors are JSON with a status."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import func, select

from airouter.core.db import Instance, Series, Store, Study, instance_counts
from airouter.core.spool import is_valid_uid
from airouter.core.tracker import AssociationTracker
from scp.ingest import Ingest
from scp.stow import Part, PartWriter, StowError, boundary_of, store_parts

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


def check_uids(*uids: str) -> None:
    """400 unless each value is a valid UID (they become paths and queries)."""
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


async def _receive_parts(
    request: Request, writer: PartWriter, limit: int, idle_s: float
) -> list[Part]:
    """The body's parts, streamed to files as they arrive (memory: a chunk), refused with 413
    beyond ``limit`` bytes (by its Content-Length before reading anything, or as it streams
    in) and with 408 when nothing of it arrives for ``idle_s``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise StowError(413, f"request body larger than {limit >> 20} MB")
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), idle_s)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise StowError(408, f"nothing of the request body arrived for {idle_s:g} s") from None
        writer.feed(chunk)
    return writer.finish()


def dicomweb_router(
    store: Store,
    ingest: Ingest | None = None,
    tracker: AssociationTracker | None = None,
    max_request_bytes: int = 1 << 30,
    body_idle_s: float = 30.0,
) -> APIRouter:
    """QIDO-RS and WADO-RS of the archive; STOW-RS when an ingest is given."""
    app = APIRouter(prefix="/dicomweb")

    async def _stow(request: Request, study: str | None) -> JSONResponse:
        if ingest is None or tracker is None:
            raise HTTPException(405, "this node does not accept STOW-RS")
        base = str(request.base_url).rstrip("/") + "/dicomweb"
        client = request.client.host if request.client else None
        writer: PartWriter | None = None
        try:
            boundary = boundary_of(request.headers.get("content-type", ""))
            writer = PartWriter(boundary, ingest.incoming_dir, max_request_bytes)
            parts = await _receive_parts(request, writer, max_request_bytes, body_idle_s)
            result = await run_in_threadpool(
                store_parts, ingest, tracker, parts, study, base, client
            )
        except StowError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        finally:
            if writer is not None:
                writer.discard()  # what was not stored (refused, duplicate, cut off)
        retrieve = f"{base}/studies/{study}" if study else None
        return JSONResponse(
            result.dicom_json(retrieve), status_code=result.http_status, media_type=DICOM_JSON
        )

    @app.post("/studies")
    async def store_instances(request: Request) -> JSONResponse:
        """STOW-RS (PS3.18 10.5): multipart/related; type="application/dicom"."""
        return await _stow(request, None)

    @app.post("/studies/{study}")
    async def store_study_instances(study: str, request: Request) -> JSONResponse:
        check_uids(study)
        return await _stow(request, study)

    @app.get("/studies")
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

    @app.get("/studies/{study}/series")
    def search_series(study: str) -> JSONResponse:
        check_uids(study)
        with store.session() as s:
            if s.get(Study, study) is None:
                raise HTTPException(404, "study not found")
            counts = instance_counts(s, study)
            series = s.scalars(select(Series).where(Series.study_uid == study)).all()
            rows = [_series_json(se, counts.get(se.series_uid, 0)) for se in series]
        return JSONResponse(rows, media_type=DICOM_JSON)

    @app.get("/studies/{study}/series/{series}/instances")
    def search_instances(study: str, series: str) -> JSONResponse:
        check_uids(study, series)
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

    @app.get("/studies/{study}")
    def retrieve_study(study: str) -> StreamingResponse:
        check_uids(study)
        return _multipart(_paths(study_uid=study))

    @app.get("/studies/{study}/series/{series}")
    def retrieve_series(study: str, series: str) -> StreamingResponse:
        check_uids(study, series)
        return _multipart(_paths(study_uid=study, series_uid=series))

    @app.get("/studies/{study}/series/{series}/instances/{sop}")
    def retrieve_instance(study: str, series: str, sop: str) -> StreamingResponse:
        check_uids(study, series, sop)
        return _multipart(_paths(study_uid=study, series_uid=series, sop_instance_uid=sop))

    return app
