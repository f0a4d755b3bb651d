"""DICOMweb of the node's archive (PS3.18): WADO-RS of what it received and produced,
STOW-RS into the receivers (``scp.stow``); QIDO-RS is in ``qido``. Errors are JSON with a
status."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from airouter.core.db import Instance, Store
from airouter.core.spool import is_valid_uid
from airouter.core.tracker import AssociationTracker
from scp.ingest import Ingest
from scp.stow import Part, PartWriter, StowError, boundary_of, store_parts

DICOM_JSON = "application/dicom+json"


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
