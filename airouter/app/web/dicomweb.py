"""STOW-RS (PS3.18 10.5) into the node's receivers (``scp.stow``); WADO-RS of the archive is
in ``wado``, QIDO-RS in ``qido``. Errors are JSON with a
status."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from airouter.app.web.wado import check_uids, public_base
from airouter.core.db import Store
from airouter.core.tracker import AssociationTracker
from scp.ingest import Ingest
from scp.stow import Part, PartWriter, StowError, boundary_of, store_parts

DICOM_JSON = "application/dicom+json"


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
    """STOW-RS of the archive (405 when no ingest is given)."""
    app = APIRouter(prefix="/dicomweb")

    async def _stow(request: Request, study: str | None) -> JSONResponse:
        if ingest is None or tracker is None:
            raise HTTPException(405, "this node does not accept STOW-RS")
        base = public_base(request)
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

    return app
