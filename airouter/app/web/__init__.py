"""The node's HTTP application: DICOMweb of the archive (``dicomweb``) and the REST API
(``api``), each a set of FastAPI routers; errors are JSON with a status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from airouter.app.web.api import jobs_router, outbox_router, rules_router, status_router
from airouter.app.web.dicomweb import dicomweb_router
from airouter.core.db import Store
from airouter.core.tracker import AssociationTracker
from router.registry import RuleSet
from scp.ingest import Ingest


def create_app(
    store: Store,
    health: Callable[[], dict[str, Any]],
    ingest: Ingest | None = None,
    tracker: AssociationTracker | None = None,
    ruleset: RuleSet | None = None,
    on_retry: Callable[[], None] | None = None,
    on_job_queued: Callable[[], None] | None = None,
    log_phi: bool = False,
) -> FastAPI:
    """The node's HTTP application (STOW-RS when an ingest is given)."""
    app = FastAPI(title="airouter", version="0.1.0")

    @app.exception_handler(HTTPException)
    async def _json_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail, "status": exc.status_code}, exc.status_code)

    app.include_router(dicomweb_router(store, ingest, tracker))
    app.include_router(rules_router(store, ruleset, log_phi))
    app.include_router(outbox_router(store, on_retry))
    app.include_router(status_router(store, health))
    app.include_router(jobs_router(store, on_job_queued))
    return app
